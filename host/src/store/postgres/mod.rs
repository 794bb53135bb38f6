//! Mailboxes in PostgreSQL, behind the same contract as Maildir (`MailStore`), so several nodes
//! can share them. Every change is one transaction, committed before the call returns: a 250 or
//! an OK is never given for what is not committed. UIDs and mod-sequences come from the folder's
//! row, locked by the transaction that stores the message, so they ascend with no gaps a client
//! could see reused, and never go back (the schema, `schema.rs`, says the rest).
//!
//! The contract is blocking; the store keeps a small runtime of its own to drive its
//! connections (tokio-postgres through a deadpool pool) and blocks the calling thread, which is
//! always a blocking one, on each call.

pub mod bodies;
mod directory;
mod kv;
mod queue;
mod schema;

use std::collections::{BTreeMap, HashMap};

use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use super::headers::HeaderCache;
use super::{
    Delivery, FlagChange, FlagMode, FlagOutcome, Flags, FolderSnapshot, Imported, ImportedFolder,
    Keywords, MailStore, MessageHandle, MessageInfo, StoreError, Updated, Usage,
};

pub use kv::KvEntry;
pub use queue::QueueRow;
pub use schema::MIGRATIONS;

pub struct PgStore {
    runtime: tokio::runtime::Runtime,
    pool: Pool,
    config: tokio_postgres::Config,
    /// This process's name to the database (its `application_name`): the change notifications
    /// its own transactions cause carry it, so [`PgStore::listen`] can skip them.
    node: String,
    /// Headers by folder id (never reused, so an entry is never stale) and UID: SEARCH by
    /// header and FETCH ENVELOPE read them again and again.
    headers: std::sync::Mutex<HeaderCache<i64>>,
    /// Where bodies live (`bodies`): the database itself unless told otherwise.
    bodies: std::sync::Arc<dyn bodies::BodyStore>,
}

/// What [`PgStore::listen`] hears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Another node changed a mailbox: the messages of `folder`, or (None) its folder list or
    /// subscriptions.
    Changed {
        mailbox: String,
        folder: Option<String>,
    },
    /// Listening (re)started: whatever changed while it was not may have been missed.
    Anything,
}

/// The channel of migration 2's triggers.
const CHANNEL: &str = "postern_changes";

type Result<T> = std::result::Result<T, StoreError>;

/// A failure of the database: temporary (it may be down, or a transaction lost a race).
fn db(err: impl std::error::Error) -> StoreError {
    // tokio-postgres says only "db error" at the top; the server's message is the source.
    let mut reason = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        reason.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    StoreError::Unavailable {
        name: "postgres".into(),
        reason,
    }
}

fn folder_name(folder: &str) -> &str {
    if folder.eq_ignore_ascii_case("INBOX") {
        "INBOX"
    } else {
        folder
    }
}

fn keyword_list(keywords: &Keywords) -> Vec<String> {
    keywords.iter().map(str::to_string).collect()
}

impl PgStore {
    /// Connects (lazily: the pool opens connections when a call needs one). `pool_size`
    /// connections at most.
    pub fn connect(url: &str, pool_size: usize) -> Result<PgStore> {
        PgStore::connect_with(
            url,
            pool_size,
            std::time::Duration::from_secs(10),
            std::sync::Arc::new(bodies::InDatabase),
        )
    }

    /// As [`PgStore::connect`], with calls that wait at most `timeout` for a connection (and
    /// as long to open one) before they fail as temporary, and message bodies kept by `bodies`.
    pub fn connect_with(
        url: &str,
        pool_size: usize,
        timeout: std::time::Duration,
        bodies: std::sync::Arc<dyn bodies::BodyStore>,
    ) -> Result<PgStore> {
        let mut config: tokio_postgres::Config = url.parse().map_err(db)?;
        let node = {
            use std::hash::{BuildHasher, Hasher};
            let random = std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish();
            format!("postern-{}-{random:016x}", std::process::id())
        };
        // Keepalives, so a database host that vanished (rather than closed the connection) is
        // noticed and the listener reconnects.
        config
            .application_name(&node)
            .keepalives(true)
            .keepalives_idle(std::time::Duration::from_secs(10));
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("postgres")
            .enable_all()
            .build()
            .map_err(StoreError::Io)?;
        let pool = {
            let _entered = runtime.enter();
            Pool::builder(manager)
                .max_size(pool_size.max(1))
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .wait_timeout(Some(timeout))
                .create_timeout(Some(timeout))
                .build()
                .map_err(db)?
        };
        Ok(PgStore {
            runtime,
            pool,
            config,
            node,
            headers: Default::default(),
            bodies,
        })
    }

