//! The mailbox contract as tests: what every [`MailStore`] backend must do, written once and run
//! against each (Maildir in its tests; every backend added later runs the same [`run_all`]).
//!
//! `open` gives a store over the same storage each time it is called; a check that drops one
//! store and opens another sees what a restart (or a crash: nothing is closed cleanly) would.
//! Each check uses a mailbox of its own, so they share one storage. A failed check panics with
//! what the contract says.

use std::sync::Arc;

use super::{
    Delivery, FlagChange, FlagMode, Flags, Imported, ImportedFolder, Keywords, MailStore,
    MessageInfo, StoreError,
};

/// Opens the store under test (again) over the same storage.
pub type Open<'a> = &'a dyn Fn() -> Arc<dyn MailStore>;

/// Runs every check of the contract.
pub fn run_all(open: Open<'_>) {
    delivery_is_idempotent(open);
    uids_ascend_survive_a_restart_and_are_never_reused(open);
    uidvalidity_changes_when_a_folder_is_made_again(open);
    flags_and_keywords_are_kept(open);
    mod_sequences_never_go_back(open);
    unchanged_since_refuses_what_changed(open);
    append_copy_and_move_report_their_uids(open);
    folders_are_made_renamed_and_deleted_with_children(open);
    subscriptions_are_kept(open);
    reads_are_exact_and_removed_messages_are_gone(open);
    annotations_are_kept_and_follow_their_folder(open);
    imports_keep_uids_validity_flags_and_dates(open);
}

const MESSAGE: &[u8] = b"From: a@example.test\r\nSubject: contract\r\n\r\nbody line\r\n";

fn message(n: u32) -> Vec<u8> {
    format!("From: a@example.test\r\nSubject: message {n}\r\n\r\nbody {n}\r\n").into_bytes()
}

fn delivery<'a>(mailbox: &'a str, id: &'a str, retry: bool, message: &'a [u8]) -> Delivery<'a> {
    Delivery {
        mailbox,
        folder: "INBOX",
        delivery_id: id,
        retry,
        received_at: 1_700_000_000,
        prepend: b"Return-Path: <a@example.test>\r\n",
        message,
    }
}

fn uids(store: &dyn MailStore, mailbox: &str, folder: &str) -> Vec<u32> {
    let snapshot = store.snapshot(mailbox, folder).expect("snapshot");
    snapshot.messages.iter().map(|m| m.uid).collect()
}

fn append(store: &dyn MailStore, mailbox: &str, folder: &str, n: u32) -> u32 {
    store
        .append(
            mailbox,
            folder,
            &message(n),
            Flags::empty(),
            &Keywords::new(),
            1_700_000_000 + n as i64,
        )
        .expect("append")
        .1
}

/// A retried delivery (same `delivery_id`) stores one copy; other deliveries their own.
pub fn delivery_is_idempotent(open: Open<'_>) {
    let store = open();
    let user = "deliver@example.test";
    let first = store.deliver(&[delivery(user, "Q1_0", false, MESSAGE)]);
    assert!(first.iter().all(Result::is_ok), "delivery: {first:?}");
    let again = store.deliver(&[delivery(user, "Q1_0", true, MESSAGE)]);
    assert!(
        again.iter().all(Result::is_ok),
        "retried delivery: {again:?}"
    );
    assert_eq!(
        uids(&*store, user, "INBOX").len(),
        1,
        "a retry stores no second copy"
    );
    let other = store.deliver(&[delivery(user, "Q2_0", true, MESSAGE)]);
    assert!(other.iter().all(Result::is_ok));
    assert_eq!(
        uids(&*store, user, "INBOX").len(),
        2,
        "another delivery is stored"
    );
    // After a restart the retry is still recognised.
    drop(store);
    let store = open();
    store.deliver(&[delivery(user, "Q2_0", true, MESSAGE)]);
    assert_eq!(
        uids(&*store, user, "INBOX").len(),
        2,
        "recognised after a restart"
    );
}

