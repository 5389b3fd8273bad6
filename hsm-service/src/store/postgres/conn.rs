//! One PostgreSQL connection with its statement cache, the pool manager that makes them,
//! the queries both the committer and the readers run, and the mapping of PostgreSQL
//! errors to [`StoreError`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{Client, Row, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::PgOptions;
use crate::store::uow::{KeyRange, Table};
use crate::store::{Rollback, StoreError};

/// Everything needed to open a session: the parsed URL with the password and session
/// settings applied, and the TLS connector (used only when `ca_file` is set; otherwise
/// the SSL mode is `disable` and the connector is never called).
pub(super) struct ConnectInfo {
    config: postgres::Config,
    tls: MakeRustlsConnect,
    /// `store.ca_file`, for the messages of a failed TLS handshake.
    ca_file: Option<std::path::PathBuf>,
}

impl ConnectInfo {
    pub(super) fn new(opts: &PgOptions) -> Result<ConnectInfo, StoreError> {
        let mut config = parse_url(&opts.url).map_err(StoreError::Invalid)?;
        if let Some(password) = &opts.password {
            use secrecy::ExposeSecret;
            config.password(password.expose_secret().as_bytes());
        }
        let timeout_ms = opts.statement_timeout.as_millis().max(1);
        // Session settings as start-up parameters, so every session (committer and pool)
        // has them from its first statement: synchronous_commit = on makes COMMIT wait
        // for the WAL flush (an acknowledged ACCEPTED survives a crash of the database
        // host), whatever the server's or the role's default says; the statement timeout
        // bounds a statement waiting on a row lock another instance holds.
        config.options(&format!(
            "-c synchronous_commit=on -c statement_timeout={timeout_ms} \
             -c idle_in_transaction_session_timeout={}",
            timeout_ms.saturating_mul(4).max(10_000)
        ));
        config.application_name(&format!("hsm-service/{}", opts.instance));
        config.connect_timeout(opts.connect_timeout);
        // A database host that vanishes without a FIN/RST (network partition) is noticed
        // within seconds rather than after the kernel's two-hour keepalive default.
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(10));
        config.keepalives_interval(Duration::from_secs(5));
        config.keepalives_retries(3);
        let roots = match &opts.ca_file {
            Some(ca) => {
                config.ssl_mode(postgres::config::SslMode::Require);
                read_roots(ca)?
            }
            None => {
                config.ssl_mode(postgres::config::SslMode::Disable);
                rustls::RootCertStore::empty()
            }
        };
        let tls_config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Invalid(format!("store TLS versions: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(ConnectInfo {
            config,
            tls: MakeRustlsConnect::new(tls_config),
            ca_file: opts.ca_file.clone(),
        })
    }

    /// Opens a session and checks the settings every transaction relies on.
    pub(super) fn connect(&self) -> Result<PgConn, postgres::Error> {
        let client = self.config.connect(self.tls.clone())?;
        let mut conn = PgConn {
            client,
            statements: HashMap::new(),
            broken: false,
        };
        let rows = conn.client.simple_query("SHOW synchronous_commit")?;
        let value = rows.iter().find_map(|m| match m {
            postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        });
        if value.as_deref() != Some("on") {
            // Cannot happen with the start-up option above unless a proxy rewrote it;
            // refuse the session rather than acknowledge writes that are not durable.
            tracing::error!(
                ?value,
                "store: PostgreSQL session has synchronous_commit != on"
            );
            conn.broken = true;
        }
        Ok(conn)
    }

    /// Whether [`ConnectInfo::connect`]'s sessions are usable for writes.
    pub(super) fn checked_connect(&self) -> Result<PgConn, StoreError> {
        let conn = self.connect().map_err(|e| self.connect_error(&e))?;
        if conn.broken {
            return Err(StoreError::Backend(
                "PostgreSQL session refused synchronous_commit = on".into(),
            ));
        }
        Ok(conn)
    }
}