    /// Runs the migrations not yet run; returns the schema version now.
    pub fn migrate(&self) -> Result<usize> {
        self.runtime.block_on(async {
            let mut client = self.pool.get().await.map_err(db)?;
            let tx = client.transaction().await.map_err(db)?;
            // One migrating node at a time.
            tx.batch_execute(
                "SELECT pg_advisory_xact_lock(7391);
                 CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL);",
            )
            .await
            .map_err(db)?;
            let done: i64 = tx
                .query_one("SELECT count(*) FROM schema_version", &[])
                .await
                .map_err(db)?
                .get(0);
            for (n, sql) in MIGRATIONS.iter().enumerate().skip(done as usize) {
                tx.batch_execute(sql).await.map_err(db)?;
                tx.execute("INSERT INTO schema_version VALUES ($1)", &[&(n as i32 + 1)])
                    .await
                    .map_err(db)?;
            }
            tx.commit().await.map_err(db)?;
            Ok(MIGRATIONS.len())
        })
    }

    /// Hears other nodes' changes (migration 2's notifications) for as long as the store lives,
    /// on a connection of its own, reconnecting a second after it is lost; `on_notice` runs on
    /// the store's runtime and must not block. After each (re)connection it is told
    /// [`Notice::Anything`], so a session re-reads rather than miss what changed meanwhile.
    pub fn listen(&self, on_notice: impl Fn(Notice) + Send + Sync + 'static) {
        let config = self.config.clone();
        let node = self.node.clone();
        self.runtime.spawn(async move {
            loop {
                match listen_once(&config, &node, &on_notice).await {
                    Ok(()) => tracing::warn!("database: change notifications ended; reconnecting"),
                    Err(err) => tracing::warn!(error = %err, "database: change notifications lost; reconnecting"),
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        });
    }

    fn block<T>(&self, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        self.runtime.block_on(f)
    }

    /// Tells the body store the bodies a committed transaction dropped. A failure here only
    /// leaves unreferenced objects behind: the messages are gone either way.
    fn forget_bodies(&self, locations: &[String]) {
        if locations.is_empty() {
            return;
        }
        if let Err(err) = self.bodies.delete(locations) {
            tracing::warn!(error = %err, count = locations.len(), "body store: cannot delete unreferenced bodies");
        }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(db)
    }
}

/// One listening connection, until it is lost.
async fn listen_once(
    config: &tokio_postgres::Config,
    node: &str,
    on_notice: &(impl Fn(Notice) + Send + Sync),
) -> Result<()> {
    let (client, mut connection) = config.connect(NoTls).await.map_err(db)?;
    let listen = format!("LISTEN {CHANNEL}");
    // The connection must be polled for the LISTEN to complete, and then for notifications.
    let mut listening = std::pin::pin!(client.batch_execute(&listen));
    let mut listened = false;
    loop {
        tokio::select! {
            done = &mut listening, if !listened => {
                done.map_err(db)?;
                listened = true;
                on_notice(Notice::Anything);
            }
            message = std::future::poll_fn(|cx| connection.poll_message(cx)) => match message {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                    if let Some(notice) = parse_notice(n.payload(), node) {
                        on_notice(notice);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(err)) => return Err(db(err)),
                None => return Ok(()),
            },
        }
    }
}

/// A notification's payload ("<writer>\t<mailbox>\t<folder>"), unless this node wrote it.
fn parse_notice(payload: &str, node: &str) -> Option<Notice> {
    let mut fields = payload.splitn(3, '\t');
    let (writer, mailbox, folder) = (fields.next()?, fields.next()?, fields.next()?);
    (writer != node).then(|| Notice::Changed {
        mailbox: mailbox.to_string(),
        folder: (!folder.is_empty()).then(|| folder.to_string()),
    })
}

/// The mailbox's row id, made when missing.
async fn mailbox_id(c: &impl GenericClient, mailbox: &str) -> Result<i64> {
    let name = mailbox.to_ascii_lowercase();
    // Looked up first: an upsert writes (and so makes the commit flush the WAL) even when the
    // row exists, which made every read a disk flush.
    let select = "SELECT id FROM mailboxes WHERE name = $1";
    if let Some(row) = c.query_opt(select, &[&name]).await.map_err(db)? {
        return Ok(row.get(0));
    }
    let row = c
        .query_one(
            "INSERT INTO mailboxes (name) VALUES ($1)
             ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING id",
            &[&name],
        )
        .await
        .map_err(db)?;
    Ok(row.get(0))
}

/// The folder's row as a reader sees it (not locked: readers never write, so their commits
/// cost no WAL flush); None when it does not exist.
async fn folder_view(
    c: &impl GenericClient,
    mailbox: i64,
    folder: &str,
) -> Result<Option<FolderRow>> {
    let row = c
        .query_opt(FOLDER_SELECT, &[&mailbox, &folder_name(folder)])
        .await
        .map_err(db)?;
    Ok(row.as_ref().map(FolderRow::from_row))
}

/// The folder for a reader; a missing INBOX is made first (in a transaction of its own).
async fn existing_folder(
    client: &mut deadpool_postgres::Object,
    mailbox: &str,
    folder: &str,
) -> Result<(i64, i64)> {
    let id = mailbox_id(&*client, mailbox).await?;
    if let Some(row) = folder_view(&*client, id, folder).await? {
        return Ok((id, row.id));
    }
    let tx = client.transaction().await.map_err(db)?;
    let row = folder_row(&tx, id, folder, false).await?;
    tx.commit().await.map_err(db)?;
    Ok((id, row.id))
}

/// A folder's row (locked when read by `folder_row`, not by `folder_view`).
struct FolderRow {
    id: i64,
    validity: i64,
    uid_next: i64,
    highest: i64,
    keywords: Vec<String>,
}

/// A folder's row by mailbox id and name, in [`FolderRow`]'s column order.
const FOLDER_SELECT: &str = "SELECT id, uid_validity, uid_next, highest_modseq, keywords
                             FROM folders WHERE mailbox = $1 AND name = $2";

impl FolderRow {
    fn from_row(row: &tokio_postgres::Row) -> FolderRow {
        FolderRow {
            id: row.get(0),
            validity: row.get(1),
            uid_next: row.get(2),
            highest: row.get(3),
            keywords: row.get(4),
        }
    }
}

/// The folder's row, locked; INBOX (and with `create`, any folder) is made when missing.
async fn folder_row(
    c: &impl GenericClient,
    mailbox: i64,
    folder: &str,
    create: bool,
) -> Result<FolderRow> {
    let name = folder_name(folder);
    let query = format!("{FOLDER_SELECT} FOR UPDATE");
    if let Some(row) = c.query_opt(&query, &[&mailbox, &name]).await.map_err(db)? {
        return Ok(FolderRow::from_row(&row));
    }
    if !(create || name == "INBOX") {
        return Err(StoreError::NoSuchFolder(folder.into()));
    }
    make_folder(c, mailbox, name, None).await?;
    let row = c.query_one(&query, &[&mailbox, &name]).await.map_err(db)?;
    Ok(FolderRow::from_row(&row))
}

/// Makes a folder with a UIDVALIDITY no folder of the mailbox had (or the given one).
async fn make_folder(
    c: &impl GenericClient,
    mailbox: i64,
    name: &str,
    validity: Option<i64>,
) -> Result<()> {
    let validity = match validity {
        Some(v) => v,
        None => c
            .query_one(
                "UPDATE mailboxes SET last_validity =
                     greatest(last_validity + 1, extract(epoch FROM now())::bigint)
                 WHERE id = $1 RETURNING last_validity",
                &[&mailbox],
            )
            .await
            .map_err(db)?
            .get(0),
    };
    let made = c
        .execute(
            "INSERT INTO folders (mailbox, name, uid_validity) VALUES ($1, $2, $3)
             ON CONFLICT (mailbox, name) DO NOTHING",
            &[&mailbox, &name, &validity],
        )
        .await
        .map_err(db)?;
    if made == 0 {
        return Err(StoreError::Exists(name.into()));
    }
    Ok(())
}

/// Takes `n` UIDs and `n` mod-sequences: the first of each.
async fn allocate(c: &impl GenericClient, folder: i64, n: i64) -> Result<(i64, i64)> {
    let row = c
        .query_one(
            "UPDATE folders SET uid_next = uid_next + $2, highest_modseq = highest_modseq + $2
             WHERE id = $1 RETURNING uid_next - $2, highest_modseq - $2 + 1",
            &[&folder, &n],
        )
        .await
        .map_err(|e| {
            if e.code() == Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION) {
                StoreError::Io(std::io::Error::other("the folder has used every UID"))
            } else {
                db(e)
            }
        })?;
    Ok((row.get(0), row.get(1)))
}