/// UIDs ascend, are the same after a restart, and a removed message's UID is never given again.
pub fn uids_ascend_survive_a_restart_and_are_never_reused(open: Open<'_>) {
    let store = open();
    let user = "uids@example.test";
    let given: Vec<u32> = (1..=3).map(|n| append(&*store, user, "INBOX", n)).collect();
    assert!(
        given.windows(2).all(|w| w[0] < w[1]),
        "UIDs ascend: {given:?}"
    );
    assert_eq!(
        uids(&*store, user, "INBOX"),
        given,
        "the listing shows what APPEND said"
    );
    let snapshot = store.snapshot(user, "INBOX").unwrap();
    let last = snapshot.messages.last().unwrap().clone();
    store.remove(user, "INBOX", &[&last]).unwrap();
    drop(store);
    let store = open();
    assert_eq!(
        uids(&*store, user, "INBOX"),
        &given[..2],
        "same UIDs after a restart"
    );
    let next = append(&*store, user, "INBOX", 4);
    assert!(
        next > last.uid,
        "UID {} given again after its message was removed",
        last.uid
    );
    let snapshot = store.snapshot(user, "INBOX").unwrap();
    assert!(snapshot.uid_next > next, "UIDNEXT above every UID");
}

/// A folder deleted and made again has a new UIDVALIDITY and none of the old messages.
pub fn uidvalidity_changes_when_a_folder_is_made_again(open: Open<'_>) {
    let store = open();
    let user = "validity@example.test";
    store.create_folder(user, "Box").unwrap();
    append(&*store, user, "Box", 1);
    let before = store.snapshot(user, "Box").unwrap().uid_validity;
    store.delete_folder(user, "Box").unwrap();
    assert!(matches!(
        store.snapshot(user, "Box"),
        Err(StoreError::NoSuchFolder(_))
    ));
    store.create_folder(user, "Box").unwrap();
    let after = store.snapshot(user, "Box").unwrap();
    assert_ne!(after.uid_validity, before, "a new UIDVALIDITY");
    assert!(after.messages.is_empty(), "the old messages are gone");
    append(&*store, user, "Box", 2);
    assert_eq!(uids(&*store, user, "Box").len(), 1);
}

/// System flags and keywords (by name, matched without case) are kept, across a restart; the
/// folder lists the keywords its messages have; APPEND keeps the keywords it is given.
pub fn flags_and_keywords_are_kept(open: Open<'_>) {
    let store = open();
    let user = "flags@example.test";
    append(&*store, user, "INBOX", 1);
    let snapshot = store.snapshot(user, "INBOX").unwrap();
    let change = |mode, flags, names: &[&str]| FlagChange {
        mode,
        flags,
        keywords: Keywords::from_names(names),
    };
    let wanted = Flags::SEEN.union(Flags::FLAGGED);
    let outcome = store
        .change_flags(
            user,
            "INBOX",
            &[&snapshot.messages[0]],
            &change(FlagMode::Replace, wanted, &["Work", "$Junk"]),
            None,
        )
        .unwrap();
    assert_eq!(outcome.updated.len(), 1);
    assert_eq!(outcome.updated[0].flags, wanted);
    assert_eq!(
        outcome.updated[0].keywords,
        Keywords::from_names(["$Junk", "Work"]),
        "the outcome names the keywords"
    );
    drop(store);
    let store = open();
    let snapshot = store.snapshot(user, "INBOX").unwrap();
    assert_eq!(snapshot.messages[0].flags, wanted, "flags after a restart");
    assert!(
        snapshot.messages[0].keywords.contains("work") && snapshot.messages[0].keywords.len() == 2,
        "keywords after a restart: {:?}",
        snapshot.messages[0].keywords
    );
    for name in ["Work", "$Junk"] {
        assert!(
            snapshot.keywords.iter().any(|k| k == name),
            "the folder lists {name}: {:?}",
            snapshot.keywords
        );
    }
    store
        .change_flags(
            user,
            "INBOX",
            &[&snapshot.messages[0]],
            &change(FlagMode::Remove, Flags::FLAGGED, &["WORK", "Never-set"]),
            None,
        )
        .unwrap();
    let after = &store.snapshot(user, "INBOX").unwrap().messages[0];
    assert!(!after.flags.contains(Flags::FLAGGED) && after.flags.contains(Flags::SEEN));
    assert_eq!(
        after.keywords,
        Keywords::from_names(["$Junk"]),
        "a keyword is removed whatever its case"
    );
    store
        .change_flags(
            user,
            "INBOX",
            &[after],
            &change(FlagMode::Add, Flags::empty(), &["$Label1"]),
            None,
        )
        .unwrap();
    let after = &store.snapshot(user, "INBOX").unwrap().messages[0];
    assert_eq!(after.keywords, Keywords::from_names(["$Junk", "$Label1"]));
    let (_, uid) = store
        .append(
            user,
            "INBOX",
            MESSAGE,
            Flags::DRAFT,
            &Keywords::from_names(["$MDNSent"]),
            0,
        )
        .unwrap();
    let snapshot = store.snapshot(user, "INBOX").unwrap();
    let appended = snapshot.messages.iter().find(|m| m.uid == uid).unwrap();
    assert_eq!(
        (appended.flags, &appended.keywords),
        (Flags::DRAFT, &Keywords::from_names(["$MDNSent"])),
        "APPEND keeps flags and keywords"
    );
}

