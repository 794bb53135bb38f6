//! Mailbox storage behind one trait.
//!
//! Local delivery, POP3 and IMAP all go through [`MailStore`]; Maildir ([`maildir::Maildir`]) is the
//! embedded default and a Wasm mailbox backend is meant to be another implementation. The trait is
//! blocking and batch-shaped: callers run it on blocking threads, and a batch lets an implementation
//! make many deliveries durable with one flush.

pub mod maildir;

use std::io;

/// One message to put in one mailbox.
#[derive(Debug)]
pub struct Delivery<'a> {
    /// The user key (`alice@example.test`).
    pub mailbox: &'a str,
    /// The folder; `INBOX` is the mailbox's root.
    pub folder: &'a str,
    /// A name unique to this (message, recipient) pair that does not change when delivery is
    /// retried, so that a retry after a crash finds the first copy instead of making a second.
    pub delivery_id: &'a str,
    /// True when an earlier attempt may have stored this delivery (a message recovered after a
    /// restart): the store then looks for the earlier copy first. Fresh deliveries skip that scan.
    pub retry: bool,
    /// Unix seconds the message was received (part of stable names).
    pub received_at: i64,
    /// Trace headers to put in front of the message (`Return-Path`, `Delivered-To`), CRLF-terminated.
    pub prepend: &'a [u8],
    /// The message as received, CRLF line endings.
    pub message: &'a [u8],
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("mailbox storage is full: {0}")]
    Full(io::Error),
    #[error("mailbox I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("invalid mailbox or folder name {0:?}")]
    InvalidName(String),
}

impl StoreError {
    pub fn from_io(err: io::Error) -> StoreError {
        if crate::durable::is_disk_full(&err) {
            StoreError::Full(err)
        } else {
            StoreError::Io(err)
        }
    }

    /// Whether retrying later can succeed.
    pub fn is_temporary(&self) -> bool {
        !matches!(self, StoreError::InvalidName(_))
    }
}

/// Whether a folder name is acceptable to every store: `INBOX`, or `/`-separated parts that are
/// not empty, `.` or `..`, hold no dot, backslash, NUL or control character, and do not start
/// with a dot.
pub fn valid_folder_name(folder: &str) -> bool {
    folder.eq_ignore_ascii_case("INBOX")
        || (folder.len() <= 255
            && folder.split('/').all(|part| {
                !part.is_empty()
                    && !part.contains(['.', '\\', '\0'])
                    && !part.chars().any(char::is_control)
            }))
}

pub trait MailStore: Send + Sync {
    /// Delivers each message durably, or reports why not, one result per delivery in order. A
    /// delivery whose `delivery_id` is already stored succeeds without storing a second copy.
    fn deliver(&self, batch: &[Delivery<'_>]) -> Vec<Result<(), StoreError>>;
}
