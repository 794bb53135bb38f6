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