/// HIGHESTMODSEQ grows with every arrival, flag change and removal, and never goes back, not
/// even across a restart; a message's mod-sequence is never above it.
pub fn mod_sequences_never_go_back(open: Open<'_>) {
    let store = open();
    let user = "modseq@example.test";
    let mut seen = store.snapshot(user, "INBOX").unwrap().highest_modseq;
    let mut step = |store: &dyn MailStore, what: &str| {
        let snapshot = store.snapshot(user, "INBOX").unwrap();
        assert!(
            snapshot.highest_modseq > seen,
            "HIGHESTMODSEQ did not grow after {what}: {} then {}",
            seen,
            snapshot.highest_modseq
        );
        assert!(snapshot
            .messages
            .iter()
            .all(|m| m.modseq >= 1 && m.modseq <= snapshot.highest_modseq));
        seen = snapshot.highest_modseq;
        snapshot
    };
    append(&*store, user, "INBOX", 1);
    append(&*store, user, "INBOX", 2);
    let snapshot = step(&*store, "APPEND");
    store
        .add_flags(user, "INBOX", &[&snapshot.messages[0]], Flags::SEEN)
        .unwrap();
    let snapshot = step(&*store, "a flag change");
    store
        .remove(user, "INBOX", &[&snapshot.messages[1]])
        .unwrap();
    step(&*store, "a removal");
    drop(store);
    let store = open();
    let after = store.snapshot(user, "INBOX").unwrap().highest_modseq;
    assert!(
        after >= seen,
        "HIGHESTMODSEQ went back across a restart: {seen} then {after}"
    );
    let snapshot = store.snapshot(user, "INBOX").unwrap();
    store
        .add_flags(user, "INBOX", &[&snapshot.messages[0]], Flags::FLAGGED)
        .unwrap();
    assert!(store.snapshot(user, "INBOX").unwrap().highest_modseq > after);
}

/// RFC 7162 UNCHANGEDSINCE: a message changed after the given mod-sequence is refused, others
/// are changed.
pub fn unchanged_since_refuses_what_changed(open: Open<'_>) {
    let store = open();
    let user = "unchanged@example.test";
    append(&*store, user, "INBOX", 1);
    append(&*store, user, "INBOX", 2);
    let before = store.snapshot(user, "INBOX").unwrap();
    let base = before.highest_modseq;
    store
        .add_flags(user, "INBOX", &[&before.messages[0]], Flags::SEEN)
        .unwrap();
    let now = store.snapshot(user, "INBOX").unwrap();
    let refs: Vec<&MessageInfo> = now.messages.iter().collect();
    let outcome = store
        .change_flags(
            user,
            "INBOX",
            &refs,
            &FlagChange::add(Flags::FLAGGED),
            Some(base),
        )
        .unwrap();
    assert_eq!(
        outcome.refused,
        vec![now.messages[0].uid],
        "the changed message is refused"
    );
    assert_eq!(outcome.updated.len(), 1);
    assert_eq!(outcome.updated[0].uid, now.messages[1].uid);
}