impl ConnectInfo {
    /// A failed connection attempt as one line: a TLS failure says what was verified
    /// against what (`store.ca_file`), and that there is no plaintext fallback.
    pub(super) fn connect_error(&self, e: &postgres::Error) -> StoreError {
        const WHAT: &str = "connecting to PostgreSQL";
        if e.as_db_error().is_none() && with_causes(e).ends_with("password missing") {
            return StoreError::Unavailable(format!(
                "{WHAT}: the server asks for a password and store.password_file is not set"
            ));
        }
        let Some(ca) = &self.ca_file else {
            return map_err(e, WHAT);
        };
        if e.as_db_error().is_some() {
            return map_err(e, WHAT);
        }
        let ca = ca.display();
        let mut cause = std::error::Error::source(e);
        while let Some(c) = cause {
            let inner = c
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .map_or(c, |i| i as &(dyn std::error::Error + 'static));
            if let Some(tls) = inner.downcast_ref::<rustls::Error>() {
                return StoreError::Unavailable(match tls {
                    rustls::Error::InvalidCertificate(why) => format!(
                        "{WHAT} over TLS: the server's certificate did not verify against \
                         store.ca_file {ca} and the host in store.url: {why:?}"
                    ),
                    other => format!("{WHAT} over TLS (store.ca_file {ca}): {other}"),
                });
            }
            if inner.to_string().contains("does not support TLS") {
                return StoreError::Unavailable(format!(
                    "{WHAT}: the server does not offer TLS, which store.ca_file {ca} \
                     requires (no plaintext fallback)"
                ));
            }
            cause = c.source();
        }
        map_err(e, WHAT)
    }
}

/// Parses a `postgresql://` URL (or key=value string) and refuses one that carries a
/// password: secrets come from `store.password_file`, never from the config file.
pub(crate) fn parse_url(url: &str) -> Result<postgres::Config, String> {
    let config: postgres::Config = url
        .parse()
        .map_err(|e| format!("store.url is not a PostgreSQL connection URL: {e}"))?;
    if config.get_password().is_some() {
        return Err(
            "store.url must not contain a password: put it in the file store.password_file names"
                .into(),
        );
    }
    if config.get_hosts().is_empty() {
        return Err("store.url names no host".into());
    }
    if config.get_dbname().is_none() {
        return Err("store.url names no database (postgresql://user@host:port/DATABASE)".into());
    }
    Ok(config)
}

fn read_roots(path: &std::path::Path) -> Result<rustls::RootCertStore, StoreError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let pem = std::fs::read(path)
        .map_err(|e| StoreError::Invalid(format!("store.ca_file {}: {e}", path.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert
            .map_err(|e| StoreError::Invalid(format!("store.ca_file {}: {e}", path.display())))?;
        roots
            .add(cert)
            .map_err(|e| StoreError::Invalid(format!("store.ca_file {}: {e}", path.display())))?;
    }
    if roots.is_empty() {
        return Err(StoreError::Invalid(format!(
            "store.ca_file {} holds no certificate",
            path.display()
        )));
    }
    Ok(roots)
}

/// A row of a store table: key and value bytes.
pub(super) type KeyValue = (Vec<u8>, Vec<u8>);

/// One session and the statements prepared on it (a prepared statement lives as long as
/// its session, so the cache is per connection: a repeated query costs one round trip).
pub(super) struct PgConn {
    pub(super) client: Client,
    statements: HashMap<String, Statement>,
    /// Set when the session's state is unknown (a transaction could not be ended): the
    /// pool discards it, the committer reconnects.
    pub(super) broken: bool,
}

impl PgConn {
    fn prepared(&mut self, sql: &str) -> Result<Statement, postgres::Error> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql)?;
        self.statements.insert(sql.to_owned(), s.clone());
        Ok(s)
    }

    pub(super) fn query(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, postgres::Error> {
        let st = self.prepared(sql)?;
        self.client.query(&st, params)
    }

    pub(super) fn execute(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, postgres::Error> {
        let st = self.prepared(sql)?;
        self.client.execute(&st, params)
    }

    /// Whether the session can no longer be used.
    pub(super) fn is_broken(&self) -> bool {
        self.broken || self.client.is_closed()
    }
}

/// The pool's connection factory (r2d2).
pub(super) struct Manager(pub(super) Arc<ConnectInfo>);

impl r2d2::ManageConnection for Manager {
    type Connection = PgConn;
    type Error = postgres::Error;

    fn connect(&self) -> Result<PgConn, postgres::Error> {
        self.0.connect()
    }

    fn is_valid(&self, conn: &mut PgConn) -> Result<(), postgres::Error> {
        conn.client.simple_query("").map(|_| ())
    }

    fn has_broken(&self, conn: &mut PgConn) -> bool {
        conn.is_broken()
    }
}

/// The pool logs through `tracing` (r2d2's default handler uses the `log` crate, which
/// this service does not route), at debug: the health monitor reports an unreachable
/// database once, not once per reconnect attempt.
#[derive(Debug)]
pub(super) struct PoolErrors;

impl r2d2::HandleError<postgres::Error> for PoolErrors {
    fn handle_error(&self, error: postgres::Error) {
        tracing::debug!(error = %error, "store: PostgreSQL pool could not open a connection");
    }
}

/// Maps a PostgreSQL error: conflicts with another instance's transaction (deadlock,
/// serialization failure, unique violation of a key this batch read as absent, lock or
/// statement timeout) are [`StoreError::Aborted`] (nothing committed, retry); a lost or
/// refused connection is [`StoreError::Unavailable`]; anything else is
/// [`StoreError::Backend`]. Only the server's message and SQLSTATE are kept, never its
/// DETAIL (which can quote a key).
pub(super) fn map_err(e: &postgres::Error, what: &str) -> StoreError {
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        let text = format!("{what}: {} (SQLSTATE {})", db.message(), code.code());
        if *code == SqlState::T_R_DEADLOCK_DETECTED
            || *code == SqlState::T_R_SERIALIZATION_FAILURE
            || *code == SqlState::UNIQUE_VIOLATION
            || *code == SqlState::LOCK_NOT_AVAILABLE
            || *code == SqlState::QUERY_CANCELED
        {
            return StoreError::Aborted(format!(
                "{text}; a concurrent transaction (another instance) conflicted, nothing was written, retry"
            ));
        }
        if *code == SqlState::INVALID_PASSWORD
            || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
        {
            // The server's message names the user, never the password.
            return StoreError::Backend(format!(
                "{text}: check the user in store.url and the password in store.password_file"
            ));
        }
        if *code == SqlState::ADMIN_SHUTDOWN
            || *code == SqlState::CRASH_SHUTDOWN
            || *code == SqlState::CANNOT_CONNECT_NOW
            || *code == SqlState::TOO_MANY_CONNECTIONS
            || code.code().starts_with("08")
        {
            return StoreError::Unavailable(text);
        }
        return StoreError::Backend(text);
    }
    // No server error: the connection failed or closed (I/O, TLS, timeout). The
    // client's message names the kind only ("error connecting to server"); its causes
    // say what happened.
    StoreError::Unavailable(format!("{what}: {}", with_causes(e)))
}

/// An error's message followed by its causes'.
fn with_causes(e: &postgres::Error) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let part = c.to_string();
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = c.source();
    }
    text
}

