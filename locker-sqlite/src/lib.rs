#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backend;
mod config;

pub use backend::SqliteBackend;
pub use config::{
    SqliteConfig, SqliteConfigBuilder, DEFAULT_BUSY_TIMEOUT, DEFAULT_COMMAND_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
};