/// APPEND returns the UIDVALIDITY and UID the listing shows; COPY returns (source, target) UID
/// pairs of copies with the same flags, date and bytes; a MOVE (COPY, then removal) leaves the
/// source without them.
pub fn append_copy_and_move_report_their_uids(open: Open<'_>) {
    let store = open();
    let user = "copy@example.test";
    store.create_folder(user, "Archive").unwrap();
    let (validity, uid) = store
        .append(
            user,
            "INBOX",
            MESSAGE,
            Flags::SEEN,
            &Keywords::from_names(["$Important"]),
            1_650_000_000,
        )
        .unwrap();
    append(&*store, user, "INBOX", 2);
    let source = store.snapshot(user, "INBOX").unwrap();
    assert_eq!(source.uid_validity, validity);
    assert_eq!(source.messages[0].uid, uid);
    assert_eq!(source.messages[0].received_at, 1_650_000_000);
    let refs: Vec<&MessageInfo> = source.messages.iter().collect();
    let (target_validity, pairs) = store.copy(user, "INBOX", &refs, "Archive").unwrap();
    let target = store.snapshot(user, "Archive").unwrap();
    assert_eq!(target.uid_validity, target_validity);
    assert_eq!(pairs.len(), 2);
    for (from, to) in &pairs {
        let original = source.messages.iter().find(|m| m.uid == *from).unwrap();
        let copy = target
            .messages
            .iter()
            .find(|m| m.uid == *to)
            .expect("copied UID listed");
        assert_eq!(copy.flags, original.flags);
        assert_eq!(
            copy.keywords, original.keywords,
            "keywords travel with a copy"
        );
        assert_eq!(copy.received_at, original.received_at);
        assert_eq!(
            store.read(user, "Archive", copy).unwrap(),
            store.read(user, "INBOX", original).unwrap()
        );
    }
    store.remove(user, "INBOX", &refs).unwrap();
    assert!(uids(&*store, user, "INBOX").is_empty(), "moved away");
    assert_eq!(uids(&*store, user, "Archive").len(), 2);
    assert!(matches!(
        store.copy(user, "Archive", &[&target.messages[0]], "Nowhere"),
        Err(StoreError::NoSuchFolder(_))
    ));
}

/// Folders are listed (INBOX aside), renamed with their children, deleted without them; a
/// renamed INBOX leaves an empty INBOX.
pub fn folders_are_made_renamed_and_deleted_with_children(open: Open<'_>) {
    let store = open();
    let user = "folders@example.test";
    store.create_folder(user, "Lists").unwrap();
    store.create_folder(user, "Lists/Rust").unwrap();
    assert!(matches!(
        store.create_folder(user, "Lists"),
        Err(StoreError::Exists(_))
    ));
    append(&*store, user, "Lists/Rust", 1);
    let mut folders = store.folders(user).unwrap();
    folders.sort();
    assert_eq!(folders, ["Lists", "Lists/Rust"]);
    store.rename_folder(user, "Lists", "Old").unwrap();
    let mut folders = store.folders(user).unwrap();
    folders.sort();
    assert_eq!(
        folders,
        ["Old", "Old/Rust"],
        "children move with their parent"
    );
    assert_eq!(
        uids(&*store, user, "Old/Rust").len(),
        1,
        "messages move too"
    );
    store.delete_folder(user, "Old/Rust").unwrap();
    assert_eq!(store.folders(user).unwrap(), ["Old"]);
    append(&*store, user, "INBOX", 2);
    store.rename_folder(user, "INBOX", "Saved").unwrap();
    assert!(
        uids(&*store, user, "INBOX").is_empty(),
        "INBOX is left empty"
    );
    assert_eq!(uids(&*store, user, "Saved").len(), 1);
}

/// Subscriptions are kept by name, across a restart.
pub fn subscriptions_are_kept(open: Open<'_>) {
    let store = open();
    let user = "subscribe@example.test";
    store.create_folder(user, "News").unwrap();
    store.set_subscribed(user, "News", true).unwrap();
    store.set_subscribed(user, "INBOX", true).unwrap();
    drop(store);
    let store = open();
    let mut subscribed = store.subscriptions(user).unwrap();
    subscribed.sort();
    assert_eq!(subscribed, ["INBOX", "News"]);
    store.set_subscribed(user, "News", false).unwrap();
    assert_eq!(store.subscriptions(user).unwrap(), ["INBOX"]);
}