/// Rows of a key range scan or an audit range: bounds a `usize` to SQL's bigint.
fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

fn seq_param(seq: u64) -> Result<i64, Rollback> {
    i64::try_from(seq).map_err(|_| {
        Rollback(StoreError::Invalid(format!(
            "audit seq {seq} is out of range"
        )))
    })
}

fn seq_value(seq: i64) -> Result<u64, Rollback> {
    u64::try_from(seq)
        .map_err(|_| Rollback(StoreError::Corrupt(format!("audit seq {seq} is negative"))))
}

fn key_value(table: Table, k: Vec<u8>) -> Result<String, Rollback> {
    String::from_utf8(k).map_err(|_| {
        Rollback(StoreError::Corrupt(format!(
            "table {}: a key is not UTF-8",
            table.name()
        )))
    })
}

/// The queries a write batch and a read snapshot share. `locking` selects
/// `SELECT ... FOR UPDATE` for [`get`] (write transactions only: a read-only
/// transaction refuses it).
pub(super) struct Queries<'c> {
    pub(super) conn: &'c mut PgConn,
}

impl Queries<'_> {
    fn wrap<T>(&mut self, what: &str, r: Result<T, postgres::Error>) -> Result<T, Rollback> {
        r.map_err(|e| {
            if e.is_closed() || e.as_db_error().is_none() {
                self.conn.broken = true;
            }
            Rollback(map_err(&e, what))
        })
    }

    pub(super) fn get(
        &mut self,
        table: Table,
        key: &str,
        locking: bool,
    ) -> Result<Option<Vec<u8>>, Rollback> {
        let sql = if locking {
            format!("SELECT v FROM {} WHERE k = $1 FOR UPDATE", table.name())
        } else {
            format!("SELECT v FROM {} WHERE k = $1", table.name())
        };
        let r = self.conn.query(&sql, &[&key.as_bytes()]);
        let rows = self.wrap("get", r)?;
        Ok(rows.into_iter().next().map(|row| row.get(0)))
    }

    /// Locking read of many keys in one statement: the (key, value) rows found.
    pub(super) fn get_many_locking(
        &mut self,
        table: Table,
        keys: &[&[u8]],
    ) -> Result<Vec<KeyValue>, Rollback> {
        // Sorted keys, as the flush writes them: two instances lock in the same order.
        let sql = format!(
            "SELECT k, v FROM {} WHERE k = ANY($1) ORDER BY k FOR UPDATE",
            table.name()
        );
        let r = self.conn.query(&sql, &[&keys]);
        let rows = self.wrap("get", r)?;
        Ok(rows
            .into_iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect())
    }

    pub(super) fn scan(
        &mut self,
        table: Table,
        range: &KeyRange,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, Rollback> {
        let low = if range.after { ">" } else { ">=" };
        let limit = sql_limit(limit);
        let start = range.start.as_bytes();
        let r = match &range.end {
            Some(end) => {
                let sql = format!(
                    "SELECT k, v FROM {} WHERE k {low} $1 AND k < $2 ORDER BY k LIMIT $3",
                    table.name()
                );
                self.conn.query(&sql, &[&start, &end.as_bytes(), &limit])
            }
            None => {
                let sql = format!(
                    "SELECT k, v FROM {} WHERE k {low} $1 ORDER BY k LIMIT $2",
                    table.name()
                );
                self.conn.query(&sql, &[&start, &limit])
            }
        };
        let rows = self.wrap("scan", r)?;
        rows.into_iter()
            .map(|row| Ok((key_value(table, row.get(0))?, row.get(1))))
            .collect()
    }

    pub(super) fn count(&mut self, table: Table) -> Result<u64, Rollback> {
        let sql = format!("SELECT count(*) FROM {}", table.name());
        let r = self.conn.query(&sql, &[]);
        let rows = self.wrap("count", r)?;
        let n: i64 = rows.first().map_or(0, |r| r.get(0));
        Ok(u64::try_from(n).unwrap_or(0))
    }

    pub(super) fn audit_last(&mut self, chain: &str) -> Result<Option<(u64, Vec<u8>)>, Rollback> {
        let r = self.conn.query(
            "SELECT seq, line FROM audit_log WHERE chain = $1 ORDER BY seq DESC LIMIT 1",
            &[&chain],
        );
        let rows = self.wrap("audit_last", r)?;
        match rows.into_iter().next() {
            Some(row) => Ok(Some((seq_value(row.get(0))?, row.get(1)))),
            None => Ok(None),
        }
    }

    pub(super) fn audit_range(
        &mut self,
        chain: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, Rollback> {
        let from = i64::try_from(from).unwrap_or(i64::MAX);
        let r = self.conn.query(
            "SELECT seq, line FROM audit_log WHERE chain = $1 AND seq >= $2 ORDER BY seq LIMIT $3",
            &[&chain, &from, &sql_limit(limit)],
        );
        let rows = self.wrap("audit_range", r)?;
        rows.into_iter()
            .map(|row| Ok((seq_value(row.get(0))?, row.get(1))))
            .collect()
    }

    pub(super) fn audit_count(&mut self, chain: &str) -> Result<u64, Rollback> {
        let r = self
            .conn
            .query("SELECT count(*) FROM audit_log WHERE chain = $1", &[&chain]);
        let rows = self.wrap("audit_count", r)?;
        let n: i64 = rows.first().map_or(0, |r| r.get(0));
        Ok(u64::try_from(n).unwrap_or(0))
    }

    pub(super) fn audit_chains(&mut self) -> Result<Vec<String>, Rollback> {
        // A skip scan over the primary key: one index probe per chain, not a scan of
        // every record.
        let r = self.conn.query(
            "WITH RECURSIVE c AS ( \
               (SELECT chain FROM audit_log ORDER BY chain LIMIT 1) \
               UNION ALL \
               SELECT (SELECT a.chain FROM audit_log a WHERE a.chain > c.chain \
                       ORDER BY a.chain LIMIT 1) \
               FROM c WHERE c.chain IS NOT NULL \
             ) SELECT chain FROM c WHERE chain IS NOT NULL",
            &[],
        );
        let rows = self.wrap("audit_chains", r)?;
        Ok(rows.into_iter().map(|row| row.get(0)).collect())
    }

    /// `INSERT` (or upsert) of many rows in one statement.
    pub(super) fn write_rows(
        &mut self,
        table: Table,
        rows: &[(&str, &[u8])],
        upsert: bool,
    ) -> Result<(), Rollback> {
        if rows.is_empty() {
            return Ok(());
        }
        let keys: Vec<&[u8]> = rows.iter().map(|(k, _)| k.as_bytes()).collect();
        let values: Vec<&[u8]> = rows.iter().map(|(_, v)| *v).collect();
        let sql = format!(
            "INSERT INTO {} (k, v) SELECT * FROM unnest($1::bytea[], $2::bytea[]){}",
            table.name(),
            if upsert {
                " ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v"
            } else {
                ""
            }
        );
        let r = self.conn.execute(&sql, &[&keys, &values]);
        self.wrap(if upsert { "upsert" } else { "insert" }, r)
            .map(|_| ())
    }

    pub(super) fn delete_rows(&mut self, table: Table, keys: &[&str]) -> Result<(), Rollback> {
        if keys.is_empty() {
            return Ok(());
        }
        let keys: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
        let sql = format!("DELETE FROM {} WHERE k = ANY($1)", table.name());
        let r = self.conn.execute(&sql, &[&keys]);
        self.wrap("delete", r).map(|_| ())
    }

    pub(super) fn audit_insert(
        &mut self,
        records: &[(String, u64, Vec<u8>)],
    ) -> Result<(), Rollback> {
        if records.is_empty() {
            return Ok(());
        }
        let chains: Vec<&str> = records.iter().map(|(c, _, _)| c.as_str()).collect();
        let seqs = records
            .iter()
            .map(|(_, s, _)| seq_param(*s))
            .collect::<Result<Vec<i64>, _>>()?;
        let lines: Vec<&[u8]> = records.iter().map(|(_, _, l)| l.as_slice()).collect();
        let r = self.conn.execute(
            "INSERT INTO audit_log (chain, seq, line) \
             SELECT * FROM unnest($1::text[], $2::int8[], $3::bytea[])",
            &[&chains, &seqs, &lines],
        );
        self.wrap("audit_put", r).map(|_| ())
    }
}
