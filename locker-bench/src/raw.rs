//! The cheapest way to do what a lock cycle does, per backend, with the same client library:
//! create-if-absent with a TTL, then delete-if-owner.

use std::sync::Arc;

use fred::prelude::{ClientLike, Expiration, KeysInterface, LuaInterface, SetOptions};
use redis::aio::ConnectionManager;

const COMPARE_AND_DELETE: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

pub(crate) enum Raw {
    Redis(ConnectionManager, redis::Script),
    Fred(fred::prelude::Client, String),
    Postgres(sqlx::PgPool),
    Sqlite(sqlx::SqlitePool),
    Etcd(Box<etcd_client::Client>),
}

type Res<T> = Result<T, String>;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Raw {
    pub(crate) async fn connect(backend: &str, url: &str) -> Res<Arc<Self>> {
        let raw = match backend {
            "redis" => {
                let client = redis::Client::open(url).map_err(err)?;
                let conn = ConnectionManager::new(client).await.map_err(err)?;
                Raw::Redis(conn, redis::Script::new(COMPARE_AND_DELETE))
            }
            "fred" => {
                let url = url.split('?').next().unwrap_or(url);
                let config = fred::prelude::Config::from_url(url).map_err(err)?;
                let client = fred::prelude::Builder::from_config(config)
                    .build()
                    .map_err(err)?;
                client.init().await.map_err(err)?;
                let sha: String = client.script_load(COMPARE_AND_DELETE).await.map_err(err)?;
                Raw::Fred(client, sha)
            }
            "postgres" => {
                // The cheapest sqlx offers: prepared statements kept on the connection (one
                // round trip each, the statement planned once), and no test of a connection
                // before each use (sqlx's default, one more round trip).
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(8)
                    .test_before_acquire(false)
                    .connect(url)
                    .await
                    .map_err(err)?;
                sqlx::raw_sql(
                    "CREATE TABLE IF NOT EXISTS raw_locks (key text PRIMARY KEY, owner text NOT NULL,
                     expires_at timestamptz NOT NULL)",
                )
                .execute(&pool)
                .await
                .map_err(err)?;
                Raw::Postgres(pool)
            }
            "sqlite" => {
                let path = url.trim_start_matches("sqlite://");
                let options = sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(path.replace("locks.db", "raw.db"))
                    .create_if_missing(true)
                    .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                    .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
                    .busy_timeout(std::time::Duration::from_secs(5));
                let pool = sqlx::sqlite::SqlitePoolOptions::new()
                    .max_connections(4)
                    .connect_with(options)
                    .await
                    .map_err(err)?;
                sqlx::raw_sql(
                    "CREATE TABLE IF NOT EXISTS raw_locks (key TEXT PRIMARY KEY, owner TEXT NOT NULL,
                     expires_at INTEGER NOT NULL)",
                )
                .execute(&pool)
                .await
                .map_err(err)?;
                Raw::Sqlite(pool)
            }
            "etcd" => {
                let endpoints: Vec<String> = url
                    .trim_start_matches("etcd://")
                    .split(',')
                    .map(|h| format!("http://{h}"))
                    .collect();
                Raw::Etcd(Box::new(
                    etcd_client::Client::connect(endpoints, None)
                        .await
                        .map_err(err)?,
                ))
            }
            other => return Err(format!("no raw baseline for {other}")),
        };
        Ok(Arc::new(raw))
    }

    /// One create-if-absent; `true` when it created.
    pub(crate) async fn acquire(&self, key: &str, owner: &str) -> Res<bool> {
        match self {
            Raw::Redis(conn, _) => {
                let mut c = conn.clone();
                let set: Option<String> = redis::cmd("SET")
                    .arg(key)
                    .arg(owner)
                    .arg("NX")
                    .arg("PX")
                    .arg(300_000)
                    .query_async(&mut c)
                    .await
                    .map_err(err)?;
                Ok(set.is_some())
            }
            Raw::Fred(client, _) => {
                let set: Option<String> = client
                    .set(
                        key,
                        owner,
                        Some(Expiration::PX(300_000)),
                        Some(SetOptions::NX),
                        false,
                    )
                    .await
                    .map_err(err)?;
                Ok(set.is_some())
            }
            Raw::Postgres(pool) => Ok(sqlx::query(
                "INSERT INTO raw_locks (key, owner, expires_at) VALUES ($1, $2, now() + interval '5 minutes')
                 ON CONFLICT DO NOTHING",
            )
            .bind(key)
            .bind(owner)
            .execute(pool)
            .await
            .map_err(err)?
            .rows_affected()
                == 1),
            Raw::Sqlite(pool) => Ok(sqlx::query(
                "INSERT INTO raw_locks (key, owner, expires_at) VALUES (?1, ?2, 0) ON CONFLICT DO NOTHING",
            )
            .bind(key)
            .bind(owner)
            .execute(pool)
            .await
            .map_err(err)?
            .rows_affected()
                == 1),
            Raw::Etcd(client) => {
                use etcd_client::{Compare, CompareOp, Txn, TxnOp};
                let txn = Txn::new()
                    .when([Compare::create_revision(key, CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key, owner, None)]);
                Ok((**client).clone().txn(txn).await.map_err(err)?.succeeded())
            }
        }
    }

    /// One delete-if-owner.
    pub(crate) async fn release(&self, key: &str, owner: &str) -> Res<()> {
        match self {
            Raw::Redis(conn, script) => {
                let mut c = conn.clone();
                let _: i64 = script
                    .key(key)
                    .arg(owner)
                    .invoke_async(&mut c)
                    .await
                    .map_err(err)?;
            }
            Raw::Fred(client, sha) => {
                let _: i64 = client
                    .evalsha(sha.as_str(), vec![key], vec![owner])
                    .await
                    .map_err(err)?;
            }
            Raw::Postgres(pool) => {
                sqlx::query("DELETE FROM raw_locks WHERE key = $1 AND owner = $2")
                    .bind(key)
                    .bind(owner)
                    .execute(pool)
                    .await
                    .map_err(err)?;
            }
            Raw::Sqlite(pool) => {
                sqlx::query("DELETE FROM raw_locks WHERE key = ?1 AND owner = ?2")
                    .bind(key)
                    .bind(owner)
                    .execute(pool)
                    .await
                    .map_err(err)?;
            }
            Raw::Etcd(client) => {
                use etcd_client::{Compare, CompareOp, Txn, TxnOp};
                let txn = Txn::new()
                    .when([Compare::value(key, CompareOp::Equal, owner)])
                    .and_then([TxnOp::delete(key, None)]);
                (**client).clone().txn(txn).await.map_err(err)?;
            }
        }
        Ok(())
    }
}