/// A read returns the message exactly (CRLF line endings, `size` octets), the header section
/// ends at its blank line, usage adds up the sizes, and a removed message reads as gone.
pub fn reads_are_exact_and_removed_messages_are_gone(open: Open<'_>) {
    let store = open();
    let user = "reads@example.test";
    store.deliver(&[delivery(user, "Q9_0", false, MESSAGE)]);
    // Delivered mail gets its UID at the listing after it arrives, so it comes first here.
    assert_eq!(uids(&*store, user, "INBOX").len(), 1);
    store
        .append(
            user,
            "INBOX",
            b"Subject: bare\r\n\r\n\0bin\nary\r\n",
            Flags::empty(),
            &Keywords::new(),
            1,
        )
        .unwrap();
    let snapshot = store.snapshot(user, "INBOX").unwrap();
    let delivered = store.read(user, "INBOX", &snapshot.messages[0]).unwrap();
    let mut expected = b"Return-Path: <a@example.test>\r\n".to_vec();
    expected.extend_from_slice(MESSAGE);
    assert_eq!(
        delivered, expected,
        "the delivered bytes, trace header first"
    );
    for message in &snapshot.messages {
        let bytes = store.read(user, "INBOX", message).unwrap();
        assert_eq!(bytes.len() as u64, message.size, "size is the bytes read");
    }
    assert_eq!(
        store.read(user, "INBOX", &snapshot.messages[1]).unwrap(),
        b"Subject: bare\r\n\r\n\0bin\nary\r\n",
        "binary content comes back byte for byte"
    );
    let header = store
        .read_header(user, "INBOX", &snapshot.messages[0])
        .unwrap();
    assert!(header.ends_with(b"\r\n\r\n") && !header.ends_with(b"body line\r\n"));
    let all: Vec<&MessageInfo> = snapshot.messages.iter().collect();
    let headers = store.read_headers(user, "INBOX", &all);
    assert_eq!(headers.len(), 2, "one header per message asked for");
    assert_eq!(&*headers[0].as_ref().unwrap().clone(), &*header);
    assert!(headers[1]
        .as_ref()
        .unwrap()
        .starts_with(b"Subject: bare\r\n"));
    let size = snapshot.messages[0].size;
    for range in [
        0..5,
        3..12,
        size - 4..size,
        size - 2..size + 100,
        size + 5..size + 9,
    ] {
        let expected = &delivered[(range.start.min(size)) as usize..(range.end.min(size)) as usize];
        assert_eq!(
            store
                .read_range(user, "INBOX", &snapshot.messages[0], range.clone())
                .unwrap(),
            expected,
            "bytes {range:?} of the message, cut to its end"
        );
    }
    let usage = store.usage(user).unwrap();
    assert_eq!(usage.messages, 2);
    assert_eq!(
        usage.bytes,
        snapshot.messages.iter().map(|m| m.size).sum::<u64>()
    );
    store
        .remove(user, "INBOX", &[&snapshot.messages[0]])
        .unwrap();
    assert!(matches!(
        store.read(user, "INBOX", &snapshot.messages[0]),
        Err(StoreError::Gone(_))
    ));
    // Removing it again is no error.
    store
        .remove(user, "INBOX", &[&snapshot.messages[0]])
        .unwrap();
}

