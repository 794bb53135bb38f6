//! The PostgreSQL mailbox store against the mailbox contract: the conformance suite Maildir and
//! the Wasm backends pass runs on it, over a cluster this test starts in a temporary directory;
//! then the cluster is stopped at once (as a crash would) and started again, and what was
//! committed is all there.

use std::sync::Arc;

use postern::store::postgres::PgStore;
use postern::store::{Flags, Keywords, MailStore, StoreError};
use postern_e2e::postgres::Cluster;

#[test]
fn the_postgres_store_meets_the_mailbox_contract_and_survives_a_crash() {
    let cluster = Cluster::start();
    let url = cluster.url();
    let store = PgStore::connect(&url, 4).expect("connect");
    let current = postern::store::postgres::MIGRATIONS.len();
    assert_eq!(store.migrate().unwrap(), current);
    assert_eq!(
        store.migrate().unwrap(),
        current,
        "a second migration changes nothing"
    );
    drop(store);
    // Each open is a new pool over the same database: what another node, or a restart, sees.
    postern::store::conformance::run_all(&|| -> Arc<dyn MailStore> {
        Arc::new(PgStore::connect(&url, 4).expect("connect"))
    });

    let store = PgStore::connect(&url, 2).unwrap();
    let user = "crash@example.test";
    let (validity, uid) = store
        .append(
            user,
            "INBOX",
            b"Subject: kept\r\n\r\nx\r\n",
            Flags::SEEN,
            &Keywords::new(),
            7,
        )
        .unwrap();
    cluster.stop(true);
    // While the database is down, calls fail temporarily (and say so).
    let down = store.snapshot(user, "INBOX").unwrap_err();
    assert!(
        matches!(down, StoreError::Unavailable { .. }) && down.is_temporary(),
        "{down}"
    );
    cluster.restart();
    let after = store.snapshot(user, "INBOX").expect("the pool reconnects");
    assert_eq!(after.uid_validity, validity);
    assert_eq!(after.messages.len(), 1);
    assert_eq!(after.messages[0].uid, uid);
    assert_eq!(after.messages[0].flags, Flags::SEEN);
}

