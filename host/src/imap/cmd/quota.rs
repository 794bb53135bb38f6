//! QUOTA (RFC 9208): GETQUOTAROOT and GETQUOTA report the user's quota, one root (`""`, all
//! folders together) with the STORAGE (KiB) and MESSAGE resources; APPEND and COPY refuse what
//! would go over it with `NO [OVERQUOTA]` (see `append`, `copy`). Quotas come from the
//! configuration, so SETQUOTA is refused (and QUOTASET not announced).

use imap_codec::imap_types::core::AString;
use imap_codec::imap_types::mailbox::Mailbox;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::auth::Quota;
use crate::imap::code::Code;
use crate::imap::codec;
use crate::imap::session::*;
use crate::store::Usage;
use crate::stream::Io;

/// `* QUOTA "" (STORAGE used limit MESSAGE used limit)`: storage in units of 1024 octets,
/// rounded up (RFC 9208 §5.1).
fn quota_line(quota: Quota, used: Usage) -> Vec<u8> {
    let mut resources = Vec::new();
    if let Some(limit) = quota.bytes {
        resources.push(format!(
            "STORAGE {} {}",
            used.bytes.div_ceil(1024),
            limit / 1024
        ));
    }
    if let Some(limit) = quota.messages {
        resources.push(format!("MESSAGE {} {limit}", used.messages));
    }
    format!("* QUOTA \"\" ({})\r\n", resources.join(" ")).into_bytes()
}

impl Conn {
    async fn usage(&self, user: &str) -> Result<Usage, Done> {
        let (store, owner) = (self.store.clone(), user.to_string());
        blocking(move || store.usage(&owner))
            .await
            .map_err(|err| store_failure(&err))
    }

    /// RFC 9208 §4.3: the roots of a mailbox (the one root, when the user has a quota) and
    /// each root's usage.
    pub(in crate::imap) async fn get_quota_root<S>(
        &mut self,
        io: &mut Io<S>,
        user: &str,
        mailbox: &Mailbox<'_>,
    ) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let name = match folder_name(mailbox) {
            Ok(name) => name,
            Err(done) => return done,
        };
        let (store, owner, folder) = (self.store.clone(), user.to_string(), name.clone());
        match blocking(move || store.has_folder(&owner, &folder)).await {
            Ok(true) => {}
            Ok(false) => return no(Some(Code::Nonexistent), "No such mailbox"),
            Err(err) => return store_failure(&err),
        }
        let quota = self.server.users.quota(user);
        let mut out = b"* QUOTAROOT ".to_vec();
        codec::astring(&mut out, name.as_bytes());
        if !quota.is_limited() {
            out.extend_from_slice(b"\r\n");
            io.queue(&out);
            return ok("GETQUOTAROOT completed");
        }
        out.extend_from_slice(b" \"\"\r\n");
        let used = match self.usage(user).await {
            Ok(used) => used,
            Err(done) => return done,
        };
        out.extend_from_slice(&quota_line(quota, used));
        io.queue(&out);
        ok("GETQUOTAROOT completed")
    }

    /// RFC 9208 §4.2: a root's usage and limits; `""` is the only root there is.
    pub(in crate::imap) async fn get_quota<S>(
        &mut self,
        io: &mut Io<S>,
        user: &str,
        root: &AString<'_>,
    ) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let quota = self.server.users.quota(user);
        if !root.as_ref().is_empty() || !quota.is_limited() {
            return no(Some(Code::Nonexistent), "No such quota root");
        }
        let used = match self.usage(user).await {
            Ok(used) => used,
            Err(done) => return done,
        };
        io.queue(&quota_line(quota, used));
        ok("GETQUOTA completed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_is_told_in_kib_rounded_up() {
        let quota = Quota {
            bytes: Some(10 * 1024 * 1024),
            messages: Some(500),
        };
        let used = Usage {
            bytes: 1025,
            messages: 3,
        };
        assert_eq!(
            quota_line(quota, used),
            b"* QUOTA \"\" (STORAGE 2 10240 MESSAGE 3 500)\r\n"
        );
    }
}
