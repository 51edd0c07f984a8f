//! The one mapping of sqlx's errors (PostgreSQL) to the project's.

use locker_core::{find_io_error, is_definite_io_error, Error, ErrorKind};
use sqlx::postgres::PgConnectOptions;

pub(crate) fn map_error(e: sqlx::Error) -> Error {
    Error::new(kind_of(&e), "postgres").with_source(e)
}

/// [`map_error`], and for the errors of a prepared statement the server does not have, or has
/// from another client (`invalid_sql_statement_name`, `duplicate_prepared_statement`), what
/// to change: with `prepared_statements` behind a pooler that does not keep them per client.
pub(crate) fn map_prepared_error(e: sqlx::Error) -> Error {
    match &e {
        sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("26000" | "42P05")) => {
            Error::new(
                ErrorKind::InvalidInput,
                "postgres: a prepared statement of this connection is missing or taken on the \
                 server, as behind a pooler that does not keep prepared statements per client: \
                 connect with prepared_statements=false",
            )
            .with_source(e)
        }
        _ => map_error(e),
    }
}

fn kind_of(e: &sqlx::Error) -> ErrorKind {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => ErrorKind::Unavailable,
        sqlx::Error::Configuration(_) => ErrorKind::InvalidInput,
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // invalid_authorization_specification, invalid_password
            Some("28000" | "28P01") => ErrorKind::Auth,
            // invalid_catalog_name: the database does not exist.
            Some("3D000") => ErrorKind::InvalidInput,
            // insufficient_privilege
            Some("42501") => ErrorKind::Auth,
            // serialization_failure, deadlock_detected, lock_not_available, too_many_connections,
            // admin_shutdown, crash_shutdown, cannot_connect_now, query_canceled
            Some("40001" | "40P01" | "55P03" | "53300" | "57P01" | "57P02" | "57P03" | "57014") => {
                ErrorKind::Unavailable
            }
            // Class 08: connection exceptions.
            Some(code) if code.starts_with("08") => ErrorKind::Unavailable,
            // character_not_in_repertoire, untranslatable_character
            Some("22021" | "22P05") => ErrorKind::InvalidInput,
            _ => ErrorKind::Other,
        },
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => ErrorKind::Corrupt,
        _ => ErrorKind::Other,
    }
}

/// Where the options connect: `host:port`, or the Unix socket.
pub(crate) fn target(options: &PgConnectOptions) -> String {
    match options.get_socket() {
        Some(socket) => socket.display().to_string(),
        None => format!("{}:{}", options.get_host(), options.get_port()),
    }
}

/// An error of the first connection to the server, naming where it went. Definite (see
/// [`Error::is_definite`]) when it is an answer: the connection refused (retryable
/// [`ErrorKind::Unavailable`]: the server may be restarting), the host or network unreachable,
/// no such host; credentials or the database name refused ([`ErrorKind::Auth`],
/// [`ErrorKind::InvalidInput`]); a TLS handshake that failed other than by I/O (a certificate
/// not trusted, a server without TLS: [`ErrorKind::Auth`], a configuration to change).
pub(crate) fn map_connect_error(options: &PgConnectOptions, e: sqlx::Error) -> Error {
    let target = target(options);
    let io_kind = find_io_error(&e).map(|io| (io.kind(), is_definite_io_error(io)));
    match (&e, io_kind) {
        (
            sqlx::Error::Io(_) | sqlx::Error::Tls(_),
            Some((std::io::ErrorKind::ConnectionRefused, _)),
        ) => Error::unavailable(format!("postgres: connection refused by {target}"))
            .with_source(e)
            .set_definite(true),
        (sqlx::Error::Io(_) | sqlx::Error::Tls(_), Some((_, definite))) => {
            Error::unavailable(format!("postgres: cannot connect to {target}"))
                .with_source(e)
                .set_definite(definite)
        }
        (sqlx::Error::Tls(_), None) => Error::new(
            ErrorKind::Auth,
            format!("postgres: TLS with {target} failed"),
        )
        .with_source(e),
        _ => Error::new(kind_of(&e), format!("postgres at {target}")).with_source(e),
    }
}
