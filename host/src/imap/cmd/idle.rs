//! IDLE (RFC 2177, RFC 9051 §6.3.13): woken by the store's change announcements.

use crate::imap::codec::{Event, Mode};
use crate::imap::selected::Selected;
use crate::store::watched::Change;
use crate::stream::{Io, ReadError};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::imap::session::*;

impl Conn {
    pub(in crate::imap) async fn idle<S>(
        &mut self,
        io: &mut Io<S>,
        user: &str,
        mut selected: Option<&mut Selected>,
    ) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        if let Some(selected) = selected.as_deref_mut() {
            let updates = self.updates(user, selected, true).await;
            io.queue(&updates);
        }
        io.queue(b"+ idling\r\n");
        let deadline = Instant::now() + self.idle_timeout();
        let mut shutdown = self.server.shutdown.clone();
        loop {
            if io.flush().await.is_err() {
                return Done::Close;
            }
            enum Woken {
                Input(Result<Event, ReadError>),
                Change(Result<Change, broadcast::error::RecvError>),
                Revoked(crate::auth::Revocation),
                Shutdown,
            }
            let woken = tokio::select! {
                event = read_event(&mut self.reader, io, Mode::Line, deadline) => Woken::Input(event),
                change = self.changes.recv() => Woken::Change(change),
                Ok(revoked) = self.revoked.recv() => Woken::Revoked(revoked),
                _ = shutdown.wait_for(|down| *down) => Woken::Shutdown,
            };
            match woken {
                Woken::Input(event) => {
                    return match event {
                        Ok(Event::Line(line)) if line.eq_ignore_ascii_case(b"DONE") => {
                            ok("IDLE terminated")
                        }
                        Ok(_) => Done::Bad("Expected DONE".into()),
                        Err(ReadError::Timeout) => {
                            io.queue(b"* BYE Autologout: idle for too long\r\n");
                            Done::Close
                        }
                        Err(_) => Done::Close,
                    };
                }
                Woken::Change(Ok(change))
                    if !concerns(
                        &change,
                        self.id,
                        user,
                        selected.as_deref().map(|s| &*s.folder),
                    ) =>
                {
                    continue
                }
                Woken::Change(Err(broadcast::error::RecvError::Closed)) => return Done::Close,
                Woken::Change(_) => {
                    self.dirty = true;
                    if let Some(selected) = selected.as_deref_mut() {
                        let updates = self.updates(user, selected, true).await;
                        io.queue(&updates);
                        let kept = self.kept_searches(user, selected).await;
                        io.queue(&kept);
                    }
                }
                Woken::Revoked(revoked) if revoked.user.eq_ignore_ascii_case(user) => {
                    io.queue(format!("* BYE {}\r\n", revoked.why.text()).as_bytes());
                    return Done::Close;
                }
                Woken::Revoked(_) => {}
                Woken::Shutdown => {
                    io.queue(b"* BYE Server shutting down\r\n");
                    return Done::Close;
                }
            }
        }
    }
}
