#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backend;
mod composite;
mod config;
mod error;
mod inline;
pub mod migrations;
mod notify;
mod warm;

pub use backend::{PostgresBackend, MAX_KEY_LEN};
pub use config::{
    PostgresConfig, PostgresConfigBuilder, DEFAULT_COMMAND_TIMEOUT, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
};
