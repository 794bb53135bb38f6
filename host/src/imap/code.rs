//! Response codes (RFC 9051 §7.1, RFC 5530, and those of the extensions Postern speaks) as typed
//! values: a handler names the code, and only this module knows how it is spelled.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Code {
    AlreadyExists,
    AuthenticationFailed,
    /// RFC 9051 §7.1: with the charsets SEARCH takes.
    BadCharset,
    Cannot,
    CompressionActive,
    ExpungeIssued,
    Limit,
    Nonexistent,
    OverQuota,
    PrivacyRequired,
    ReadOnly,
    ReadWrite,
    ServerBug,
    TooBig,
    TryCreate,
    Unavailable,
    /// RFC 4315 §3: the UIDVALIDITY and UIDs of appended messages.
    AppendUid {
        validity: u32,
        uids: String,
    },
    /// RFC 4315 §3: source and target UIDs of copied messages.
    CopyUid {
        validity: u32,
        from: String,
        to: String,
    },
    /// RFC 7162 §3.1.3: messages a conditional STORE left alone.
    Modified(String),
    Capability(String),
    /// RFC 5464 §4.2.1: GETMETADATA left out entries over MAXSIZE; the longest's size.
    MetadataLongEntries(usize),
    /// RFC 5464 §4.3: the largest value SETMETADATA takes.
    MetadataMaxSize(usize),
    /// RFC 5464 §4.3: the folder has as many entries as it may.
    MetadataTooMany,
    /// RFC 5465 §5.9: the NOTIFY events this server reports.
    BadEvent(String),
    /// RFC 4469 §6: a CATENATE URL that cannot be used.
    BadUrl(String),
    /// RFC 5267 §4.3.1: the search with this tag is not kept up to date.
    NoUpdate(String),
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Code::AlreadyExists => f.write_str("ALREADYEXISTS"),
            Code::AuthenticationFailed => f.write_str("AUTHENTICATIONFAILED"),
            Code::BadCharset => f.write_str("BADCHARSET (US-ASCII UTF-8)"),
            Code::Cannot => f.write_str("CANNOT"),
            Code::CompressionActive => f.write_str("COMPRESSIONACTIVE"),
            Code::ExpungeIssued => f.write_str("EXPUNGEISSUED"),
            Code::Limit => f.write_str("LIMIT"),
            Code::Nonexistent => f.write_str("NONEXISTENT"),
            Code::OverQuota => f.write_str("OVERQUOTA"),
            Code::PrivacyRequired => f.write_str("PRIVACYREQUIRED"),
            Code::ReadOnly => f.write_str("READ-ONLY"),
            Code::ReadWrite => f.write_str("READ-WRITE"),
            Code::ServerBug => f.write_str("SERVERBUG"),
            Code::TooBig => f.write_str("TOOBIG"),
            Code::TryCreate => f.write_str("TRYCREATE"),
            Code::Unavailable => f.write_str("UNAVAILABLE"),
            Code::AppendUid { validity, uids } => write!(f, "APPENDUID {validity} {uids}"),
            Code::CopyUid { validity, from, to } => write!(f, "COPYUID {validity} {from} {to}"),
            Code::Modified(set) => write!(f, "MODIFIED {set}"),
            Code::Capability(list) => write!(f, "CAPABILITY {list}"),
            Code::BadEvent(events) => write!(f, "BADEVENT ({events})"),
            Code::MetadataLongEntries(n) => write!(f, "METADATA LONGENTRIES {n}"),
            Code::MetadataMaxSize(n) => write!(f, "METADATA MAXSIZE {n}"),
            Code::MetadataTooMany => f.write_str("METADATA TOOMANY"),
            Code::BadUrl(url) => {
                let mut quoted = Vec::new();
                crate::imap::codec::string(&mut quoted, url.as_bytes());
                write!(f, "BADURL {}", String::from_utf8_lossy(&quoted))
            }
            Code::NoUpdate(tag) => {
                let mut quoted = Vec::new();
                crate::imap::codec::string(&mut quoted, tag.as_bytes());
                write!(f, "NOUPDATE {}", String::from_utf8_lossy(&quoted))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spelled_as_the_rfcs_do() {
        assert_eq!(Code::ReadOnly.to_string(), "READ-ONLY");
        assert_eq!(
            Code::CopyUid {
                validity: 7,
                from: "1:2".into(),
                to: "5:6".into()
            }
            .to_string(),
            "COPYUID 7 1:2 5:6"
        );
    }
}
