//! [`SqliteBackend`]: one database file in WAL mode, times from SQLite's own clock.
//!
//! Fencing tokens: an acquisition sets the key's token to `max(previous + 1, now in µs)`. A
//! released row keeps its token (it is only marked expired) until the cleanup deletes it a
//! minute later, by which time the clock floor is far above it; so tokens strictly increase.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use locker_core::{
    validate_key, AcquireOutcome, BackendFactory, Capabilities, Error, ErrorKind, ExtendOutcome,
    LockBackend, LockData, ProcessData, ReleaseOutcome, Result, WatchHub,
};
use locker_sql::{lock_from_row, stored_record, ttl_ms, Tables};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::Row;

use crate::config::SqliteConfig;

/// SQLite's clock, in milliseconds and microseconds since the Unix epoch (stable within one
/// statement).
macro_rules! now_ms {
    () => {
        "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)"
    };
}
macro_rules! now_us {
    () => {
        "CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)"
    };
}

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS {locks} (
        key           TEXT    PRIMARY KEY,
        owner_hash    TEXT    NOT NULL,
        record        TEXT    NOT NULL,
        fencing_token INTEGER NOT NULL,
        expires_at    INTEGER NOT NULL
    );
    CREATE INDEX IF NOT EXISTS {prefix}locks_expires_at ON {locks} (expires_at);
    CREATE TABLE IF NOT EXISTS {processes} (
        process_hash  TEXT    PRIMARY KEY,
        record        TEXT    NOT NULL,
        expires_at    INTEGER NOT NULL
    );
    CREATE INDEX IF NOT EXISTS {prefix}processes_expires_at ON {processes} (expires_at);";