/// Adds keywords to those the folder defines.
async fn define(c: &impl GenericClient, folder: &FolderRow, keywords: &Keywords) -> Result<()> {
    let new: Vec<String> = keywords
        .iter()
        .filter(|k| !folder.keywords.iter().any(|d| d.eq_ignore_ascii_case(k)))
        .map(str::to_string)
        .collect();
    if !new.is_empty() {
        c.execute(
            "UPDATE folders SET keywords = keywords || $2 WHERE id = $1",
            &[&folder.id, &new],
        )
        .await
        .map_err(db)?;
    }
    Ok(())
}

/// Stores a body: its bytes in the row, or where the body store keeps them.
async fn insert_body(
    c: &impl GenericClient,
    bodies: &dyn bodies::BodyStore,
    bytes: &[u8],
) -> Result<i64> {
    let row = match bodies.put(bytes)? {
        None => {
            c.query_one(
                "INSERT INTO bodies (bytes) VALUES ($1) RETURNING id",
                &[&bytes],
            )
            .await
        }
        Some(location) => {
            c.query_one(
                "INSERT INTO bodies (location) VALUES ($1) RETURNING id",
                &[&location],
            )
            .await
        }
    };
    Ok(row.map_err(db)?.get(0))
}

/// A body's bytes from its row: there, or at the location the body store gave.
fn body_bytes(
    bodies: &dyn bodies::BodyStore,
    bytes: Option<Vec<u8>>,
    location: Option<String>,
) -> Result<Vec<u8>> {
    match (bytes, location) {
        (Some(bytes), _) => Ok(bytes),
        (None, Some(location)) => bodies.get(&location),
        (None, None) => Err(StoreError::Gone("body".into())),
    }
}

#[allow(clippy::too_many_arguments)]
async fn insert_message(
    c: &impl GenericClient,
    folder: i64,
    uid: i64,
    body: i64,
    prepend: &[u8],
    size: i64,
    flags: Flags,
    keywords: &Keywords,
    received_at: i64,
    modseq: i64,
) -> Result<()> {
    c.execute(
        "INSERT INTO messages (folder, uid, body, prepend, size, flags, keywords, received_at, modseq)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        &[
            &folder,
            &uid,
            &body,
            &prepend,
            &size,
            &i32::from(flags.bits()),
            &keyword_list(keywords),
            &received_at,
            &modseq,
        ],
    )
    .await
    .map_err(db)?;
    Ok(())
}

/// Removes bodies no message points at any more. Returns the locations of those kept by the
/// body store, which it forgets once the transaction committed ([`PgStore::forget_bodies`]).
async fn drop_bodies(c: &impl GenericClient, bodies: &[i64]) -> Result<Vec<String>> {
    if bodies.is_empty() {
        return Ok(Vec::new());
    }
    let rows = c
        .query(
            "DELETE FROM bodies b WHERE b.id = ANY($1)
             AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.body = b.id)
             RETURNING b.location",
            &[&bodies],
        )
        .await
        .map_err(db)?;
    Ok(rows.iter().filter_map(|r| r.get(0)).collect())
}

