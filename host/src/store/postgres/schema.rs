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
];
