//! [`PostgresBackend`]: every operation one call (of a function of migration 3 where it can),
//! every TTL the database's `now()`.
//!
//! Every statement is one round trip: its values are written into its text and it is sent with
//! the simple query protocol (see [`crate::inline`]). No named prepared statement is kept and
//! nothing is set on the session, so the backend works behind a transaction-mode pooler such
//! as PgBouncer. With `prepared_statements`, each connection prepares each statement once
//! and binds the values: one round trip too, less work for the server, direct connections
//! only.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use locker_core::{
    validate_key, AcquireDecision, AcquireOutcome, BackendFactory, Capabilities, Error, ErrorKind,
    ExtendOutcome, LockBackend, LockData, ProcessData, ReleaseOutcome, Result,
};
use locker_sql::{lock_from_row, stored_record, ttl_ms, Tables};
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, Executor, Row};

use crate::config::PostgresConfig;
use crate::error::{map_connect_error, map_error, map_prepared_error, target};
use crate::inline::{Statement, Value};
use crate::warm::Warm;

/// `now() + $n milliseconds`, by the database's clock.
macro_rules! expires {
    ($n:literal) => {
        concat!("now() + interval '1 millisecond' * $", $n, "::float8")
    };
}

/// The key's grant lock, as the first part of a `WITH`: a transaction-scoped advisory lock on
/// (this locks table, the key `$1`), held until the statement's transaction ends. A statement
/// that may grant the key draws its fencing token only through this CTE, so only once it holds
/// the grant lock; see [`ACQUIRE`] for why.
macro_rules! grant_lock {
    () => {
        "grant_lock AS (
        SELECT pg_advisory_xact_lock(hashtext('distributed-locker grant {locks}'), hashtext($1))
    )"
    };
}

/// The next fencing token, drawn once the grant lock is held.
macro_rules! next_token {
    () => {
        "(SELECT nextval('{fencing}') FROM grant_lock)"
    };
}

/// Acquire (and, with the extra condition, take over): insert, or replace an expired row, in one
/// statement; if neither happened, the same statement returns the live holder.
///
/// Fencing order: `VALUES` is computed before the row is written, so a token drawn there
/// unguarded could be overtaken: a session stalled between the draw and the write (by the
/// scheduler, a lock wait, a trigger) would store token 10 after another session took and
/// released the key with 11. The token is therefore drawn under the key's grant lock, which
/// every granting statement takes before its draw and keeps until it commits: the draws of
/// one key happen one grant at a time, in grant order, and the sequence (`NO CYCLE CACHE 1`,
/// migration 2) hands out ever greater values, also across deletions and upgrades. Contenders
/// for one key queue for the lock one short statement at a time; a hash collision between two
/// keys only makes them queue together. Release, extend and the cleanup draw no token and do
/// not take the lock.
const ACQUIRE: &str = concat!(
    "WITH ",
    grant_lock!(),
    ", ins AS (
        INSERT INTO {locks} AS l (key, owner_hash, record, fencing_token, expires_at)
        VALUES ($1, $2, $3, ",
    next_token!(),
    ", ",
    expires!(4),
    ")
        ON CONFLICT (key) DO UPDATE
            SET owner_hash = EXCLUDED.owner_hash, record = EXCLUDED.record,
                fencing_token = EXCLUDED.fencing_token, expires_at = EXCLUDED.expires_at
            WHERE l.expires_at <= now() OR l.owner_hash = $5
        RETURNING l.fencing_token, l.record, l.owner_hash
    )
    SELECT true AS won, fencing_token, record, owner_hash FROM ins
    UNION ALL
    SELECT false, fencing_token, record, owner_hash FROM {locks}
        WHERE key = $1 AND expires_at > now() AND NOT EXISTS (SELECT 1 FROM ins)"
);

const EXTEND: &str = concat!(
    "WITH upd AS (
        UPDATE {locks} SET record = $2, expires_at = ",
    expires!(3),
    "
        WHERE key = $1 AND owner_hash = $4 AND expires_at > now()
        RETURNING fencing_token, record, owner_hash
    )
    SELECT true AS won, fencing_token, record, owner_hash FROM upd
    UNION ALL
    SELECT false, fencing_token, record, owner_hash FROM {locks}
        WHERE key = $1 AND expires_at > now() AND NOT EXISTS (SELECT 1 FROM upd)"
);

