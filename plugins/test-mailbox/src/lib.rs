//! A mailbox backend that fails on purpose, to show the host contains it. Its `mode` setting
//! (`[mailbox_backend.config]`, capability `config`) says how every call fails:
//!
//! - `trap`: the call traps (a panic, `unreachable` in Wasm);
//! - `loop`: the call never returns (the host's deadline stops it);
//! - `sleep`: the call waits ten minutes in WASI's poll, outside guest code (the host's
//!   deadline stops it too);
//! - `liar`: the call answers what the contract forbids (UIDs out of order and above UIDNEXT,
//!   one result for no delivery, more bytes than asked for).

wit_bindgen::generate!({
    path: "../../wit/deps/postern-plugin-0.1.0",
    world: "postern:plugin/mailbox-backend@0.1.0",
});

use exports::postern::plugin::mailbox::Guest;
use postern::plugin::config;
use postern::plugin::mailbox_types::{
    Delivery, FlagChange, FlagOutcome, FolderSnapshot, Imported, ImportedFolder, Incoming,
    MailboxUsage, MessageInfo, MessageRef, StoreError, SystemFlags,
};

/// Fails as configured; returns only for `liar`, whose lies each function tells itself.
fn fail() {
    match config::get("mode").as_deref() {
        Some("loop") => {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        Some("sleep") => std::thread::sleep(std::time::Duration::from_secs(600)),
        Some("liar") => {}
        _ => panic!("test-mailbox fails on purpose"),
    }
}

fn lie<T>() -> Result<T, StoreError> {
    fail();
    Err(StoreError::Io("test-mailbox has nothing".into()))
}

fn message(uid: u32) -> MessageInfo {
    MessageInfo {
        uid,
        key: uid.to_string(),
        handle: String::new(),
        size: 10,
        flags: SystemFlags::empty(),
        keywords: Vec::new(),
        received_at: 0,
        modseq: 1,
    }
}

struct Faulty;

impl Guest for Faulty {
    fn deliver(batch: Vec<Delivery>) -> Vec<Result<(), StoreError>> {
        fail();
        // One result too many: a batch of n deliveries gets n + 1.
        vec![Ok(()); batch.len() + 1]
    }

    fn snapshot(_mailbox: String, _folder: String) -> Result<FolderSnapshot, StoreError> {
        fail();
        Ok(FolderSnapshot {
            uid_validity: 1,
            uid_next: 2,
            messages: vec![message(5), message(3)],
            keywords: Vec::new(),
            more_keywords: true,
            highest_modseq: 1,
        })
    }

    fn read(
        _mailbox: String,
        _folder: String,
        _message: MessageRef,
        _offset: u64,
        len: u32,
    ) -> Result<Vec<u8>, StoreError> {
        fail();
        Ok(vec![b'x'; len as usize + 1])
    }

    fn read_headers(
        _mailbox: String,
        _folder: String,
        _messages: Vec<MessageRef>,
    ) -> Vec<Result<Vec<u8>, StoreError>> {
        fail();
        Vec::new()
    }

    fn change_flags(
        _mailbox: String,
        _folder: String,
        _messages: Vec<MessageRef>,
        _change: FlagChange,
        _unchanged_since: Option<u64>,
    ) -> Result<FlagOutcome, StoreError> {
        lie()
    }

    fn append(
        _mailbox: String,
        _folder: String,
        _message: Incoming,
        _flags: SystemFlags,
        _keywords: Vec<String>,
        _received_at: i64,
    ) -> Result<(u32, u32), StoreError> {
        fail();
        Ok((0, 0))
    }

    fn copy(
        _mailbox: String,
        _folder: String,
        _messages: Vec<MessageRef>,
        _target: String,
    ) -> Result<(u32, Vec<(u32, u32)>), StoreError> {
        lie()
    }

    fn remove(
        _mailbox: String,
        _folder: String,
        _messages: Vec<MessageRef>,
    ) -> Result<(), StoreError> {
        lie()
    }

    fn folders(_mailbox: String) -> Result<Vec<String>, StoreError> {
        fail();
        Ok(vec!["../escape".into()])
    }

    fn create_folder(_mailbox: String, _folder: String) -> Result<(), StoreError> {
        lie()
    }

    fn delete_folder(_mailbox: String, _folder: String) -> Result<(), StoreError> {
        lie()
    }

    fn rename_folder(_mailbox: String, _from: String, _to: String) -> Result<(), StoreError> {
        lie()
    }

    fn subscriptions(_mailbox: String) -> Result<Vec<String>, StoreError> {
        lie()
    }

    fn set_subscribed(
        _mailbox: String,
        _folder: String,
        _subscribed: bool,
    ) -> Result<(), StoreError> {
        lie()
    }

    fn recent_boundary(
        _mailbox: String,
        _folder: String,
        _validity: u32,
        _claim: Option<u32>,
    ) -> Result<u32, StoreError> {
        lie()
    }

    fn metadata(
        _mailbox: String,
        _folder: Option<String>,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        lie()
    }

    fn set_metadata(
        _mailbox: String,
        _folder: Option<String>,
        _changes: Vec<(String, Option<Vec<u8>>)>,
    ) -> Result<(), StoreError> {
        lie()
    }

    fn import_messages(
        _mailbox: String,
        _folder: String,
        _numbers: ImportedFolder,
        _messages: Vec<Imported>,
    ) -> Result<(), StoreError> {
        lie()
    }

    fn usage(_mailbox: String) -> Result<MailboxUsage, StoreError> {
        lie()
    }
}

export!(Faulty);
