#![doc = include_str!("../README.md")]
//! ## Cargo features
//!
#![doc = document_features::document_features!()]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(not(any(feature = "redis", feature = "fred")))]
compile_error!("locker-redis needs a client library: enable the `redis` or the `fred` feature");

mod backend;
mod batch;
mod config;
#[cfg(feature = "fred")]
mod driver_fred;
#[cfg(feature = "redis")]
mod driver_redis;
mod keys;
mod notify;
mod scripts;
#[cfg(feature = "redis")]
mod tls;
mod version;

pub use backend::RedisBackend;
pub use config::{
    ClientLibrary, RedisConfig, RedisConfigBuilder, WaitForReplicas, DEFAULT_COMMAND_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_WAIT_TIMEOUT,
};
