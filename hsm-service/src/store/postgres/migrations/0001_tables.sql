-- Schema 1: one key-value table per store::uow::Table, plus the audit chains.
--
-- Keys are bytea, not text: they are UTF-8 strings, but some contain NUL separators
-- ("tenant NUL id"), which PostgreSQL's text type cannot hold; bytea compares bytewise
-- (memcmp), which is exactly the order of redb's &str keys and of Rust's str, whatever
-- the database's collation.
CREATE TABLE tenant_credentials (k bytea PRIMARY KEY, v bytea NOT NULL);
CREATE TABLE evidence (k bytea PRIMARY KEY, v bytea NOT NULL);
CREATE TABLE evidence_expiry (k bytea PRIMARY KEY, v bytea NOT NULL);
CREATE TABLE meta (k bytea PRIMARY KEY, v bytea NOT NULL);
CREATE TABLE signing_keys (k bytea PRIMARY KEY, v bytea NOT NULL);
CREATE TABLE ceremonies (k bytea PRIMARY KEY, v bytea NOT NULL);
CREATE TABLE ceremony_keys (k bytea PRIMARY KEY, v bytea NOT NULL);

-- One hash chain per service instance (store.instance); a chain's records are numbered
-- from 1 without gaps by the audit module; the primary key refuses a taken seq, so two
-- writers of one chain cannot both commit. Chain names are validated ASCII; COLLATE "C"
-- makes their order bytewise.
CREATE TABLE audit_log (
    chain text COLLATE "C" NOT NULL,
    seq bigint NOT NULL CHECK (seq >= 0),
    line bytea NOT NULL,
    PRIMARY KEY (chain, seq)
);
