//! The IMAP verbs, one file per group: `auth` (STARTTLS, AUTHENTICATE, LOGIN), `folders` (LIST,
//! LSUB, STATUS, SUBSCRIBE), `append` (APPEND, MULTIAPPEND), `select` (SELECT, EXAMINE, EXPUNGE), `fetch`, `search` (SEARCH,
//! SORT, THREAD), `store`, `copy` (COPY, MOVE), `idle`, `info` (CAPABILITY). Each takes the
//! decoded arguments, calls the store on a blocking thread and ends in a `Done`; the session
//! (`super::session`) reads commands, checks the state and dispatches to these. (CREATE, DELETE,
//! RENAME, ENABLE, ID, NAMESPACE, CLOSE and UNSELECT are still answered inside the
//! session's dispatch.)

pub(in crate::imap) mod append;
pub(in crate::imap) mod auth;
pub(in crate::imap) mod copy;
pub(in crate::imap) mod fetch;
pub(in crate::imap) mod folders;
pub(in crate::imap) mod idle;
pub(in crate::imap) mod info;
pub(in crate::imap) mod search;
pub(in crate::imap) mod select;
pub(in crate::imap) mod store;

pub(in crate::imap) use append::AppendMessage;
pub(in crate::imap) use search::*;
pub(in crate::imap) use store::*;
