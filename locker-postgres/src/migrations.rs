//! Embedded migrations, run on connect unless disabled: numbered SQL steps, applied once each,
//! in one transaction that a transaction-scoped advisory lock serializes across processes (a
//! session lock would not survive a transaction-mode pooler).

use locker_sql::Tables;
use sqlx::postgres::PgPool;
use sqlx::{Executor, Row};

/// The steps, in order; never edit a published one, add a new one.
pub const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "CREATE TABLE IF NOT EXISTS {locks} (
        key           text        PRIMARY KEY,
        owner_hash    text        NOT NULL,
        record        text        NOT NULL,
        fencing_token bigint      NOT NULL,
        expires_at    timestamptz NOT NULL
    );
    CREATE INDEX IF NOT EXISTS {prefix}locks_expires_at ON {locks} (expires_at);
    CREATE TABLE IF NOT EXISTS {processes} (
        process_hash  text        PRIMARY KEY,
        record        text        NOT NULL,
        expires_at    timestamptz NOT NULL
    );
    CREATE INDEX IF NOT EXISTS {prefix}processes_expires_at ON {processes} (expires_at);
    CREATE SEQUENCE IF NOT EXISTS {fencing};",
    ),
    // Fencing order: tokens are drawn from the sequence under the key's grant lock, so they
    // follow the grant order only if every `nextval`, from any session, is greater than every
    // earlier one. That holds for the sequence as version 1 creates it; this step pins it,
    // in case the sequence was altered by hand (a per-session CACHE hands out values out of
    // order, CYCLE starts over). It keeps the current value: tokens already given stay below
    // every later one.
    (2, "ALTER SEQUENCE {fencing} NO CYCLE CACHE 1;"),
];

/// Creates the schema and applies the steps not applied yet.
pub(crate) async fn run(pool: &PgPool, tables: &Tables) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(format!("distributed-locker migrations {}", tables.locks))
        .persistent(false)
        .execute(&mut *tx)
        .await?;
    tx.execute(sqlx::raw_sql(&tables.render(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {migrations} (
             version    integer     PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         );",
    )))
    .await?;
    let applied: Vec<i32> = sqlx::query(&tables.render("SELECT version FROM {migrations}"))
        .persistent(false)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|row| row.try_get::<i32, _>("version"))
        .collect::<Result<_, _>>()?;
    for (version, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        tx.execute(sqlx::raw_sql(&tables.render(sql))).await?;
        sqlx::query(&tables.render("INSERT INTO {migrations} (version) VALUES ($1)"))
            .bind(version)
            .persistent(false)
            .execute(&mut *tx)
            .await?;
        tracing::info!(version, table = %tables.locks, "applied distributed-locker migration");
    }
    tx.commit().await
}