/// The plugins' kv namespaces in the database (`[database] kv = true`): two handles on two
/// pools stand for two nodes; counters stay exact under concurrent increments from both, and
/// expiry, deletion and the quota behave as the file namespaces do.
#[test]
fn shared_kv_namespaces_count_exactly_across_nodes() {
    use postern::plugin::kv::{KvError, Namespace};
    let cluster = Cluster::start();
    let url = cluster.url();
    let node = || {
        let store = PgStore::connect(&url, 4).expect("connect");
        store.migrate().unwrap();
        Arc::new(store)
    };
    let (a, b) = (node(), node());
    let on_a = Arc::new(Namespace::shared(a, "greylist"));
    let on_b = Arc::new(Namespace::shared(b, "greylist"));
    let workers: Vec<_> = (0..4)
        .map(|i| {
            let ns = if i % 2 == 0 {
                on_a.clone()
            } else {
                on_b.clone()
            };
            std::thread::spawn(move || {
                for _ in 0..50 {
                    ns.increment("hits", 1, Some(3600)).unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(on_b.increment("hits", 0, None).unwrap(), 200);

    on_a.set("triplet", b"seen".to_vec(), None).unwrap();
    assert_eq!(on_b.get("triplet").unwrap(), Some(b"seen".to_vec()));
    assert!(on_b.delete("triplet").unwrap());
    assert_eq!(on_a.get("triplet").unwrap(), None);
    assert!(!on_a.delete("triplet").unwrap());

    on_a.set("brief", b"x".to_vec(), Some(1)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(on_b.get("brief").unwrap(), None, "expired");

    // The quota counts keys and values of every node's writes; expired entries make room.
    let used = on_a.bytes();
    on_a.set_quota(used + 20);
    on_b.set_quota(used + 20);
    assert!(matches!(
        on_b.set("big", vec![b'y'; 40], None),
        Err(KvError::Quota(_))
    ));
    on_b.set("small", vec![b'y'; 10], None).unwrap();
    assert!(on_a.bytes() <= used + 20);
}

/// The shared queue (`[database] queue = true`): two handles on two pools stand for two nodes.
/// A message is the node's that stored it until its lease runs out; then the other node takes
/// it over, with the per-recipient outcomes saved so far, and the first finds it gone (it must
/// not deliver it too). A commit batch that cannot reach the database acknowledges nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_queue_hands_a_dead_nodes_messages_to_another_by_lease() {
    use postern::queue::{Envelope, Recipient, Route, Spool, SpoolError};
    use postern::relay::state::{DeliveryState, RcptState, StateDir};
    use std::time::Duration;

    let cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let url = cluster.url();
    let node = move |lease_ms: u64| {
        let store = Arc::new(PgStore::connect(&url, 4).expect("connect"));
        store.migrate().unwrap();
        let spool = Spool::shared(store.clone(), Duration::from_millis(lease_ms)).unwrap();
        (spool, StateDir::Database(store))
    };
    let ((a, a_states), (b, b_states)) =
        tokio::task::spawn_blocking(move || (node(1500), node(1500)))
            .await
            .unwrap();
    let envelope = |id: String| Envelope {
        id,
        received_at: 1,
        sender: "s@remote.test".into(),
        recipients: vec![
            Recipient::new(
                "alice@example.test".into(),
                Route::Local {
                    mailbox: "alice@example.test".into(),
                },
            ),
            Recipient::new("bob@remote.test".into(), Route::Remote),
        ],
        helo: "client".into(),
        peer: "127.0.0.1".into(),
        auth_user: None,
        smtputf8: false,
        message_len: 7,
        quarantine: None,
        filtered: false,
        dsn: Default::default(),
        require_tls: false,
    };
    // Concurrent stores commit (in batches) and each is the storing node's.
    let mut stored = Vec::new();
    for _ in 0..20 {
        let (a, id) = (a.clone(), a.new_id());
        stored.push(tokio::spawn(async move {
            a.store(&envelope(id.clone()), Arc::new(b"hello\r\n".to_vec()))
                .await
                .map(|()| id)
        }));
    }
    let mut ids = Vec::new();
    for s in stored {
        ids.push(s.await.unwrap().expect("stored"));
    }
    ids.sort();
    let first = ids[0].clone();
    let (a2, b2, sa, sb, id) = (
        a.clone(),
        b.clone(),
        a_states.clone(),
        b_states.clone(),
        first.clone(),
    );
    let removed = ids[1].clone();
    let state = tokio::task::spawn_blocking(move || {
        let (env, bytes) = a2.read(&id).unwrap();
        assert_eq!(
            (env.recipients.len(), bytes.as_slice()),
            (2, &b"hello\r\n"[..])
        );
        assert!(matches!(b2.read(&id), Err(SpoolError::Gone(_))));
        // The after-queue filter's rewrite: only by the holder, read back whole.
        let changed = ids[2].clone();
        let mut filtered = envelope(changed.clone());
        filtered.filtered = true;
        filtered.message_len = 14;
        assert!(matches!(
            b2.replace(&filtered, b"X-A: b\r\n\r\nhi\r\n"),
            Err(SpoolError::Gone(_))
        ));
        a2.replace(&filtered, b"X-A: b\r\n\r\nhi\r\n").unwrap();
        assert_eq!(
            a2.read(&changed).unwrap(),
            (filtered, b"X-A: b\r\n\r\nhi\r\n".to_vec())
        );
        // Node A delivered the local copy and recorded it; bob is still owed.
        let state = DeliveryState {
            attempts: 1,
            next_attempt_ms: 0,
            delay_notified: false,
            held: false,
            recipients: vec![
                RcptState::Done,
                RcptState::Pending {
                    address: "bob@remote.test".into(),
                    last: None,
                },
            ],
        };
        sa.save(&id, &state).unwrap();
        assert!(sb.save(&id, &state).is_err(), "B cannot write A's message");
        // A's lease is live: B takes nothing.
        assert!(b2.list().unwrap().is_empty());
        a2.remove(&ids[1..2]).unwrap();
        state
    })
    .await
    .unwrap();
    let b2 = b.clone();
    tokio::task::spawn_blocking(move || {
        let b = b2;
        // A dies (stops renewing); its leases run out and B takes its messages over.
        std::thread::sleep(Duration::from_millis(2000));
        let taken = b.list().unwrap();
        assert_eq!(taken.len(), 19, "every message A held but had not finished");
        assert!(!taken.contains(&removed), "a removed message stays removed");
        assert_eq!(
            b_states.load(&first).unwrap(),
            Some(state),
            "bob still owed, alice not"
        );
        assert!(matches!(a.read(&first), Err(SpoolError::Gone(_))));
        assert!(a_states
            .save(&first, &b_states.load(&first).unwrap().unwrap())
            .is_err());
        // B renews: the messages stay B's.
        b.database()
            .unwrap()
            .0
            .queue_renew(Duration::from_millis(1500))
            .unwrap();
        assert!(a.list().unwrap().is_empty());
        b.remove(&taken).unwrap();
    })
    .await
    .unwrap();
    // With the database gone, a store is refused (451 at SMTP), never acknowledged.
    tokio::task::spawn_blocking(move || cluster.stop(true))
        .await
        .unwrap();
    let refused = b
        .store(&envelope(b.new_id()), Arc::new(b"lost?\r\n".to_vec()))
        .await
        .unwrap_err();
    assert!(matches!(refused, SpoolError::Unavailable(_)), "{refused}");
}

/// The body-store interface (`store::postgres::bodies`): bodies kept outside the database, here
/// in a directory standing for an S3-compatible store. The conformance suite passes on it; a
/// message's bytes live only in that store, and an expunge forgets the body once committed.
#[test]
fn bodies_kept_outside_the_database_meet_the_mailbox_contract() {
    use postern::store::postgres::bodies::BodyStore;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct DirBodies {
        dir: std::path::PathBuf,
        next: AtomicU64,
    }
    impl BodyStore for DirBodies {
        fn put(&self, bytes: &[u8]) -> Result<Option<String>, StoreError> {
            let name = format!(
                "{}-{}",
                std::process::id(),
                self.next.fetch_add(1, Ordering::Relaxed)
            );
            std::fs::write(self.dir.join(&name), bytes).map_err(StoreError::Io)?;
            Ok(Some(name))
        }
        fn get(&self, location: &str) -> Result<Vec<u8>, StoreError> {
            std::fs::read(self.dir.join(location)).map_err(StoreError::Io)
        }
        fn delete(&self, locations: &[String]) -> Result<(), StoreError> {
            for l in locations {
                std::fs::remove_file(self.dir.join(l)).map_err(StoreError::Io)?;
            }
            Ok(())
        }
    }

    let cluster = Cluster::start();
    let url = cluster.url();
    let objects = tempfile::tempdir().unwrap();
    let bodies = Arc::new(DirBodies {
        dir: objects.path().to_path_buf(),
        next: AtomicU64::new(0),
    });
    PgStore::connect(&url, 1).unwrap().migrate().unwrap();
    postern::store::conformance::run_all(&|| -> Arc<dyn MailStore> {
        Arc::new(
            PgStore::connect_with(&url, 4, std::time::Duration::from_secs(10), bodies.clone())
                .expect("connect"),
        )
    });

    let store =
        PgStore::connect_with(&url, 2, std::time::Duration::from_secs(10), bodies.clone()).unwrap();
    let user = "objects@example.test";
    let message = b"Subject: elsewhere\r\n\r\nkept in the body store\r\n";
    let before = std::fs::read_dir(objects.path()).unwrap().count();
    store
        .append(user, "INBOX", message, Flags::empty(), &Keywords::new(), 9)
        .unwrap();
    assert_eq!(
        std::fs::read_dir(objects.path()).unwrap().count(),
        before + 1
    );
    let snapshot = store.snapshot(user, "INBOX").unwrap();
    let info = &snapshot.messages[0];
    assert_eq!(store.read(user, "INBOX", info).unwrap(), message);
    let headers = store.read_headers(user, "INBOX", &[info]);
    assert_eq!(
        &*headers[0].as_ref().unwrap().clone(),
        &b"Subject: elsewhere\r\n\r\n"[..]
    );
    store.remove(user, "INBOX", &[info]).unwrap();
    assert_eq!(
        std::fs::read_dir(objects.path()).unwrap().count(),
        before,
        "the expunged body is forgotten"
    );
}