fn uids(messages: &[&MessageInfo]) -> Vec<i64> {
    messages.iter().map(|m| i64::from(m.uid)).collect()
}

impl MailStore for PgStore {
    fn deliver(&self, batch: &[Delivery<'_>]) -> Vec<Result<()>> {
        // One transaction for the batch: one commit (one flush of the WAL) for all of it.
        let outcome = self.block(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db)?;
            let mut bodies: HashMap<*const u8, i64> = HashMap::new();
            for d in batch {
                let mailbox = mailbox_id(&tx, d.mailbox).await?;
                let folder = folder_row(&tx, mailbox, d.folder, true).await?;
                let fresh = tx
                    .execute(
                        "INSERT INTO deliveries (folder, delivery_id) VALUES ($1, $2)
                         ON CONFLICT DO NOTHING",
                        &[&folder.id, &d.delivery_id],
                    )
                    .await
                    .map_err(db)?;
                if fresh == 0 {
                    continue; // stored by an earlier attempt
                }
                let body = match bodies.get(&d.message.as_ptr()) {
                    Some(id) => *id,
                    None => {
                        let id = insert_body(&tx, &*self.bodies, d.message).await?;
                        bodies.insert(d.message.as_ptr(), id);
                        id
                    }
                };
                let (uid, modseq) = allocate(&tx, folder.id, 1).await?;
                let size = (d.prepend.len() + d.message.len()) as i64;
                insert_message(
                    &tx,
                    folder.id,
                    uid,
                    body,
                    d.prepend,
                    size,
                    Flags::empty(),
                    &Keywords::new(),
                    d.received_at,
                    modseq,
                )
                .await?;
            }
            tx.commit().await.map_err(db)
        });
        match outcome {
            Ok(()) => batch.iter().map(|_| Ok(())).collect(),
            Err(err) => batch.iter().map(|_| Err(err.again())).collect(),
        }
    }

    fn snapshot(&self, mailbox: &str, folder: &str) -> Result<FolderSnapshot> {
        self.block(async {
            let mut client = self.client().await?;
            let (mailbox, _) = existing_folder(&mut client, mailbox, folder).await?;
            // One snapshot of the database for the folder's row and its messages (repeatable
            // read), so a message committed in between is in both or neither, without locking
            // out writers.
            let tx = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(db)?;
            let row = folder_view(&tx, mailbox, folder)
                .await?
                .ok_or_else(|| StoreError::NoSuchFolder(folder.into()))?;
            let rows = tx
                .query(
                    "SELECT uid, size, flags, keywords, received_at, modseq FROM messages
                     WHERE folder = $1 ORDER BY uid",
                    &[&row.id],
                )
                .await
                .map_err(db)?;
            tx.commit().await.map_err(db)?;
            let mut defined = row.keywords.clone();
            let messages = rows
                .iter()
                .map(|r| {
                    let uid: i64 = r.get(0);
                    let keywords: Vec<String> = r.get(3);
                    for k in &keywords {
                        if !defined.iter().any(|d| d.eq_ignore_ascii_case(k)) {
                            defined.push(k.clone());
                        }
                    }
                    MessageInfo {
                        uid: uid as u32,
                        key: uid.to_string(),
                        handle: MessageHandle::new(uid.to_string()),
                        size: r.get::<_, i64>(1) as u64,
                        flags: Flags::from_bits(r.get::<_, i32>(2) as u8),
                        keywords: Keywords::from_names(keywords),
                        received_at: r.get(4),
                        modseq: r.get::<_, i64>(5) as u64,
                    }
                })
                .collect();
            Ok(FolderSnapshot {
                uid_validity: row.validity as u32,
                uid_next: row.uid_next.min(u32::MAX as i64) as u32,
                messages,
                keywords: defined,
                more_keywords: true,
                highest_modseq: row.highest as u64,
            })
        })
    }

    fn read_header(
        &self,
        mailbox: &str,
        folder: &str,
        message: &MessageInfo,
    ) -> Result<std::sync::Arc<[u8]>> {
        self.read_headers(mailbox, folder, &[message])
            .pop()
            .expect("one answer per message")
    }

    fn read_headers(
        &self,
        mailbox: &str,
        folder: &str,
        messages: &[&MessageInfo],
    ) -> Vec<Result<std::sync::Arc<[u8]>>> {
        let found = self.block(async {
            let client = self.client().await?;
            let id = mailbox_id(&client, mailbox).await?;
            let folder_id = folder_view(&client, id, folder)
                .await?
                .ok_or_else(|| StoreError::NoSuchFolder(folder.into()))?
                .id;
            let mut found: HashMap<u32, std::sync::Arc<[u8]>> = HashMap::new();
            let mut missing = Vec::new();
            {
                let cache = self.headers.lock().expect("header cache");
                for m in messages {
                    match cache.get(&folder_id, &m.key) {
                        Some(header) => {
                            found.insert(m.uid, header);
                        }
                        None => missing.push(i64::from(m.uid)),
                    }
                }
            }
            if missing.is_empty() {
                return Ok(found);
            }
            // One round trip for the batch, reading only the start of each body: a header
            // longer than that is read whole, alone.
            const PREFIX: i32 = 64 * 1024;
            let rows = client
                .query(
                    "SELECT m.uid, m.prepend, substring(b.bytes FROM 1 FOR $3), length(b.bytes),
                            b.location
                     FROM messages m JOIN bodies b ON b.id = m.body
                     WHERE m.folder = $1 AND m.uid = ANY($2)",
                    &[&folder_id, &missing, &PREFIX],
                )
                .await
                .map_err(db)?;
            for row in rows {
                let uid: i64 = row.get(0);
                let mut bytes: Vec<u8> = row.get(1);
                let (part, whole): (Vec<u8>, usize) = match row.get::<_, Option<Vec<u8>>>(2) {
                    Some(part) => (part, row.get::<_, i32>(3) as usize),
                    None => {
                        // Kept by the body store: read whole (its headers are what is cached).
                        let body = body_bytes(&*self.bodies, None, row.get(4))?;
                        let whole = body.len();
                        (body, whole)
                    }
                };
                bytes.extend_from_slice(&part);
                let mut end = crate::message::body_offset(&bytes);
                if end == bytes.len() && part.len() < whole {
                    let row = client
                        .query_one(
                            "SELECT m.prepend, b.bytes, b.location FROM messages m
                             JOIN bodies b ON b.id = m.body WHERE m.folder = $1 AND m.uid = $2",
                            &[&folder_id, &uid],
                        )
                        .await
                        .map_err(db)?;
                    bytes = row.get(0);
                    bytes.extend(body_bytes(&*self.bodies, row.get(1), row.get(2))?);
                    end = crate::message::body_offset(&bytes);
                }
                bytes.truncate(end);
                found.insert(uid as u32, std::sync::Arc::from(bytes));
            }
            let mut cache = self.headers.lock().expect("header cache");
            for m in messages {
                if let Some(header) = found.get(&m.uid) {
                    cache.put(&folder_id, &m.key, header.clone());
                }
            }
            Ok(found)
        });
        match found {
            Ok(found) => messages
                .iter()
                .map(|m| {
                    found
                        .get(&m.uid)
                        .cloned()
                        .ok_or_else(|| StoreError::Gone(m.key.clone()))
                })
                .collect(),
            Err(err) => messages.iter().map(|_| Err(err.again())).collect(),
        }
    }

    fn read(&self, mailbox: &str, folder: &str, message: &MessageInfo) -> Result<Vec<u8>> {
        self.block(async {
            let client = self.client().await?;
            let row = client
                .query_opt(
                    "SELECT m.prepend, b.bytes, b.location FROM messages m
                     JOIN folders f ON f.id = m.folder
                     JOIN mailboxes x ON x.id = f.mailbox
                     JOIN bodies b ON b.id = m.body
                     WHERE x.name = $1 AND f.name = $2 AND m.uid = $3",
                    &[
                        &mailbox.to_ascii_lowercase(),
                        &folder_name(folder),
                        &i64::from(message.uid),
                    ],
                )
                .await
                .map_err(db)?
                .ok_or_else(|| StoreError::Gone(message.key.clone()))?;
            let mut bytes: Vec<u8> = row.get(0);
            bytes.extend(body_bytes(&*self.bodies, row.get(1), row.get(2))?);
            Ok(bytes)
        })
    }

    fn change_flags(
        &self,
        mailbox: &str,
        folder: &str,
        messages: &[&MessageInfo],
        change: &FlagChange,
        unchanged_since: Option<u64>,
    ) -> Result<FlagOutcome> {
        self.block(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db)?;
            let mailbox = mailbox_id(&tx, mailbox).await?;
            let row = folder_row(&tx, mailbox, folder, false).await?;
            let rows = tx
                .query(
                    "SELECT uid, flags, keywords, modseq FROM messages
                     WHERE folder = $1 AND uid = ANY($2) ORDER BY uid FOR UPDATE",
                    &[&row.id, &uids(messages)],
                )
                .await
                .map_err(db)?;
            let mut outcome = FlagOutcome::default();
            let mut changed = Vec::new();
            for r in &rows {
                let uid: i64 = r.get(0);
                let flags = Flags::from_bits(r.get::<_, i32>(1) as u8);
                let keywords = Keywords::from_names(r.get::<_, Vec<String>>(2));
                let modseq = r.get::<_, i64>(3) as u64;
                if unchanged_since.is_some_and(|limit| modseq > limit) {
                    outcome.refused.push(uid as u32);
                    continue;
                }
                let (new_flags, new_keywords) = change.apply(flags, &keywords);
                if new_flags == flags && new_keywords == keywords {
                    outcome.updated.push(Updated {
                        uid: uid as u32,
                        flags,
                        keywords,
                        modseq,
                    });
                } else {
                    changed.push((uid, new_flags, new_keywords));
                }
            }
            if !changed.is_empty() {
                let first = tx
                    .query_one(
                        "UPDATE folders SET highest_modseq = highest_modseq + $2 WHERE id = $1
                         RETURNING highest_modseq - $2 + 1",
                        &[&row.id, &(changed.len() as i64)],
                    )
                    .await
                    .map_err(db)?
                    .get::<_, i64>(0);
                let mut all = Keywords::new();
                for (i, (uid, flags, keywords)) in changed.into_iter().enumerate() {
                    let modseq = first + i as i64;
                    tx.execute(
                        "UPDATE messages SET flags = $3, keywords = $4, modseq = $5
                         WHERE folder = $1 AND uid = $2",
                        &[
                            &row.id,
                            &uid,
                            &i32::from(flags.bits()),
                            &keyword_list(&keywords),
                            &modseq,
                        ],
                    )
                    .await
                    .map_err(db)?;
                    all = all.union(&keywords);
                    outcome.updated.push(Updated {
                        uid: uid as u32,
                        flags,
                        keywords,
                        modseq: modseq as u64,
                    });
                }
                if change.mode != FlagMode::Remove {
                    define(&tx, &row, &all).await?;
                }
                outcome.updated.sort_by_key(|u| u.uid);
            }
            tx.commit().await.map_err(db)?;
            Ok(outcome)
        })
    }

    fn append(
        &self,
        mailbox: &str,
        folder: &str,
        message: &[u8],
        flags: Flags,
        keywords: &Keywords,
        received_at: i64,
    ) -> Result<(u32, u32)> {
        self.block(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db)?;
            let mailbox = mailbox_id(&tx, mailbox).await?;
            let row = folder_row(&tx, mailbox, folder, false).await?;
            let body = insert_body(&tx, &*self.bodies, message).await?;
            let (uid, modseq) = allocate(&tx, row.id, 1).await?;
            insert_message(
                &tx,
                row.id,
                uid,
                body,
                b"",
                message.len() as i64,
                flags,
                keywords,
                received_at,
                modseq,
            )
            .await?;
            define(&tx, &row, keywords).await?;
            tx.commit().await.map_err(db)?;
            Ok((row.validity as u32, uid as u32))
        })
    }

    fn copy(
        &self,
        mailbox: &str,
        folder: &str,
        messages: &[&MessageInfo],
        target: &str,
    ) -> Result<(u32, Vec<(u32, u32)>)> {
        self.block(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db)?;
            let mailbox = mailbox_id(&tx, mailbox).await?;
            let source = folder_row(&tx, mailbox, folder, false).await?;
            let dest = if folder_name(folder) == folder_name(target) {
                None
            } else {
                Some(folder_row(&tx, mailbox, target, false).await?)
            };
            let dest_row = dest.as_ref().unwrap_or(&source);
            let rows = tx
                .query(
                    "SELECT uid, body, prepend, size, flags, keywords, received_at FROM messages
                     WHERE folder = $1 AND uid = ANY($2) ORDER BY uid",
                    &[&source.id, &uids(messages)],
                )
                .await
                .map_err(db)?;
            let mut pairs = Vec::new();
            if !rows.is_empty() {
                let (first_uid, first_modseq) =
                    allocate(&tx, dest_row.id, rows.len() as i64).await?;
                let mut all = Keywords::new();
                for (i, r) in rows.iter().enumerate() {
                    let keywords = Keywords::from_names(r.get::<_, Vec<String>>(5));
                    let uid = first_uid + i as i64;
                    // The body is shared, not copied.
                    insert_message(
                        &tx,
                        dest_row.id,
                        uid,
                        r.get(1),
                        r.get::<_, &[u8]>(2),
                        r.get(3),
                        Flags::from_bits(r.get::<_, i32>(4) as u8),
                        &keywords,
                        r.get(6),
                        first_modseq + i as i64,
                    )
                    .await?;
                    all = all.union(&keywords);
                    pairs.push((r.get::<_, i64>(0) as u32, uid as u32));
                }
                define(&tx, dest_row, &all).await?;
            }
            tx.commit().await.map_err(db)?;
            Ok((dest_row.validity as u32, pairs))
        })
    }

    fn folders(&self, mailbox: &str) -> Result<Vec<String>> {
        self.block(async {
            let client = self.client().await?;
            let rows = client
                .query(
                    "SELECT f.name FROM folders f JOIN mailboxes x ON x.id = f.mailbox
                     WHERE x.name = $1 AND f.name <> 'INBOX'",
                    &[&mailbox.to_ascii_lowercase()],
                )
                .await
                .map_err(db)?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    fn create_folder(&self, mailbox: &str, folder: &str) -> Result<()> {
        if folder.eq_ignore_ascii_case("INBOX") || !super::valid_folder_name(folder) {
            return Err(StoreError::InvalidName(folder.into()));
        }
        self.block(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db)?;
            let mailbox = mailbox_id(&tx, mailbox).await?;
            make_folder(&tx, mailbox, folder, None).await?;
            tx.commit().await.map_err(db)
        })
    }

    fn delete_folder(&self, mailbox: &str, folder: &str) -> Result<()> {
        if folder.eq_ignore_ascii_case("INBOX") {
            return Err(StoreError::InvalidName(folder.into()));
        }
        self.block(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db)?;
            let mailbox = mailbox_id(&tx, mailbox).await?;
            let row = folder_row(&tx, mailbox, folder, false).await?;
            let bodies: Vec<i64> = tx
                .query(
                    "DELETE FROM messages WHERE folder = $1 RETURNING body",
                    &[&row.id],
                )
                .await
                .map_err(db)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            tx.execute("DELETE FROM folders WHERE id = $1", &[&row.id])
                .await
                .map_err(db)?;
            tx.execute(
                "DELETE FROM metadata WHERE mailbox = $1 AND folder = $2",
                &[&mailbox, &row.id],
            )
            .await
            .map_err(db)?;
            let dropped = drop_bodies(&tx, &bodies).await?;
            tx.commit().await.map_err(db)?;
            self.forget_bodies(&dropped);
            Ok(())
        })
    }

    fn rename_folder(&self, mailbox: &str, from: &str, to: &str) -> Result<()> {
        if to.eq_ignore_ascii_case("INBOX") || !super::valid_folder_name(to) {
            return Err(StoreError::InvalidName(to.into()));
        }
        if from.eq_ignore_ascii_case("INBOX") {
            // RFC 9051 §6.3.6: INBOX's messages move to the new folder; INBOX stays, empty.
            self.create_folder(mailbox, to)?;
            let listed = self.snapshot(mailbox, "INBOX")?;
            let all: Vec<&MessageInfo> = listed.messages.iter().collect();
            self.copy(mailbox, "INBOX", &all, to)?;
            return self.remove(mailbox, "INBOX", &all);
        }
        self.block(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db)?;
            let mailbox = mailbox_id(&tx, mailbox).await?;
            folder_row(&tx, mailbox, from, false).await?;
            let taken = tx
                .query_opt(
                    "SELECT 1 FROM folders WHERE mailbox = $1 AND name = $2",
                    &[&mailbox, &to],
                )
                .await
                .map_err(db)?;
            if taken.is_some() {
                return Err(StoreError::Exists(to.into()));
            }
            let prefix = format!("{from}/");
            tx.execute(
                "UPDATE folders SET name = $3 || substr(name, length($2) + 1)
                 WHERE mailbox = $1 AND (name = $2 OR left(name, length($4)) = $4)",
                &[&mailbox, &from, &to, &prefix],
            )
            .await
            .map_err(db)?;
            tx.commit().await.map_err(db)
        })
    }

    fn subscriptions(&self, mailbox: &str) -> Result<Vec<String>> {
        self.block(async {
            let client = self.client().await?;
            let row = client
                .query_opt(
                    "SELECT subscriptions FROM mailboxes WHERE name = $1",
                    &[&mailbox.to_ascii_lowercase()],
                )
                .await
                .map_err(db)?;
            Ok(row.map(|r| r.get(0)).unwrap_or_default())
        })
    }

    fn set_subscribed(&self, mailbox: &str, folder: &str, subscribed: bool) -> Result<()> {
        self.block(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db)?;
            let mailbox = mailbox_id(&tx, mailbox).await?;
            tx.execute(
                "UPDATE mailboxes SET subscriptions = array_remove(subscriptions, $2::text) WHERE id = $1",
                &[&mailbox, &folder],
            )
            .await
            .map_err(db)?;
            if subscribed {
                tx.execute(
                    "UPDATE mailboxes SET subscriptions = array_append(subscriptions, $2::text) WHERE id = $1",
                    &[&mailbox, &folder],
                )
                .await
                .map_err(db)?;
            }
            tx.commit().await.map_err(db)
        })
    }

    fn recent_boundary(
        &self,
        mailbox: &str,
        folder: &str,
        validity: u32,
        claim: Option<u32>,
    ) -> Result<u32> {
        self.block(async {
            let mut client = self.client().await?;
            let (_, id) = existing_folder(&mut client, mailbox, folder).await?;
            let boundary_of = |r: tokio_postgres::Row| {
                let (known, uid): (i64, i64) = (r.get(0), r.get(1));
                if known == i64::from(validity) {
                    uid
                } else {
                    0
                }
            };
            let select = "SELECT recent_validity, recent_uid FROM folders WHERE id = $1";
            // Nothing new to claim (the common case): a plain read.
            let seen = boundary_of(client.query_one(select, &[&id]).await.map_err(db)?);
            if claim.is_none_or(|u| i64::from(u) <= seen) {
                return Ok(seen as u32);
            }
            // A claim: under the row's lock, so two sessions never both claim the same messages.
            let tx = client.transaction().await.map_err(db)?;
            let r = tx
                .query_one(&format!("{select} FOR UPDATE"), &[&id])
                .await
                .map_err(db)?;
            let boundary = boundary_of(r);
            if let Some(upto) = claim.filter(|u| i64::from(*u) > boundary) {
                tx.execute(
                    "UPDATE folders SET recent_validity = $2, recent_uid = $3 WHERE id = $1",
                    &[&id, &i64::from(validity), &i64::from(upto)],
                )
                .await
                .map_err(db)?;
            }
            tx.commit().await.map_err(db)?;
            Ok(boundary as u32)
        })
    }

    fn metadata(&self, mailbox: &str, folder: Option<&str>) -> Result<BTreeMap<String, Vec<u8>>> {
        self.block(async {
            let mut client = self.client().await?;
            let (mailbox, folder) = match folder {
                Some(folder) => existing_folder(&mut client, mailbox, folder).await?,
                None => (mailbox_id(&client, mailbox).await?, 0),
            };
            let rows = client
                .query(
                    "SELECT name, value FROM metadata WHERE mailbox = $1 AND folder = $2",
                    &[&mailbox, &folder],
                )
                .await
                .map_err(db)?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    fn set_metadata(
        &self,
        mailbox: &str,
        folder: Option<&str>,
        changes: &[(String, Option<Vec<u8>>)],
    ) -> Result<()> {
        self.block(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db)?;
            let mailbox = mailbox_id(&tx, mailbox).await?;
            let folder = match folder {
                Some(folder) => folder_row(&tx, mailbox, folder, false).await?.id,
                None => 0,
            };
            for (name, value) in changes {
                match value {
                    Some(value) => {
                        tx.execute(
                            "INSERT INTO metadata (mailbox, folder, name, value) VALUES ($1, $2, $3, $4)
                             ON CONFLICT (mailbox, folder, name) DO UPDATE SET value = EXCLUDED.value",
                            &[&mailbox, &folder, name, value],
                        )
                        .await
                    }
                    None => {
                        tx.execute(
                            "DELETE FROM metadata WHERE mailbox = $1 AND folder = $2 AND name = $3",
                            &[&mailbox, &folder, name],
                        )
                        .await
                    }
                }
                .map_err(db)?;
            }
            tx.commit().await.map_err(db)
        })
    }

    fn usage(&self, mailbox: &str) -> Result<Usage> {
        self.block(async {
            let client = self.client().await?;
            let r = client
                .query_one(
                    "SELECT count(m.uid), coalesce(sum(m.size), 0)::bigint FROM messages m
                     JOIN folders f ON f.id = m.folder JOIN mailboxes x ON x.id = f.mailbox
                     WHERE x.name = $1",
                    &[&mailbox.to_ascii_lowercase()],
                )
                .await
                .map_err(db)?;
            Ok(Usage {
                messages: r.get::<_, i64>(0) as u64,
                bytes: r.get::<_, i64>(1) as u64,
            })
        })
    }

    fn import(
        &self,
        mailbox: &str,
        folder: &str,
        numbers: ImportedFolder,
        messages: &[Imported<'_>],
    ) -> Result<()> {
        if !super::valid_folder_name(folder) {
            return Err(StoreError::InvalidName(folder.into()));
        }
        self.block(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db)?;
            let mailbox = mailbox_id(&tx, mailbox).await?;
            let validity = i64::from(numbers.uid_validity);
            let name = folder_name(folder);
            let exists = tx
                .query_opt(
                    "SELECT id, uid_validity FROM folders WHERE mailbox = $1 AND name = $2 FOR UPDATE",
                    &[&mailbox, &name],
                )
                .await
                .map_err(db)?;
            match exists {
                None => make_folder(&tx, mailbox, name, Some(validity)).await?,
                Some(r) if r.get::<_, i64>(1) != validity => {
                    let id: i64 = r.get(0);
                    let used = tx
                        .query_opt("SELECT 1 FROM messages WHERE folder = $1 LIMIT 1", &[&id])
                        .await
                        .map_err(db)?;
                    if used.is_some() {
                        return Err(StoreError::Exists(folder.into()));
                    }
                    tx.execute(
                        "UPDATE folders SET uid_validity = $2, uid_next = 1 WHERE id = $1",
                        &[&id, &validity],
                    )
                    .await
                    .map_err(db)?;
                }
                Some(_) => {}
            }
            let row = folder_row(&tx, mailbox, folder, false).await?;
            let present: Vec<i64> = tx
                .query(
                    "SELECT uid FROM messages WHERE folder = $1 ORDER BY uid",
                    &[&row.id],
                )
                .await
                .map_err(db)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let mut last = present.last().copied().unwrap_or(0);
            let mut modseq = row.highest;
            let mut all = Keywords::new();
            for m in messages {
                let uid = i64::from(m.uid);
                if present.binary_search(&uid).is_ok() {
                    continue; // brought by an earlier run
                }
                if uid <= last {
                    return Err(StoreError::Exists(format!("{folder}: UID {uid}")));
                }
                let body = insert_body(&tx, &*self.bodies, m.message).await?;
                modseq += 1;
                insert_message(
                    &tx,
                    row.id,
                    uid,
                    body,
                    b"",
                    m.message.len() as i64,
                    m.flags,
                    m.keywords,
                    m.received_at,
                    modseq,
                )
                .await?;
                all = all.union(m.keywords);
                last = uid;
            }
            tx.execute(
                "UPDATE folders SET uid_next = greatest(uid_next, $2::bigint, $3::bigint + 1),
                     highest_modseq = greatest($4::bigint, $5::bigint) WHERE id = $1",
                &[
                    &row.id,
                    &i64::from(numbers.uid_next),
                    &last,
                    &modseq,
                    &(numbers.highest_modseq as i64),
                ],
            )
            .await
            .map_err(db)?;
            define(&tx, &row, &all).await?;
            tx.commit().await.map_err(db)
        })
    }

    fn remove(&self, mailbox: &str, folder: &str, messages: &[&MessageInfo]) -> Result<()> {
        self.block(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db)?;
            let mailbox = mailbox_id(&tx, mailbox).await?;
            let row = folder_row(&tx, mailbox, folder, false).await?;
            let bodies: Vec<i64> = tx
                .query(
                    "DELETE FROM messages WHERE folder = $1 AND uid = ANY($2) RETURNING body",
                    &[&row.id, &uids(messages)],
                )
                .await
                .map_err(db)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let mut dropped = Vec::new();
            if !bodies.is_empty() {
                // An expunge is a change too (RFC 7162 §3.2.10).
                tx.execute(
                    "UPDATE folders SET highest_modseq = highest_modseq + 1 WHERE id = $1",
                    &[&row.id],
                )
                .await
                .map_err(db)?;
                dropped = drop_bodies(&tx, &bodies).await?;
            }
            tx.commit().await.map_err(db)?;
            self.forget_bodies(&dropped);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_name_mailbox_and_folder_and_skip_our_own() {
        assert_eq!(
            parse_notice("postern-1-ab\talice@example.test\tINBOX", "postern-2-cd"),
            Some(Notice::Changed {
                mailbox: "alice@example.test".into(),
                folder: Some("INBOX".into())
            })
        );
        // Empty folder: the folder list or subscriptions; a tab inside a folder name stays.
        assert_eq!(
            parse_notice("x\tbob@example.test\t", "y"),
            Some(Notice::Changed {
                mailbox: "bob@example.test".into(),
                folder: None
            })
        );
        assert_eq!(
            parse_notice("x\tbob@example.test\ta\tb", "y"),
            Some(Notice::Changed {
                mailbox: "bob@example.test".into(),
                folder: Some("a\tb".into())
            })
        );
        assert_eq!(parse_notice("me\tbob@example.test\tINBOX", "me"), None);
        assert_eq!(parse_notice("garbage", "me"), None);
    }
}