const RELEASE: &str = "WITH del AS (
        DELETE FROM {locks} WHERE key = $1 AND owner_hash = $2 AND expires_at > now()
        RETURNING fencing_token, record, owner_hash
    )
    SELECT true AS won, fencing_token, record, owner_hash FROM del
    UNION ALL
    SELECT false, fencing_token, record, owner_hash FROM {locks}
        WHERE key = $1 AND expires_at > now() AND NOT EXISTS (SELECT 1 FROM del)";

/// [`RELEASE`], and a notification to waiters when the lock was deleted: `pg_notify` runs once
/// per deleted row (the subquery refers to the row, so it is not run without one), and the
/// notification is sent at commit.
const RELEASE_NOTIFY: &str = "WITH del AS (
        DELETE FROM {locks} WHERE key = $1 AND owner_hash = $2 AND expires_at > now()
        RETURNING fencing_token, record, owner_hash
    )
    SELECT true AS won, fencing_token, record, owner_hash
        FROM del CROSS JOIN LATERAL (
            SELECT pg_notify('distributed_locker_released', $1) WHERE del.owner_hash IS NOT NULL
        ) AS n
    UNION ALL
    SELECT false, fencing_token, record, owner_hash FROM {locks}
        WHERE key = $1 AND expires_at > now() AND NOT EXISTS (SELECT 1 FROM del)";

const READ: &str =
    "SELECT fencing_token, record FROM {locks} WHERE key = $1 AND expires_at > now()";

/// The locks of many keys in one statement (rechecks).
const READ_MANY: &str = "SELECT key, fencing_token, record FROM {locks} \
     WHERE key = ANY($1) AND expires_at > now()";

/// The liveness upsert; it also deletes a few rows that expired over a minute ago, so the tables
/// stay small with no cron (rows of keys that are never locked again would stay otherwise).
const PING: &str = concat!(
    "WITH gc_locks AS (
        DELETE FROM {locks} WHERE expires_at < now() - interval '1 minute' AND key IN (
            SELECT key FROM {locks} WHERE expires_at < now() - interval '1 minute'
            LIMIT 16 FOR UPDATE SKIP LOCKED)
    ), gc_processes AS (
        DELETE FROM {processes} WHERE expires_at < now() - interval '1 minute' AND process_hash IN (
            SELECT process_hash FROM {processes} WHERE expires_at < now() - interval '1 minute'
            LIMIT 16 FOR UPDATE SKIP LOCKED)
    )
    INSERT INTO {processes} (process_hash, record, expires_at) VALUES ($1, $2, ",
    expires!(3),
    ")
    ON CONFLICT (process_hash) DO UPDATE
        SET record = EXCLUDED.record, expires_at = EXCLUDED.expires_at"
);

const READ_PROCESS: &str =
    "SELECT record FROM {processes} WHERE process_hash = $1 AND expires_at > now()";

const FORGET_PROCESS: &str = "DELETE FROM {processes} WHERE process_hash = $1";

/// Milliseconds left of a liveness record (no row: none).
const LIVENESS_LEFT: &str =
    "SELECT GREATEST(0, EXTRACT(EPOCH FROM (expires_at - now())) * 1000)::float8 \
     AS ms FROM {processes} WHERE process_hash = $1";

