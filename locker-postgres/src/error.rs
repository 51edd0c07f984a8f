//! The one mapping of sqlx's errors (PostgreSQL) to the project's.

use locker_core::{Error, ErrorKind};

pub(crate) fn map_error(e: sqlx::Error) -> Error {
    let kind = match &e {
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
    };
    Error::new(kind, "postgres").with_source(e)
}
