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