/// For tests and tools: store any record text under a key.
const PUT_RAW: &str = concat!(
    "WITH ",
    grant_lock!(),
    "
    INSERT INTO {locks} (key, owner_hash, record, fencing_token, expires_at)
    VALUES ($1, $4, $2, ",
    next_token!(),
    ", ",
    expires!(3),
    ")
    ON CONFLICT (key) DO UPDATE SET owner_hash = EXCLUDED.owner_hash, record = EXCLUDED.record,
        expires_at = EXCLUDED.expires_at"
);

const GET_RAW: &str = "SELECT record FROM {locks} WHERE key = $1 AND expires_at > now()";

/// The compare-and-set operations through the functions of migration 3 (see
/// [`crate::migrations`]): planned once per connection, where the statements above are parsed
/// and planned at every call. The statements stay for databases whose owners apply the
/// migrations themselves and have not applied that one yet.
const FN_ACQUIRE: &str = "SELECT o_decision, o_token, o_record, o_owner, o_dead_token, \
     o_dead_record FROM {schema}.\"{prefix}acquire\"($1, $2, $3, $4, $5, $6)";
const FN_EXTEND: &str = "SELECT o_won, o_token, o_record, o_owner \
     FROM {schema}.\"{prefix}extend\"($1, $2, $3, $4)";
const FN_RELEASE: &str = "SELECT o_won, o_token, o_record, o_owner \
     FROM {schema}.\"{prefix}release\"($1, $2, $3)";

/// The same calls without prepared statements: one composite column as text (see
/// [`crate::composite`]), cheaper for the server to plan and run than a function scan when
/// every call is planned.
const FN_ACQUIRE_TEXT: &str =
    "SELECT {schema}.\"{prefix}acquire\"($1, $2, $3, $4, $5, $6)::text AS o";
const FN_EXTEND_TEXT: &str = "SELECT {schema}.\"{prefix}extend\"($1, $2, $3, $4)::text AS o";
const FN_RELEASE_TEXT: &str = "SELECT {schema}.\"{prefix}release\"($1, $2, $3)::text AS o";

/// Whether the functions of migration 3 are there (all three, with these arguments).
const HAS_FUNCTIONS: &str = "SELECT \
     to_regprocedure('{schema}.\"{prefix}acquire\"(text, text, text, float8, text, boolean)') \
         IS NOT NULL \
     AND to_regprocedure('{schema}.\"{prefix}extend\"(text, text, float8, text)') IS NOT NULL \
     AND to_regprocedure('{schema}.\"{prefix}release\"(text, text, boolean)') IS NOT NULL \
     AS present";

/// The statements with this store's table names, each sent in one round trip (see
/// [`crate::inline`]).
struct Statements {
    acquire: Statement,
    extend: Statement,
    release: Statement,
    read: Statement,
    read_many: Statement,
    ping: Statement,
    read_process: Statement,
    forget_process: Statement,
    liveness_left: Statement,
    put_raw: Statement,
    get_raw: Statement,
    fn_acquire: Statement,
    fn_extend: Statement,
    fn_release: Statement,
    fn_acquire_text: Statement,
    fn_extend_text: Statement,
    fn_release_text: Statement,
}

impl Statements {
    fn new(tables: &Tables, notify: bool) -> Self {
        let s = |template: &str| Statement::new(&tables.render(template));
        Statements {
            acquire: s(ACQUIRE),
            extend: s(EXTEND),
            release: s(if notify { RELEASE_NOTIFY } else { RELEASE }),
            read: s(READ),
            read_many: s(READ_MANY),
            ping: s(PING),
            read_process: s(READ_PROCESS),
            forget_process: s(FORGET_PROCESS),
            liveness_left: s(LIVENESS_LEFT),
            put_raw: s(PUT_RAW),
            get_raw: s(GET_RAW),
            fn_acquire: s(FN_ACQUIRE),
            fn_extend: s(FN_EXTEND),
            fn_release: s(FN_RELEASE),
            fn_acquire_text: s(FN_ACQUIRE_TEXT),
            fn_extend_text: s(FN_EXTEND_TEXT),
            fn_release_text: s(FN_RELEASE_TEXT),
        }
    }
}

/// Prepared statements each of the locker's own connections keeps, with `prepared_statements`
/// (the locker has 14).
const STATEMENT_CACHE: usize = 32;

/// The connection options of every connection of the locker's own: a statement cache only for
/// `prepared_statements`, and the application name.
fn connect_options(config: &PostgresConfig) -> sqlx::postgres::PgConnectOptions {
    config
        .options
        .clone()
        .statement_cache_capacity(if config.prepared_statements {
            STATEMENT_CACHE
        } else {
            0
        })
        .application_name("distributed-locker")
}

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// Whether `pool`'s connections keep prepared statements (sqlx tells its options only as a
/// URL).
fn statement_cache_on(pool: &PgPool) -> bool {
    use sqlx::ConnectOptions;
    pool.connect_options()
        .to_url_lossy()
        .query_pairs()
        .find(|(name, _)| name == "statement-cache-capacity")
        .map_or(true, |(_, capacity)| capacity != "0")
}

/// A pool of connections to the PostgreSQL store; made by [`PostgresConfig`], which is the
/// [`BackendFactory`].
pub struct PostgresBackend {
    config: PostgresConfig,
    /// The pool, and the connections kept out of it between operations.
    warm: Warm,
    sql: Statements,
    /// The functions of migration 3 are there: the compare-and-set operations call them, and
    /// an acquire decides about a dead holder in the same call.
    functions: bool,
    /// Statements are prepared once per connection and their values bound (see
    /// [`PostgresConfigBuilder::prepared_statements`](crate::PostgresConfigBuilder::prepared_statements)),
    /// instead of written into the text.
    prepared: bool,
    /// Release notifications, started at the first wait.
    notifier: std::sync::OnceLock<crate::notify::Notifier>,
}

/// One row of a compare-and-set statement.
struct CasRow {
    won: bool,
    fencing_token: i64,
    record: String,
    owner_hash: String,
}

impl CasRow {
    fn from_pg(row: &PgRow) -> Result<Self> {
        let get = |e: sqlx::Error| map_error(e);
        Ok(CasRow {
            won: row.try_get("won").map_err(get)?,
            fencing_token: row.try_get("fencing_token").map_err(get)?,
            record: row.try_get("record").map_err(get)?,
            owner_hash: row.try_get("owner_hash").map_err(get)?,
        })
    }

    fn lock(&self, key: &str) -> Result<LockData> {
        lock_from_row(key, &self.record, Some(self.fencing_token))
    }
}

/// The answer of the `acquire` function.
struct FnAcquireRow {
    decision: String,
    lock: CasRow,
    dead: Option<(i64, String)>,
}

impl FnAcquireRow {
    fn from_pg(row: &PgRow) -> Result<Self> {
        let get = |e: sqlx::Error| map_error(e);
        let dead_token: Option<i64> = row.try_get("o_dead_token").map_err(get)?;
        let dead_record: Option<String> = row.try_get("o_dead_record").map_err(get)?;
        let decision: String = row.try_get("o_decision").map_err(get)?;
        Ok(FnAcquireRow {
            lock: CasRow {
                won: decision == "acquired" || decision == "took_over",
                fencing_token: row.try_get("o_token").map_err(get)?,
                record: row.try_get("o_record").map_err(get)?,
                owner_hash: row.try_get("o_owner").map_err(get)?,
            },
            dead: dead_token.zip(dead_record),
            decision,
        })
    }
}

impl FnAcquireRow {
    /// From the text of the call's composite answer (without prepared statements).
    fn from_text(row: &PgRow) -> Result<Self> {
        let [decision, token, record, owner, dead_token, dead_record] = composite_fields(row)?;
        let decision = decision.ok_or_else(|| bad_answer("no decision"))?;
        let dead_token = dead_token.map(|t| number(&t)).transpose()?;
        Ok(FnAcquireRow {
            lock: CasRow {
                won: decision == "acquired" || decision == "took_over",
                fencing_token: number(&token.ok_or_else(|| bad_answer("no token"))?)?,
                record: record.ok_or_else(|| bad_answer("no record"))?,
                owner_hash: owner.ok_or_else(|| bad_answer("no owner"))?,
            },
            dead: dead_token.zip(dead_record),
            decision,
        })
    }
}

/// The fields of the composite answer of a lock function called without prepared statements
/// (one text column `o`), `N` of them.
fn composite_fields<const N: usize>(row: &PgRow) -> Result<[Option<String>; N]> {
    let text: String = row.try_get("o").map_err(map_error)?;
    crate::composite::fields(&text)
        .and_then(|fields| <[Option<String>; N]>::try_from(fields).ok())
        .ok_or_else(|| bad_answer(&format!("{text:?} is not a composite of {N} fields")))
}

fn number(text: &str) -> Result<i64> {
    text.parse()
        .map_err(|_| bad_answer(&format!("{text:?} is not a number")))
}

fn bad_answer(what: &str) -> Error {
    Error::new(
        ErrorKind::Other,
        format!("postgres: unexpected answer of a lock function: {what}"),
    )
}

/// [`fn_cas_row`] from the text of the call's composite answer (without prepared statements).
fn fn_cas_text(row: &PgRow) -> Result<Option<CasRow>> {
    let [won, token, record, owner] = composite_fields(row)?;
    let won = match won.as_deref() {
        Some("t") => true,
        Some("f") => false,
        other => return Err(bad_answer(&format!("{other:?} is not a boolean"))),
    };
    let token = token.map(|t| number(&t)).transpose()?;
    Ok(cas_row(won, token, record, owner))
}

/// The answer of the `extend` and `release` functions: `None` when no live lock is stored.
fn fn_cas_row(row: &PgRow) -> Result<Option<CasRow>> {
    let get = |e: sqlx::Error| map_error(e);
    let won: bool = row.try_get("o_won").map_err(get)?;
    let token: Option<i64> = row.try_get("o_token").map_err(get)?;
    let record: Option<String> = row.try_get("o_record").map_err(get)?;
    let owner: Option<String> = row.try_get("o_owner").map_err(get)?;
    Ok(cas_row(won, token, record, owner))
}

/// The lock an `extend` or `release` function answered: `None` when no live lock is stored.
fn cas_row(
    won: bool,
    token: Option<i64>,
    record: Option<String>,
    owner: Option<String>,
) -> Option<CasRow> {
    match (token, record, owner) {
        (Some(fencing_token), Some(record), Some(owner_hash)) => Some(CasRow {
            won,
            fencing_token,
            record,
            owner_hash,
        }),
        _ => None,
    }
}

impl PostgresBackend {
    /// Opens a pool (at least one connection, so an unreachable server fails here, within the
    /// connect timeout) and, unless disabled, creates or upgrades the tables.
    pub async fn connect(config: &PostgresConfig) -> Result<Self> {
        let pool = match &config.pool {
            Some(pool) => {
                if config.prepared_statements && !statement_cache_on(pool) {
                    return Err(Error::invalid_input(
                        "prepared_statements=true needs the application pool's statement cache \
                         (its statement-cache-capacity is 0): without it, every call would \
                         prepare a statement that is never closed",
                    ));
                }
                pool.clone()
            }
            None => Self::open_pool(config).await?,
        };
        if config.migrate {
            crate::migrations::run(&pool, &config.tables)
                .await
                .map_err(map_error)?;
        }
        let functions: bool = sqlx::query(&config.tables.render(HAS_FUNCTIONS))
            .persistent(false)
            .fetch_one(&pool)
            .await
            .and_then(|row| row.try_get("present"))
            .map_err(map_error)?;
        if !functions {
            tracing::warn!(
                table = %config.tables.locks,
                "the functions of distributed-locker's migration 3 are missing (migrate=false?): \
                 locks work, with slower statements and two or three round trips to take over \
                 a dead holder's lock; apply the migration (see locker-postgres's README)"
            );
        }
        Ok(PostgresBackend {
            prepared: config.prepared_statements,
            functions,
            sql: Statements::new(&config.tables, config.release_events),
            config: config.clone(),
            warm: if config.pool.is_some() {
                Warm::none(pool)
            } else {
                Warm::own(pool, config.max_connections)
            },
            notifier: std::sync::OnceLock::new(),
        })
    }

    /// A pool of the locker's own, from the configuration's connect options.
    async fn open_pool(config: &PostgresConfig) -> Result<PgPool> {
        let options = connect_options(config);
        // sqlx's pool retries a refused connection until its acquire timeout, and then says
        // only "pool timed out". One connection of our own first brings every definite failure
        // at once, naming its cause (refused, no such host, credentials or database refused,
        // TLS); the pool then connects as before. It costs one more connection per connect.
        match tokio::time::timeout(config.connect_timeout, PgConnection::connect_with(&options))
            .await
        {
            Ok(Ok(probe)) => {
                let _ = probe.close().await;
            }
            Ok(Err(e)) => {
                let e = map_connect_error(&options, e);
                if e.is_definite() {
                    return Err(e);
                }
                // Anything else (a server starting up...): the pool retries it as before.
            }
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "postgres: no answer from {} within {:?}",
                        target(&options),
                        config.connect_timeout
                    ),
                ))
            }
        }
        PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(config.connect_timeout)
            .connect_with(options)
            .await
            .map_err(map_error)
    }

    /// The configuration this pool was made with.
    pub fn config(&self) -> &PostgresConfig {
        &self.config
    }

    /// Stores any text as the record of `key` (for corruption tests and tools); the owner is
    /// the record's `ownerHash` when it has one, else nobody.
    #[doc(hidden)]
    pub async fn raw_put(&self, key: &str, record: &str, ttl: Duration) -> Result<()> {
        let owner = LockData::from_json(record)
            .map(|d| d.owner_hash)
            .unwrap_or_default();
        let ttl = ttl_ms(ttl)? as f64;
        self.execute(
            &self.sql.put_raw,
            &[
                Value::Text(key),
                Value::Text(record),
                Value::Float(ttl),
                Value::Text(&owner),
            ],
        )
        .await
    }

    /// The record text of `key`, if a live one is stored.
    #[doc(hidden)]
    pub async fn raw_get(&self, key: &str) -> Result<Option<String>> {
        let row = self
            .fetch_optional(&self.sql.get_raw, &[Value::Text(key)])
            .await?;
        row.map(|r| r.try_get("record").map_err(map_error))
            .transpose()
    }

    async fn timed<T>(
        &self,
        query: impl std::future::Future<Output = std::result::Result<T, sqlx::Error>>,
    ) -> Result<T> {
        locker_sql::within(self.config.command_timeout, "PostgreSQL", query, map_error).await
    }

    /// `statement` with `values` bound, as a prepared statement.
    fn bound<'q>(&self, statement: &'q Statement, values: &[Value<'q>]) -> Result<PgQuery<'q>> {
        statement.check(values)?;
        let mut query = sqlx::query(statement.sql());
        for value in values {
            query = match *value {
                Value::Text(s) => query.bind(s),
                Value::MaybeText(s) => query.bind(s),
                Value::Float(f) => query.bind(f),
                Value::Bool(b) => query.bind(b),
                Value::Texts(items) => query.bind(items),
            };
        }
        Ok(query.persistent(true))
    }

    async fn timed_prepared<T>(
        &self,
        query: impl std::future::Future<Output = std::result::Result<T, sqlx::Error>>,
    ) -> Result<T> {
        locker_sql::within(
            self.config.command_timeout,
            "PostgreSQL",
            query,
            map_prepared_error,
        )
        .await
    }

    /// Runs `statement` with `values` on a connection of the pool, in one round trip; its rows.
    async fn rows(&self, statement: &Statement, values: &[Value<'_>]) -> Result<Vec<PgRow>> {
        if self.prepared {
            let query = self.bound(statement, values)?;
            return self
                .timed_prepared(async {
                    let mut c = self.warm.checkout().await?;
                    let rows = query.fetch_all(c.conn()).await?;
                    c.keep();
                    Ok(rows)
                })
                .await;
        }
        let sql = statement.with(values)?;
        self.timed(async {
            let mut c = self.warm.checkout().await?;
            let rows = Executor::fetch_all(c.conn(), sqlx::raw_sql(&sql)).await?;
            c.keep();
            Ok(rows)
        })
        .await
    }

    /// [`rows`](Self::rows), for a statement of at most one row.
    async fn fetch_optional(
        &self,
        statement: &Statement,
        values: &[Value<'_>],
    ) -> Result<Option<PgRow>> {
        Ok(self.rows(statement, values).await?.into_iter().next())
    }

    /// [`rows`](Self::rows), for a statement of one row.
    async fn fetch_one(&self, statement: &Statement, values: &[Value<'_>]) -> Result<PgRow> {
        self.fetch_optional(statement, values)
            .await?
            .ok_or_else(|| Error::new(ErrorKind::Other, "postgres: the statement answered no row"))
    }

    /// [`rows`](Self::rows), for a statement whose rows do not matter.
    async fn execute(&self, statement: &Statement, values: &[Value<'_>]) -> Result<()> {
        self.rows(statement, values).await.map(drop)
    }

    /// Runs a compare-and-set statement. In READ COMMITTED, a row committed by another
    /// transaction after this statement's snapshot can make it return nothing (it neither won
    /// nor saw the holder); that race is retried.
    async fn compare_and_set(
        &self,
        statement: &Statement,
        values: &[Value<'_>],
        retry_when_empty: bool,
    ) -> Result<Option<CasRow>> {
        for _ in 0..5 {
            let row = self.fetch_optional(statement, values).await?;
            match row {
                Some(row) => return CasRow::from_pg(&row).map(Some),
                None if retry_when_empty => continue,
                None => return Ok(None),
            }
        }
        Err(Error::unavailable(
            "the lock row kept changing under the statement; try again",
        ))
    }

    /// One call of the `acquire` function: with `check`, a dead holder's lock is taken over in
    /// the same call.
    async fn call_acquire(
        &self,
        key: &str,
        data: &LockData,
        ttl: Duration,
        dead_owner: Option<&str>,
        check: bool,
    ) -> Result<FnAcquireRow> {
        check_key(key)?;
        let ttl = ttl_ms(ttl)? as f64;
        let record = stored_record(data);
        let values = [
            Value::Text(key),
            Value::Text(&data.owner_hash),
            Value::Text(&record),
            Value::Float(ttl),
            Value::MaybeText(dead_owner),
            Value::Bool(check),
        ];
        if self.prepared {
            FnAcquireRow::from_pg(&self.fetch_one(&self.sql.fn_acquire, &values).await?)
        } else {
            FnAcquireRow::from_text(&self.fetch_one(&self.sql.fn_acquire_text, &values).await?)
        }
    }

    async fn create(
        &self,
        key: &str,
        data: &LockData,
        ttl: Duration,
        dead_owner: Option<&str>,
    ) -> Result<AcquireOutcome> {
        if self.functions {
            let row = self.call_acquire(key, data, ttl, dead_owner, false).await?;
            let lock = row.lock.lock(key)?;
            return Ok(if row.lock.won {
                AcquireOutcome::Acquired(lock)
            } else {
                AcquireOutcome::Held(lock)
            });
        }
        check_key(key)?;
        let ttl = ttl_ms(ttl)? as f64;
        let record = stored_record(data);
        // With no dead owner, `$5` is NULL and matches no row.
        let dead: Option<&str> = dead_owner;
        let row = self
            .compare_and_set(
                &self.sql.acquire,
                &[
                    Value::Text(key),
                    Value::Text(&data.owner_hash),
                    Value::Text(&record),
                    Value::Float(ttl),
                    Value::MaybeText(dead),
                ],
                true,
            )
            .await?
            .ok_or_else(|| Error::unavailable("no answer row"))?;
        let lock = row.lock(key)?;
        Ok(if row.won {
            AcquireOutcome::Acquired(lock)
        } else {
            AcquireOutcome::Held(lock)
        })
    }
}

/// The longest key, in bytes: a btree index row holds at most about 2.7 KB, so longer keys
/// are refused up front with a clear error instead of by the server.
pub const MAX_KEY_LEN: usize = 2048;

/// PostgreSQL `text` cannot hold NUL, and the key's index limits its length; say so instead of
/// letting the server refuse it.
fn check_key(key: &str) -> Result<()> {
    validate_key(key)?;
    if key.len() > MAX_KEY_LEN {
        return Err(Error::invalid_input(format!(
            "lock key is {} bytes, more than PostgreSQL's index allows ({MAX_KEY_LEN})",
            key.len()
        )));
    }
    if key.contains('\0') {
        return Err(Error::invalid_input(
            "PostgreSQL text cannot hold NUL characters (in the lock key)",
        ));
    }
    Ok(())
}

#[async_trait]
impl LockBackend for PostgresBackend {
    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::default();
        c.fencing = true;
        c.ttl_granularity = Duration::from_millis(1);
        c.shared_across_processes = true;
        c.atomic_take_over = true;
        c.max_key_len = Some(MAX_KEY_LEN);
        c.release_events = self.config.release_events;
        c.checked_acquire = self.functions;
        c
    }

    async fn acquire(&self, key: &str, data: &LockData, ttl: Duration) -> Result<AcquireOutcome> {
        self.create(key, data, ttl, None).await
    }

    async fn acquire_checked(
        &self,
        key: &str,
        data: &LockData,
        ttl: Duration,
    ) -> Result<AcquireDecision> {
        if !self.functions {
            return self
                .create(key, data, ttl, None)
                .await
                .map(AcquireDecision::from);
        }
        let row = self.call_acquire(key, data, ttl, None, true).await?;
        let lock = row.lock.lock(key)?;
        Ok(match (row.decision.as_str(), row.dead) {
            ("acquired", _) => AcquireDecision::Acquired(lock),
            ("took_over", Some((token, record))) => AcquireDecision::TookOver {
                stored: lock,
                dead: lock_from_row(key, &record, Some(token))?,
            },
            ("live", _) => AcquireDecision::HeldByLive(lock),
            ("held", _) => AcquireDecision::Held(lock),
            (other, _) => {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!("the acquire function answered {other:?}"),
                ))
            }
        })
    }

    async fn extend(
        &self,
        key: &str,
        data: &LockData,
        ttl: Duration,
        owner_hash: &str,
    ) -> Result<ExtendOutcome> {
        check_key(key)?;
        let ttl = ttl_ms(ttl)? as f64;
        let record = stored_record(data);
        let values = [
            Value::Text(key),
            Value::Text(&record),
            Value::Float(ttl),
            Value::Text(owner_hash),
        ];
        let row = if self.functions && self.prepared {
            fn_cas_row(&self.fetch_one(&self.sql.fn_extend, &values).await?)?
        } else if self.functions {
            fn_cas_text(&self.fetch_one(&self.sql.fn_extend_text, &values).await?)?
        } else {
            self.compare_and_set(&self.sql.extend, &values, false)
                .await?
        };
        match row {
            None => Ok(ExtendOutcome::NoKey),
            Some(row) if row.won => Ok(ExtendOutcome::Extended(row.lock(key)?)),
            Some(row) if row.owner_hash == owner_hash => Err(Error::unavailable(
                "the lock row changed during the extension; try again",
            )),
            Some(row) => Ok(ExtendOutcome::Held(row.lock(key)?)),
        }
    }

    async fn release(&self, key: &str, owner_hash: &str) -> Result<ReleaseOutcome> {
        check_key(key)?;
        let row = if self.functions {
            let values = [
                Value::Text(key),
                Value::Text(owner_hash),
                Value::Bool(self.config.release_events),
            ];
            if self.prepared {
                fn_cas_row(&self.fetch_one(&self.sql.fn_release, &values).await?)?
            } else {
                fn_cas_text(&self.fetch_one(&self.sql.fn_release_text, &values).await?)?
            }
        } else {
            let values = [Value::Text(key), Value::Text(owner_hash)];
            self.compare_and_set(&self.sql.release, &values, false)
                .await?
        };
        match row {
            None => Ok(ReleaseOutcome::NoKey),
            Some(row) if row.won => Ok(ReleaseOutcome::Released),
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
        let ttl = ttl_ms(ttl)? as f64;
        self.execute(
            &self.sql.ping,
            &[
                Value::Text(process_hash),
                Value::Text(&data.to_json()),
                Value::Float(ttl),
            ],
        )
        .await
    }

    async fn read(&self, key: &str) -> Result<Option<LockData>> {
        check_key(key)?;
        let row = self
            .fetch_optional(&self.sql.read, &[Value::Text(key)])
            .await?;
        match row {
            None => Ok(None),
            Some(row) => {
                let record: String = row.try_get("record").map_err(map_error)?;
                let token: i64 = row.try_get("fencing_token").map_err(map_error)?;
                lock_from_row(key, &record, Some(token)).map(Some)
            }
        }
    }

    async fn read_many(&self, keys: &[&str]) -> Result<Vec<Result<Option<LockData>>>> {
        let reads = locker_sql::ManyReads::new(keys, check_key);
        let wanted = reads.wanted();
        if wanted.is_empty() {
            return Ok(reads.finish([]));
        }
        let rows = self
            .rows(&self.sql.read_many, &[Value::Texts(&wanted)])
            .await?;
        let mut found = Vec::with_capacity(rows.len());
        for row in rows {
            let key: String = row.try_get("key").map_err(map_error)?;
            let record: String = row.try_get("record").map_err(map_error)?;
            let token: i64 = row.try_get("fencing_token").map_err(map_error)?;
            found.push((key, record, Some(token)));
        }
        Ok(reads.finish(found))
    }

    async fn read_process(&self, process_hash: &str) -> Result<Option<ProcessData>> {
        let row = self
            .fetch_optional(&self.sql.read_process, &[Value::Text(process_hash)])
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
        self.execute(&self.sql.forget_process, &[Value::Text(process_hash)])
            .await
    }

    async fn watch_release(&self, key: &str) -> Result<Option<locker_core::ReleaseWatch>> {
        if !self.config.release_events {
            return Ok(None);
        }
        let notifier = self.notifier.get_or_init(|| {
            // The listener's connection comes from a pool of its own: the lock pool keeps all
            // of its connections for the locks (and the probe).
            let listener_pool = PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(self.config.connect_timeout)
                .connect_lazy_with(connect_options(&self.config));
            crate::notify::Notifier::start(
                self.warm.pool().clone(),
                listener_pool,
                self.config.command_timeout,
            )
        });
        notifier.watch(key).await
    }

    async fn liveness_left(&self, process_hash: &str) -> Result<Option<Duration>> {
        let row = self
            .fetch_optional(&self.sql.liveness_left, &[Value::Text(process_hash)])
            .await?;
        let ms: f64 = match row {
            None => return Ok(Some(Duration::ZERO)),
            Some(row) => row.try_get("ms").map_err(map_error)?,
        };
        Ok(Some(
            Duration::try_from_secs_f64(ms / 1000.0).unwrap_or_default(),
        ))
    }
}

impl fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresBackend")
            .field("config", &self.config)
            .field("pool_size", &self.warm.pool().size())
            .finish()
    }
}

#[async_trait]
impl BackendFactory for PostgresConfig {
    async fn connect(&self) -> Result<Arc<dyn LockBackend>> {
        Ok(Arc::new(PostgresBackend::connect(self).await?))
    }

    /// Never the application's pool: one of the reporter's own.
    async fn connect_reporter(&self) -> Result<Arc<dyn LockBackend>> {
        Ok(Arc::new(
            PostgresBackend::connect(&self.for_reporter()).await?,
        ))
    }
}

#[cfg(test)]
mod statement_tests {
    use super::*;

    #[test]
    fn the_release_notifies_on_the_listened_channel() {
        assert!(RELEASE_NOTIFY.contains(&format!("pg_notify('{}', $1)", crate::notify::CHANNEL)));
        assert!(!RELEASE.contains("pg_notify"));
    }
}
