//! The database schema, versioned: each entry of [`MIGRATIONS`] moves the schema one version on,
//! in one transaction, and `schema_version` says which ran. `postern db migrate` (and the store
//! at start, when asked) runs those not yet run; nothing is ever edited in place.

/// Version N is `MIGRATIONS[N - 1]`.
pub const MIGRATIONS: &[&str] = &[
    // 1: mailboxes. UIDs are allocated from folders.uid_next in the transaction that stores the
    // message (the folder row is locked), mod-sequences from folders.highest_modseq the same way;
    // both only grow. A message's bytes are a body stored once (a copy, or one message to many
    // recipients, points at the same body) and the trace fields prepended for its recipient.
    r#"
    CREATE TABLE mailboxes (
        id bigserial PRIMARY KEY,
        name text NOT NULL UNIQUE,
        last_validity bigint NOT NULL DEFAULT 0,
        subscriptions text[] NOT NULL DEFAULT '{}'
    );
    CREATE TABLE folders (
        id bigserial PRIMARY KEY,
        mailbox bigint NOT NULL REFERENCES mailboxes (id) ON DELETE CASCADE,
        name text NOT NULL,
        uid_validity bigint NOT NULL CHECK (uid_validity BETWEEN 1 AND 4294967295),
        uid_next bigint NOT NULL DEFAULT 1 CHECK (uid_next BETWEEN 1 AND 4294967296),
        highest_modseq bigint NOT NULL DEFAULT 1 CHECK (highest_modseq >= 1),
        recent_validity bigint NOT NULL DEFAULT 0,
        recent_uid bigint NOT NULL DEFAULT 0,
        keywords text[] NOT NULL DEFAULT '{}',
        UNIQUE (mailbox, name)
    );
    CREATE TABLE bodies (
        id bigserial PRIMARY KEY,
        bytes bytea NOT NULL
    );
    CREATE TABLE messages (
        folder bigint NOT NULL REFERENCES folders (id) ON DELETE CASCADE,
        uid bigint NOT NULL CHECK (uid BETWEEN 1 AND 4294967295),
        body bigint NOT NULL REFERENCES bodies (id),
        prepend bytea NOT NULL DEFAULT '',
        size bigint NOT NULL,
        flags integer NOT NULL DEFAULT 0,
        keywords text[] NOT NULL DEFAULT '{}',
        received_at bigint NOT NULL,
        modseq bigint NOT NULL CHECK (modseq >= 1),
        PRIMARY KEY (folder, uid)
    );
    CREATE INDEX messages_body ON messages (body);
    -- Delivery ids stored, kept after the message is removed: a retried delivery never brings
    -- back a message the user deleted.
    CREATE TABLE deliveries (
        folder bigint NOT NULL REFERENCES folders (id) ON DELETE CASCADE,
        delivery_id text NOT NULL,
        PRIMARY KEY (folder, delivery_id)
    );
    -- RFC 5464 annotations; folder 0 is the mailbox's own.
    CREATE TABLE metadata (
        mailbox bigint NOT NULL REFERENCES mailboxes (id) ON DELETE CASCADE,
        folder bigint NOT NULL DEFAULT 0,
        name text NOT NULL,
        value bytea NOT NULL,
        PRIMARY KEY (mailbox, folder, name)
    );
    "#,
    // 2: change notifications. A change to a folder (a message stored, flagged or expunged:
    // each moves uid_next or highest_modseq; a folder made, renamed or deleted) or to a
    // mailbox's subscriptions is announced on channel `postern_changes` when its transaction
    // commits, as "<writer's application_name>\t<mailbox>\t<folder, or empty for the folder
    // list>", so IMAP sessions on every node learn of it (`PgStore::listen`). PostgreSQL folds
    // identical notifications of one transaction into one. A claim of \Recent changes neither
    // number and announces nothing.
    r#"
    CREATE FUNCTION postern_folder_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        box text;
        folder text := '';
        owner bigint;
    BEGIN
        IF TG_OP = 'DELETE' THEN owner := OLD.mailbox; ELSE owner := NEW.mailbox; END IF;
        IF TG_OP = 'UPDATE' THEN
            IF NEW.name IS DISTINCT FROM OLD.name THEN
                folder := '';
            ELSIF NEW.uid_next IS DISTINCT FROM OLD.uid_next
                OR NEW.highest_modseq IS DISTINCT FROM OLD.highest_modseq
                OR NEW.uid_validity IS DISTINCT FROM OLD.uid_validity
                OR NEW.keywords IS DISTINCT FROM OLD.keywords THEN
                folder := NEW.name;
            ELSE
                RETURN NULL;
            END IF;
        END IF;
        SELECT name INTO box FROM mailboxes WHERE id = owner;
        IF box IS NOT NULL THEN
            PERFORM pg_notify('postern_changes',
                current_setting('application_name') || E'\t' || box || E'\t' || folder);
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER folders_changed AFTER INSERT OR UPDATE OR DELETE ON folders
        FOR EACH ROW EXECUTE FUNCTION postern_folder_changed();
    CREATE FUNCTION postern_subscriptions_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('postern_changes',
            current_setting('application_name') || E'\t' || NEW.name || E'\t');
        RETURN NULL;
    END $$;
    CREATE TRIGGER subscriptions_changed AFTER UPDATE OF subscriptions ON mailboxes
        FOR EACH ROW WHEN (NEW.subscriptions IS DISTINCT FROM OLD.subscriptions)
        EXECUTE FUNCTION postern_subscriptions_changed();
    "#,
    // 3: the user directory (`auth::directory`), shared by every node. directory_version moves
    // on with every change to users or aliases, by trigger (an edit made with psql counts too);
    // nodes read it once a second and reload when it moved.
    r#"
    CREATE TABLE users (
        address text PRIMARY KEY CHECK (address = lower(address)),
        password text NOT NULL,
        quota_mb bigint CHECK (quota_mb >= 0),
        quota_messages bigint CHECK (quota_messages >= 0),
        disabled boolean NOT NULL DEFAULT false
    );
    CREATE TABLE aliases (
        alias text PRIMARY KEY,
        target text NOT NULL
    );
    CREATE TABLE directory_version (version bigint NOT NULL);
    INSERT INTO directory_version VALUES (1);
    CREATE FUNCTION postern_directory_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE directory_version SET version = version + 1;
        RETURN NULL;
    END $$;
    CREATE TRIGGER users_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON users
        FOR EACH STATEMENT EXECUTE FUNCTION postern_directory_changed();
    CREATE TRIGGER aliases_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON aliases
        FOR EACH STATEMENT EXECUTE FUNCTION postern_directory_changed();
    "#,
    // 4: the plugins' kv namespaces, shared by every node (`plugin::kv`). kv_usage holds each
    // namespace's bytes (keys and values, expired or not until purged) and its row is locked by
    // every write, which serialises a namespace's writers across nodes: counters are atomic.
    r#"
    CREATE TABLE kv (
        namespace text NOT NULL,
        key text NOT NULL,
        value bytea NOT NULL,
        expires_ms bigint,
        PRIMARY KEY (namespace, key)
    );
    CREATE INDEX kv_expiry ON kv (namespace, expires_ms) WHERE expires_ms IS NOT NULL;
    CREATE TABLE kv_usage (
        namespace text PRIMARY KEY,
        bytes bigint NOT NULL DEFAULT 0
    );
    "#,
    // 5: the shared queue (`queue::spool`, `[database] queue = true`). A message and its
    // envelope are one row, committed before the 250. The node delivering it holds a lease
    // (lease_owner, its application_name; lease_until, renewed while it lives); a lease that ran
    // out is taken by another node with FOR UPDATE SKIP LOCKED, so a dead node's messages are
    // delivered by the others. state holds the per-recipient outcomes (`relay::state`), so the
    // node that takes a message over does not send a recipient a second copy.
    r#"
    CREATE TABLE queue (
        id text PRIMARY KEY,
        envelope text NOT NULL,
        message bytea NOT NULL,
        state text,
        lease_owner text NOT NULL,
        lease_until timestamptz NOT NULL
    );
    CREATE INDEX queue_lease ON queue (lease_until);
    CREATE INDEX queue_owner ON queue (lease_owner);
    "#,
    // 6: bodies kept outside the database (`store::postgres::bodies`): a row holds the bytes
    // or the location its body store gave them, one of the two.
    r#"
    ALTER TABLE bodies ALTER COLUMN bytes DROP NOT NULL;
    ALTER TABLE bodies ADD COLUMN location text;
    ALTER TABLE bodies ADD CONSTRAINT bodies_bytes_or_location
        CHECK ((bytes IS NULL) <> (location IS NULL));
    "#,
    // 7: local domains added while the server runs (`postern domain add`), shared by every
    // node, beside the configuration's; a change moves directory_version on like users'.
    r#"
    CREATE TABLE domains (name text PRIMARY KEY);
    CREATE TRIGGER domains_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON domains
        FOR EACH STATEMENT EXECUTE FUNCTION postern_directory_changed();
    "#,
];
