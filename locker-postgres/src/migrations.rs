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
    // The compare-and-set operations as functions: a function's statements are planned once
    // per connection and kept, where the equivalent one-statement CTEs were parsed and
    // planned on every call (0.1 to 0.2 ms of planning each, more than their execution), and
    // a function can decide in steps (the holder's liveness, for a one-call acquire). They
    // take the same grant lock as the statements of the versions before, so both can run
    // side by side during an upgrade.
    (3, FUNCTIONS),
];

/// Migration 3: `{prefix}acquire`, `{prefix}extend` and `{prefix}release`, in the tables'
/// schema.
///
/// `acquire` holds the key's grant lock (a transaction-scoped advisory lock, the one every
/// granting statement takes, so grants of a key happen one at a time and draw their fencing
/// tokens in grant order), locks the key's row, and decides:
/// - no live row: `acquired`;
/// - a live row of `p_dead` (a take-over): `took_over`;
/// - with `p_check`, a live row whose holder has no live liveness row: `took_over`; whose
///   holder has one: `live`; whose record is not a whole record (not JSON, or without the
///   string `ownerHash`, `processHash`, `acquiredAt` and `extendedAt` every record has):
///   `held`, for the caller, whose decoding finds it corrupt;
/// - otherwise `held`.
///
/// The holder's process is read from the record's text when it starts as this library writes
/// it (`{"ownerHash":"…","processHash":"…",`, no escapes, ending in `}`, with `acquiredAt` and
/// `extendedAt`); any other record is decoded, in a block that turns any error into "cannot
/// tell", so a corrupt record never makes the function fail and is not replaced.
const FUNCTIONS: &str = r#"
CREATE OR REPLACE FUNCTION {schema}."{prefix}acquire"(
    p_key text, p_owner text, p_record text, p_ttl_ms float8, p_dead text, p_check boolean,
    OUT o_decision text, OUT o_token bigint, OUT o_record text, OUT o_owner text,
    OUT o_dead_token bigint, OUT o_dead_record text)
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_owner text;
    v_record text;
    v_token bigint;
    v_live boolean;
    v_process text;
    v_json json;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('distributed-locker grant {locks}'), hashtext(p_key));
    -- Locked, whatever its expiry: an extend or a release of this row waits for this
    -- transaction, and another grant waits for the grant lock.
    SELECT l.owner_hash, l.record, l.fencing_token, l.expires_at > now()
        INTO v_owner, v_record, v_token, v_live
        FROM {locks} l WHERE l.key = p_key FOR UPDATE;
    IF FOUND AND v_live THEN
        IF v_owner = p_dead AND v_owner <> p_owner THEN
            o_decision := 'took_over';
        ELSIF p_check AND v_owner <> p_owner THEN
            -- The holder's process: read from the record as this library writes it, or else
            -- decoded; a record that is not JSON with a string processHash is left to the
            -- caller, whose decoding finds it corrupt.
            v_process := substring(v_record
                from '^\{"ownerHash":"[^"\\]*","processHash":"([^"\\]*)",.*\}$');
            IF v_process IS NULL
               OR position('"acquiredAt":"' IN v_record) = 0
               OR position('"extendedAt":"' IN v_record) = 0 THEN
                v_process := NULL;
                BEGIN
                    v_json := v_record::json;
                    IF json_typeof(v_json -> 'ownerHash') = 'string'
                       AND json_typeof(v_json -> 'processHash') = 'string'
                       AND json_typeof(v_json -> 'acquiredAt') = 'string'
                       AND json_typeof(v_json -> 'extendedAt') = 'string' THEN
                        v_process := v_json ->> 'processHash';
                    END IF;
                EXCEPTION WHEN others THEN
                    -- Not JSON, a NUL in a string, nesting too deep: the caller decides.
                    v_process := NULL;
                END;
            END IF;
            IF v_process IS NULL THEN
                o_decision := 'held';
            ELSIF EXISTS (SELECT 1 FROM {processes} p
                          WHERE p.process_hash = v_process AND p.expires_at > now()) THEN
                o_decision := 'live';
            ELSE
                o_decision := 'took_over';
            END IF;
        ELSE
            o_decision := 'held';
        END IF;
        IF o_decision <> 'took_over' THEN
            o_token := v_token; o_record := v_record; o_owner := v_owner;
            RETURN;
        END IF;
        o_dead_token := v_token; o_dead_record := v_record;
    ELSE
        o_decision := 'acquired';
    END IF;
    INSERT INTO {locks} AS l (key, owner_hash, record, fencing_token, expires_at)
        VALUES (p_key, p_owner, p_record, nextval('{fencing}'),
                now() + interval '1 millisecond' * p_ttl_ms)
        ON CONFLICT (key) DO UPDATE
            SET owner_hash = EXCLUDED.owner_hash, record = EXCLUDED.record,
                fencing_token = EXCLUDED.fencing_token, expires_at = EXCLUDED.expires_at
        RETURNING l.fencing_token, l.record, l.owner_hash INTO o_token, o_record, o_owner;
END
$fn$;

CREATE OR REPLACE FUNCTION {schema}."{prefix}extend"(
    p_key text, p_record text, p_ttl_ms float8, p_owner text,
    OUT o_won boolean, OUT o_token bigint, OUT o_record text, OUT o_owner text)
LANGUAGE plpgsql VOLATILE AS $fn$
BEGIN
    UPDATE {locks} l SET record = p_record,
            expires_at = now() + interval '1 millisecond' * p_ttl_ms
        WHERE l.key = p_key AND l.owner_hash = p_owner AND l.expires_at > now()
        RETURNING l.fencing_token, l.record, l.owner_hash INTO o_token, o_record, o_owner;
    o_won := FOUND;
    IF NOT o_won THEN
        SELECT l.fencing_token, l.record, l.owner_hash INTO o_token, o_record, o_owner
            FROM {locks} l WHERE l.key = p_key AND l.expires_at > now();
    END IF;
END
$fn$;

CREATE OR REPLACE FUNCTION {schema}."{prefix}release"(
    p_key text, p_owner text, p_notify boolean,
    OUT o_won boolean, OUT o_token bigint, OUT o_record text, OUT o_owner text)
LANGUAGE plpgsql VOLATILE AS $fn$
BEGIN
    DELETE FROM {locks} l
        WHERE l.key = p_key AND l.owner_hash = p_owner AND l.expires_at > now()
        RETURNING l.fencing_token, l.record, l.owner_hash INTO o_token, o_record, o_owner;
    o_won := FOUND;
    IF o_won THEN
        IF p_notify THEN
            PERFORM pg_notify('distributed_locker_released', p_key);
        END IF;
    ELSE
        SELECT l.fencing_token, l.record, l.owner_hash INTO o_token, o_record, o_owner
            FROM {locks} l WHERE l.key = p_key AND l.expires_at > now();
    END IF;
END
$fn$;
"#;

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

#[cfg(test)]
mod tests {
    use super::*;

    /// Teams that migrate themselves copy the README's SQL: it must be the migrations', as
    /// rendered for the default schema and prefix.
    #[test]
    fn the_readme_shows_migration_3_as_it_runs() {
        let tables = Tables::new(Some("public"), "locker_").expect("tables");
        let readme = include_str!("../README.md");
        let sql = tables.render(FUNCTIONS);
        assert!(
            readme.contains(sql.trim()),
            "README.md does not show migration 3 as rendered:\n{sql}"
        );
        assert_eq!(MIGRATIONS.last().map(|(v, _)| *v), Some(3));
    }
}