/// Insert, or replace an expired row (or, for a take-over, the dead owner's row).
const ACQUIRE: &str = concat!(
    "INSERT INTO {locks} AS l (key, owner_hash, record, fencing_token, expires_at)
    VALUES (?1, ?2, ?3, ",
    now_us!(),
    ", ",
    now_ms!(),
    " + ?4)
    ON CONFLICT (key) DO UPDATE
        SET owner_hash = excluded.owner_hash, record = excluded.record,
            fencing_token = max(l.fencing_token + 1, excluded.fencing_token),
            expires_at = excluded.expires_at
        WHERE l.expires_at <= ",
    now_ms!(),
    " OR l.owner_hash = ?5
    RETURNING fencing_token, record, owner_hash"
);

const EXTEND: &str = concat!(
    "UPDATE {locks} SET record = ?2, expires_at = ",
    now_ms!(),
    " + ?3
    WHERE key = ?1 AND owner_hash = ?4 AND expires_at > ",
    now_ms!(),
    "
    RETURNING fencing_token, record, owner_hash"
);

/// A release marks the row expired and keeps its token for the next acquisition.
const RELEASE: &str = concat!(
    "UPDATE {locks} SET expires_at = ",
    now_ms!(),
    "
    WHERE key = ?1 AND owner_hash = ?2 AND expires_at > ",
    now_ms!(),
    "
    RETURNING fencing_token, record, owner_hash"
);

const READ: &str = concat!(
    "SELECT fencing_token, record, owner_hash FROM {locks} WHERE key = ?1 AND expires_at > ",
    now_ms!()
);

/// The locks of many keys (rechecks); `{keys}` becomes one `?` per key.
const READ_MANY: &str = concat!(
    "SELECT key, fencing_token, record, owner_hash FROM {locks} WHERE key IN ({keys}) \
     AND expires_at > ",
    now_ms!()
);

/// Keys per `READ_MANY` statement (SQLite's parameter limit is 32766 since 3.32, 999 before).
const READ_MANY_CHUNK: usize = 500;

const PING: &str = concat!(
    "INSERT INTO {processes} (process_hash, record, expires_at) VALUES (?1, ?2, ",
    now_ms!(),
    " + ?3)
    ON CONFLICT (process_hash) DO UPDATE
        SET record = excluded.record, expires_at = excluded.expires_at"
);

const READ_PROCESS: &str = concat!(
    "SELECT record FROM {processes} WHERE process_hash = ?1 AND expires_at > ",
    now_ms!()
);

const FORGET_PROCESS: &str = "DELETE FROM {processes} WHERE process_hash = ?1";

/// Milliseconds left of a liveness record (no row: none).
const LIVENESS_LEFT: &str = concat!(
    "SELECT expires_at - ",
    now_ms!(),
    " FROM {processes} WHERE process_hash = ?1 AND expires_at > ",
    now_ms!()
);

/// Rows expired over a minute ago; run every [`CLEANUP_EVERY`] liveness writes.
const CLEANUP: &str = concat!(
    "DELETE FROM {locks} WHERE expires_at < ",
    now_ms!(),
    " - 60000;
    DELETE FROM {processes} WHERE expires_at < ",
    now_ms!(),
    " - 60000;"
);

/// One cleanup per this many liveness writes (about once a minute at the default pace).
const CLEANUP_EVERY: u64 = 30;

const PUT_RAW: &str = concat!(
    "INSERT INTO {locks} (key, owner_hash, record, fencing_token, expires_at)
    VALUES (?1, ?4, ?2, ",
    now_us!(),
    ", ",
    now_ms!(),
    " + ?3)
    ON CONFLICT (key) DO UPDATE SET owner_hash = excluded.owner_hash, record = excluded.record,
        expires_at = excluded.expires_at"
);

struct Statements {
    acquire: String,
    extend: String,
    release: String,
    read: String,
    read_many: String,
    ping: String,
    read_process: String,
    forget_process: String,
    liveness_left: String,
    cleanup: String,
    put_raw: String,
}

impl Statements {
    fn new(t: &Tables) -> Self {
        Statements {
            acquire: t.render(ACQUIRE),
            extend: t.render(EXTEND),
            release: t.render(RELEASE),
            read: t.render(READ),
            read_many: t.render(READ_MANY),
            ping: t.render(PING),
            read_process: t.render(READ_PROCESS),
            forget_process: t.render(FORGET_PROCESS),
            liveness_left: t.render(LIVENESS_LEFT),
            cleanup: t.render(CLEANUP),
            put_raw: t.render(PUT_RAW),
        }
    }
}

/// A pool of connections to one SQLite file; made by [`SqliteConfig`], which is the
/// [`BackendFactory`].
pub struct SqliteBackend {
    config: SqliteConfig,
    pool: SqlitePool,
    sql: Statements,
    pings: AtomicU64,
    /// Wakes the waiters of this process when a lock of this database is released here.
    releases: WatchHub,
}

/// The release hubs of this process, one per database file and locks table: SQLite cannot
/// notify other processes, but the waiters of this one are woken by its own releases, through
/// whichever connection made them.
fn hub_for(config: &SqliteConfig) -> WatchHub {
    static HUBS: std::sync::OnceLock<std::sync::Mutex<HashMap<(PathBuf, String), WatchHub>>> =
        std::sync::OnceLock::new();
    let path = std::fs::canonicalize(&config.path).unwrap_or_else(|_| config.path.clone());
    let mut hubs = HUBS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    hubs.entry((path, config.tables.locks.clone()))
        .or_default()
        .clone()
}

struct LockRow {
    fencing_token: i64,
    record: String,
    owner_hash: String,
}

impl LockRow {
    fn from_row(row: &SqliteRow) -> Result<Self> {
        Ok(LockRow {
            fencing_token: row.try_get("fencing_token").map_err(map_error)?,
            record: row.try_get("record").map_err(map_error)?,
            owner_hash: row.try_get("owner_hash").map_err(map_error)?,
        })
    }

    fn lock(&self, key: &str) -> Result<LockData> {
        lock_from_row(key, &self.record, Some(self.fencing_token))
    }
}

impl SqliteBackend {
    /// Opens (and creates when missing) the database file in WAL mode, and its tables.
    ///
    /// Switching a file to WAL and creating the tables can meet another process doing the same
    /// (SQLite answers "busy" without waiting then): that is retried until the command timeout.
    pub async fn connect(config: &SqliteConfig) -> Result<Self> {
        let deadline = tokio::time::Instant::now() + config.command_timeout;
        loop {
            match Self::try_connect(config).await {
                // A file that cannot be opened is not retried: it stays so until someone acts.
                Err(e)
                    if e.is_retryable()
                        && !e.is_definite()
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => return other,
            }
        }
    }

    async fn try_connect(config: &SqliteConfig) -> Result<Self> {
        let options = SqliteConnectOptions::new()
            .filename(&config.path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(config.busy_timeout);
        let pool = match &config.pool {
            Some(pool) => pool.clone(),
            None => SqlitePoolOptions::new()
                .max_connections(config.max_connections)
                .acquire_timeout(config.command_timeout)
                .connect_with(options)
                .await
                .map_err(|e| map_open_error(&config.path, e))?,
        };
        sqlx::raw_sql(&config.tables.render(SCHEMA))
            .execute(&pool)
            .await
            .map_err(map_error)?;
        Ok(SqliteBackend {
            sql: Statements::new(&config.tables),
            releases: hub_for(config),
            config: config.clone(),
            pool,
            pings: AtomicU64::new(0),
        })
    }

    /// The configuration this pool was made with.
    pub fn config(&self) -> &SqliteConfig {
        &self.config
    }

    /// Stores any text as the record of `key` (for corruption tests and tools); the owner is
    /// the record's `ownerHash` when it has one, else nobody.
    #[doc(hidden)]
    pub async fn raw_put(&self, key: &str, record: &str, ttl: Duration) -> Result<()> {
        let owner = LockData::from_json(record)
            .map(|d| d.owner_hash)
            .unwrap_or_default();
        let ttl = ttl_ms(ttl)?;
        self.timed(
            sqlx::query(&self.sql.put_raw)
                .bind(key)
                .bind(record)
                .bind(ttl)
                .bind(&owner)
                .execute(&self.pool),
        )
        .await?;
        Ok(())
    }

    /// The record text of `key`, if a live one is stored.
    #[doc(hidden)]
    pub async fn raw_get(&self, key: &str) -> Result<Option<String>> {
        let row = self
            .timed(
                sqlx::query(&self.sql.read)
                    .bind(key)
                    .fetch_optional(&self.pool),
            )
            .await?;
        row.map(|r| r.try_get("record").map_err(map_error))
            .transpose()
    }

    async fn timed<T>(
        &self,
        query: impl std::future::Future<Output = std::result::Result<T, sqlx::Error>>,
    ) -> Result<T> {
        locker_sql::within(self.config.command_timeout, "SQLite", query, map_error).await
    }

    async fn read_row(&self, key: &str) -> Result<Option<LockRow>> {
        let row = self
            .timed(
                sqlx::query(&self.sql.read)
                    .bind(key)
                    .fetch_optional(&self.pool),
            )
            .await?;
        row.as_ref().map(LockRow::from_row).transpose()
    }

    async fn create(
        &self,
        key: &str,
        data: &LockData,
        ttl: Duration,
        dead_owner: Option<&str>,
    ) -> Result<AcquireOutcome> {
        validate_key(key)?;
        let ttl = ttl_ms(ttl)?;
        let record = stored_record(data);
        let insert = || {
            sqlx::query(&self.sql.acquire)
                .bind(key)
                .bind(&data.owner_hash)
                .bind(&record)
                .bind(ttl)
                .bind(dead_owner)
        };
        // The common cases without a transaction: a free key (one statement), a holder that
        // stays (two).
        if let Some(row) = self.timed(insert().fetch_optional(&self.pool)).await? {
            return Ok(AcquireOutcome::Acquired(
                LockRow::from_row(&row)?.lock(key)?,
            ));
        }
        if let Some(holder) = self.read_row(key).await? {
            return Ok(AcquireOutcome::Held(holder.lock(key)?));
        }
        // The holder went away between the two (released by another process, or expired):
        // again, in one write transaction, which other writers wait for, so that only an
        // expiry between its statements can make a round miss (the next round's insert then
        // wins). Without it, busy keys answered "the lock row kept changing" under churn.
        let mut tx = self.timed(self.pool.begin()).await?;
        for _ in 0..5 {
            if let Some(row) = self.timed(insert().fetch_optional(&mut *tx)).await? {
                let stored = LockRow::from_row(&row)?.lock(key)?;
                self.timed(tx.commit()).await?;
                return Ok(AcquireOutcome::Acquired(stored));
            }
            let holder = self
                .timed(
                    sqlx::query(&self.sql.read)
                        .bind(key)
                        .fetch_optional(&mut *tx),
                )
                .await?;
            if let Some(row) = holder {
                let holder = LockRow::from_row(&row)?.lock(key)?;
                self.timed(tx.commit()).await?;
                return Ok(AcquireOutcome::Held(holder));
            }
        }
        Err(Error::unavailable(
            "the lock row kept changing under the acquire; try again",
        ))
    }
}

#[async_trait]
impl LockBackend for SqliteBackend {
    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::default();
        c.fencing = true;
        c.ttl_granularity = Duration::from_millis(1);
        // Shared by the processes of one machine (one file).
        c.shared_across_processes = true;
        c.atomic_take_over = true;
        c
    }

    async fn acquire(&self, key: &str, data: &LockData, ttl: Duration) -> Result<AcquireOutcome> {
        self.create(key, data, ttl, None).await
    }

    async fn extend(
        &self,
        key: &str,
        data: &LockData,
        ttl: Duration,
        owner_hash: &str,
    ) -> Result<ExtendOutcome> {
        validate_key(key)?;
        let ttl = ttl_ms(ttl)?;
        let record = stored_record(data);
        let updated = self
            .timed(
                sqlx::query(&self.sql.extend)
                    .bind(key)
                    .bind(&record)
                    .bind(ttl)
                    .bind(owner_hash)
                    .fetch_optional(&self.pool),
            )
            .await?;
        if let Some(row) = updated {
            return Ok(ExtendOutcome::Extended(LockRow::from_row(&row)?.lock(key)?));
        }
        match self.read_row(key).await? {
            None => Ok(ExtendOutcome::NoKey),
            Some(row) if row.owner_hash == owner_hash => Err(Error::unavailable(
                "the lock row changed during the extension; try again",
            )),
            Some(row) => Ok(ExtendOutcome::Held(row.lock(key)?)),
        }
    }

    async fn release(&self, key: &str, owner_hash: &str) -> Result<ReleaseOutcome> {
        validate_key(key)?;
        let released = self
            .timed(
                sqlx::query(&self.sql.release)
                    .bind(key)
                    .bind(owner_hash)
                    .fetch_optional(&self.pool),
            )
            .await?;
        if released.is_some() {
            self.releases.notify(key);
            return Ok(ReleaseOutcome::Released);
        }
        match self.read_row(key).await? {
            None => Ok(ReleaseOutcome::NoKey),
            Some(row) if row.owner_hash == owner_hash => Err(Error::unavailable(
                "the lock row changed during the release; try again",
            )),
            Some(row) => Ok(ReleaseOutcome::Held(row.lock(key)?)),
        }
    }

    async fn take_over(
        &self,
        key: &str,
        data: &LockData,
        ttl: Duration,
        dead_owner_hash: &str,
    ) -> Result<AcquireOutcome> {
        self.create(key, data, ttl, Some(dead_owner_hash)).await
    }

    async fn ping(&self, process_hash: &str, data: &ProcessData, ttl: Duration) -> Result<()> {
        let ttl = ttl_ms(ttl)?;
        self.timed(
            sqlx::query(&self.sql.ping)
                .bind(process_hash)
                .bind(data.to_json())
                .bind(ttl)
                .execute(&self.pool),
        )
        .await?;
        if self.pings.fetch_add(1, Ordering::Relaxed) % CLEANUP_EVERY == 0 {
            self.timed(sqlx::raw_sql(&self.sql.cleanup).execute(&self.pool))
                .await?;
        }
        Ok(())
    }

    async fn read(&self, key: &str) -> Result<Option<LockData>> {
        validate_key(key)?;
        self.read_row(key).await?.map(|r| r.lock(key)).transpose()
    }

    async fn read_many(&self, keys: &[&str]) -> Result<Vec<Result<Option<LockData>>>> {
        let reads = locker_sql::ManyReads::new(keys, validate_key);
        let mut found = Vec::new();
        // One statement per chunk: SQLite takes a bounded number of parameters.
        for chunk in reads.wanted().chunks(READ_MANY_CHUNK) {
            let placeholders = vec!["?"; chunk.len()].join(", ");
            let sql = self.sql.read_many.replace("{keys}", &placeholders);
            let mut query = sqlx::query(&sql);
            for key in chunk {
                query = query.bind(*key);
            }
            let rows = self
                .timed(query.persistent(false).fetch_all(&self.pool))
                .await?;
            for row in rows {
                let key: String = row.try_get("key").map_err(map_error)?;
                let lock = LockRow::from_row(&row)?;
                found.push((key, lock.record, Some(lock.fencing_token)));
            }
        }
        Ok(reads.finish(found))
    }

    async fn read_process(&self, process_hash: &str) -> Result<Option<ProcessData>> {
        let row = self
            .timed(
                sqlx::query(&self.sql.read_process)
                    .bind(process_hash)
                    .fetch_optional(&self.pool),
            )
            .await?;
        match row {
            None => Ok(None),
            Some(row) => {
                let record: String = row.try_get("record").map_err(map_error)?;
                ProcessData::from_json(&record).map(Some)
            }
        }
    }

    async fn forget_process(&self, process_hash: &str) -> Result<()> {
        self.timed(
            sqlx::query(&self.sql.forget_process)
                .bind(process_hash)
                .execute(&self.pool),
        )
        .await?;
        Ok(())
    }

    /// Wakes on releases made by this process only (`Capabilities::release_events` stays
    /// `false`: other processes' releases are found by polling).
    async fn watch_release(&self, key: &str) -> Result<Option<locker_core::ReleaseWatch>> {
        Ok(Some(self.releases.watch(key).0))
    }

    async fn liveness_left(&self, process_hash: &str) -> Result<Option<Duration>> {
        let ms: Option<i64> = self
            .timed(
                sqlx::query_scalar(&self.sql.liveness_left)
                    .bind(process_hash)
                    .fetch_optional(&self.pool),
            )
            .await?;
        Ok(Some(Duration::from_millis(
            ms.and_then(|ms| u64::try_from(ms).ok()).unwrap_or(0),
        )))
    }
}

impl fmt::Debug for SqliteBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteBackend")
            .field("config", &self.config)
            .finish()
    }
}