/// RFC 5464 annotations: set and removed durably, kept across a restart, the mailbox's apart
/// from INBOX's, and they go with their folder when it is renamed or deleted.
pub fn annotations_are_kept_and_follow_their_folder(open: Open<'_>) {
    let store = open();
    let user = "metadata@example.test";
    let comment = "/private/comment".to_string();
    store.create_folder(user, "Notes").unwrap();
    store
        .set_metadata(
            user,
            Some("Notes"),
            &[(comment.clone(), Some(b"kept".to_vec()))],
        )
        .unwrap();
    store
        .set_metadata(user, None, &[(comment.clone(), Some(b"server".to_vec()))])
        .unwrap();
    drop(store);
    let store = open();
    assert_eq!(
        store.metadata(user, Some("Notes")).unwrap()[&comment],
        b"kept"
    );
    assert_eq!(store.metadata(user, None).unwrap()[&comment], b"server");
    assert!(
        store.metadata(user, Some("INBOX")).unwrap().is_empty(),
        "INBOX has its own"
    );
    store.rename_folder(user, "Notes", "Old notes").unwrap();
    assert_eq!(
        store.metadata(user, Some("Old notes")).unwrap()[&comment],
        b"kept"
    );
    store
        .set_metadata(user, Some("Old notes"), &[(comment.clone(), None)])
        .unwrap();
    assert!(store.metadata(user, Some("Old notes")).unwrap().is_empty());
    store.delete_folder(user, "Old notes").unwrap();
    assert!(matches!(
        store.metadata(user, Some("Old notes")),
        Err(StoreError::NoSuchFolder(_))
    ));
}

/// A migration's import: the folder takes the UIDVALIDITY it had, every message its UID, flags,
/// keywords, date and bytes; UIDNEXT and HIGHESTMODSEQ do not go below the old store's; a second
/// run adds nothing; a folder holding messages under another UIDVALIDITY refuses.
pub fn imports_keep_uids_validity_flags_and_dates(open: Open<'_>) {
    let store = open();
    let user = "import@example.test";
    let junk = Keywords::from_names(["$Junk"]);
    let none = Keywords::new();
    let bodies: Vec<Vec<u8>> = (1..=3).map(message).collect();
    let imported = [
        Imported {
            uid: 5,
            flags: Flags::SEEN,
            keywords: &junk,
            received_at: 1_600_000_000,
            message: &bodies[0],
        },
        Imported {
            uid: 9,
            flags: Flags::empty(),
            keywords: &none,
            received_at: 1_600_000_100,
            message: &bodies[1],
        },
        Imported {
            uid: 12,
            flags: Flags::ANSWERED.union(Flags::FLAGGED),
            keywords: &none,
            received_at: 1_600_000_200,
            message: &bodies[2],
        },
    ];
    let numbers = ImportedFolder {
        uid_validity: 777,
        uid_next: 20,
        highest_modseq: 500,
    };
    for folder in ["INBOX", "Archive/2020"] {
        store.import(user, folder, numbers, &imported).unwrap();
        // Run again (an interrupted migration restarted): nothing is added.
        store.import(user, folder, numbers, &imported).unwrap();
        drop(store.snapshot(user, folder).unwrap());
    }
    drop(store);
    let store = open();
    for folder in ["INBOX", "Archive/2020"] {
        let snapshot = store.snapshot(user, folder).unwrap();
        assert_eq!(snapshot.uid_validity, 777, "{folder}: UIDVALIDITY kept");
        assert!(
            snapshot.uid_next >= 20,
            "{folder}: UIDNEXT {}",
            snapshot.uid_next
        );
        assert!(
            snapshot.highest_modseq >= 500,
            "{folder}: HIGHESTMODSEQ {}",
            snapshot.highest_modseq
        );
        assert_eq!(
            snapshot.messages.iter().map(|m| m.uid).collect::<Vec<_>>(),
            [5, 9, 12],
            "{folder}: UIDs kept, each once"
        );
        for (m, want) in snapshot.messages.iter().zip(&imported) {
            assert_eq!((m.flags, &m.keywords), (want.flags, want.keywords));
            assert_eq!(m.received_at, want.received_at);
            assert_eq!(store.read(user, folder, m).unwrap(), want.message);
        }
    }
    let (_, uid) = store
        .append(user, "INBOX", MESSAGE, Flags::empty(), &Keywords::new(), 0)
        .unwrap();
    assert!(
        uid >= 20,
        "a new message gets a UID the old store never gave: {uid}"
    );
    let other = ImportedFolder {
        uid_validity: 778,
        ..numbers
    };
    assert!(matches!(
        store.import(user, "INBOX", other, &imported),
        Err(StoreError::Exists(_))
    ));
}
