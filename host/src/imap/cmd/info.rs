//! CAPABILITY (RFC 9051 §6.1.1) and what a command enabling CONDSTORE tells (RFC 7162 §3.1).

use crate::config::TlsMode;
use crate::imap::codec::{self};
use crate::stream::Io;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::imap::session::*;

impl Session {
    pub(in crate::imap) fn capabilities(&self) -> String {
        let mut caps = vec![
            "IMAP4rev1",
            "IMAP4rev2",
            "LITERAL+",
            "SASL-IR",
            "ID",
            "ENABLE",
            "IDLE",
            "NAMESPACE",
            "UNSELECT",
            "UIDPLUS",
            "MOVE",
            "CHILDREN",
            "SPECIAL-USE",
            "LIST-EXTENDED",
            "LIST-STATUS",
            "ESEARCH",
            "BINARY",
            "COMPRESS=DEFLATE",
            "CONDSTORE",
            "QRESYNC",
            "MULTIAPPEND",
            "SORT",
            "SORT=DISPLAY",
            "ESORT",
            "THREAD=ORDEREDSUBJECT",
            "THREAD=REFERENCES",
        ];
        if matches!(self.state, State::NotAuthenticated) {
            if !self.tls && self.listener.tls == TlsMode::Starttls && self.server.tls.is_some() {
                caps.push("STARTTLS");
            }
            if self.plaintext_allowed() {
                caps.push("AUTH=PLAIN");
                caps.push("AUTH=LOGIN");
            } else {
                caps.push("LOGINDISABLED");
            }
        }
        let mut text = caps.join(" ");
        text.push_str(&format!(
            " APPENDLIMIT={}",
            self.server.config.imap.append_limit
        ));
        text
    }

    /// RFC 7162 §3.1: a CONDSTORE-enabling command (FETCH MODSEQ, SEARCH MODSEQ, STORE
    /// UNCHANGEDSINCE, STATUS HIGHESTMODSEQ) turns CONDSTORE on; when a mailbox is selected the
    /// client then hears its HIGHESTMODSEQ, as it would have from SELECT.
    pub(in crate::imap) fn enable_condstore<S>(&mut self, io: &mut Io<S>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        if self.condstore {
            return;
        }
        self.condstore = true;
        if let State::Selected { selected, .. } = &self.state {
            let highest = selected.highest_modseq.max(1);
            io.queue(&codec::status(
                None,
                "OK",
                Some(&format!("HIGHESTMODSEQ {highest}")),
                "Highest",
            ));
        }
    }
}