#[async_trait]
impl BackendFactory for SqliteConfig {
    async fn connect(&self) -> Result<Arc<dyn LockBackend>> {
        Ok(Arc::new(SqliteBackend::connect(self).await?))
    }

    /// Never the application's pool: one of the reporter's own.
    async fn connect_reporter(&self) -> Result<Arc<dyn LockBackend>> {
        Ok(Arc::new(
            SqliteBackend::connect(&self.for_reporter()).await?,
        ))
    }
}

/// An error opening the database file: SQLite says only "unable to open database file"
/// (SQLITE_CANTOPEN), so the cause is looked up here. A missing directory (or a file where a
/// directory should be) is a mistake in the path: [`ErrorKind::InvalidInput`]; a directory we
/// may not enter is [`ErrorKind::Auth`]; neither is retryable. Any other failure to open is a
/// definite, retryable [`ErrorKind::Unavailable`] (see [`Error::is_definite`]).
fn map_open_error(path: &std::path::Path, e: sqlx::Error) -> Error {
    let cantopen = matches!(&e, sqlx::Error::Database(db) if db.code().as_deref() == Some("14"));
    if !cantopen {
        return map_error(e);
    }
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => std::path::Path::new("."),
    };
    let cannot_open = format!("cannot open {}", path.display());
    let found = match std::fs::metadata(dir) {
        Err(io) => {
            let kind = if io.kind() == std::io::ErrorKind::PermissionDenied {
                ErrorKind::Auth
            } else {
                ErrorKind::InvalidInput
            };
            let io = std::io::Error::new(io.kind(), format!("{io}: {}", dir.display()));
            return Error::new(kind, cannot_open).with_source(io);
        }
        Ok(meta) if !meta.is_dir() => format!("{} is not a directory", dir.display()),
        Ok(_) => match std::fs::metadata(path) {
            Ok(meta) if meta.is_dir() => format!("{} is a directory", path.display()),
            _ => {
                return Error::unavailable(cannot_open)
                    .with_source(e)
                    .set_definite(true)
            }
        },
    };
    Error::invalid_input(format!("{cannot_open}: {found}")).with_source(e)
}

/// The one mapping of sqlx's errors (SQLite) to the project's.
fn map_error(e: sqlx::Error) -> Error {
    let kind = match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => ErrorKind::Unavailable,
        sqlx::Error::Configuration(_) => ErrorKind::InvalidInput,
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // SQLITE_BUSY, SQLITE_LOCKED (and their extended codes): another process writes.
            Some(code)
                if code == "5" || code == "6" || code.ends_with("05") || code.ends_with("06") =>
            {
                ErrorKind::Unavailable
            }
            // SQLITE_CANTOPEN, SQLITE_IOERR, SQLITE_FULL
            Some("14" | "10" | "13") => ErrorKind::Unavailable,
            // SQLITE_READONLY, SQLITE_PERM, SQLITE_AUTH
            Some("8" | "3" | "23") => ErrorKind::Auth,
            _ => ErrorKind::Other,
        },
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => ErrorKind::Corrupt,
        _ => ErrorKind::Other,
    };
    Error::new(kind, "sqlite").with_source(e)
}
