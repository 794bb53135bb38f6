//! The commands that tell about the server and the session: CAPABILITY (RFC 9051 §6.1.1), NOOP
//! (§6.1.2), LOGOUT (§6.1.3), ID (RFC 2971), ENABLE (RFC 5161), NAMESPACE (RFC 2342), and what
//! a command enabling CONDSTORE tells (RFC 7162 §3.1).

use crate::config::TlsMode;
use crate::imap::codec::{self};
use crate::imap::selected::Selected;
use crate::stream::Io;
use imap_codec::imap_types::extensions::enable::CapabilityEnable;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::imap::session::*;

impl Conn {
    pub(in crate::imap) fn capability<S>(&self, io: &mut Io<S>, state: &State) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        io.queue(format!("* CAPABILITY {}\r\n", self.capabilities(state)).as_bytes());
        ok("CAPABILITY completed")
    }

    /// The BYE and the tagged OK go out together; the connection then closes (§6.1.3).
    pub(in crate::imap) fn logout<S>(&self, io: &mut Io<S>, tag: &str) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        io.queue(b"* BYE Logging out\r\n");
        io.queue(&codec::status(Some(tag), "OK", None, "LOGOUT completed"));
        Done::Close
    }

    /// RFC 2971: the server names itself whatever the client sent.
    pub(in crate::imap) fn id_command<S>(&self, io: &mut Io<S>) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        io.queue(b"* ID (\"name\" \"Postern\" \"vendor\" \"Postern\")\r\n");
        ok("ID completed")
    }

    /// RFC 2342: one personal namespace, `/` as the hierarchy separator, no shared folders.
    pub(in crate::imap) fn namespace<S>(&self, io: &mut Io<S>) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        io.queue(b"* NAMESPACE ((\"\" \"/\")) NIL NIL\r\n");
        ok("NAMESPACE completed")
    }

    /// RFC 5161: the extensions a client can switch on, answered with those that were.
    pub(in crate::imap) fn enable<S>(
        &mut self,
        io: &mut Io<S>,
        selected: Option<&Selected>,
        capabilities: &[CapabilityEnable<'_>],
    ) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let mut enabled = Vec::new();
        for capability in capabilities {
            let name = capability.to_string();
            if name.eq_ignore_ascii_case("IMAP4rev2") {
                self.rev2 = true;
                enabled.push("IMAP4rev2");
            } else if name.eq_ignore_ascii_case("CONDSTORE") {
                self.enable_condstore(io, selected);
                enabled.push("CONDSTORE");
            } else if name.eq_ignore_ascii_case("QRESYNC") {
                // RFC 7162 §3.2.3: QRESYNC implies CONDSTORE.
                self.enable_condstore(io, selected);
                self.qresync = true;
                enabled.push("QRESYNC");
            }
        }
        let mut line = String::from("* ENABLED");
        for name in enabled {
            line.push(' ');
            line.push_str(name);
        }
        line.push_str("\r\n");
        io.queue(line.as_bytes());
        ok("ENABLE completed")
    }

    pub(in crate::imap) fn capabilities(&self, state: &State) -> String {
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
            "SEARCHRES",
            "CONTEXT=SEARCH",
            "SEARCH=PARTIAL",
            "CATENATE",
            "NOTIFY",
            "METADATA",
            "QUOTA",
            "QUOTA=RES-STORAGE",
            "QUOTA=RES-MESSAGE",
        ];
        if matches!(state, State::NotAuthenticated) {
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
    pub(in crate::imap) fn enable_condstore<S>(
        &mut self,
        io: &mut Io<S>,
        selected: Option<&Selected>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        if self.condstore {
            return;
        }
        self.condstore = true;
        if let Some(selected) = selected {
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
