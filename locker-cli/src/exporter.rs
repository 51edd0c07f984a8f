//! `--metrics-listen ADDR`: the library's metrics (the `metrics` facade; names in the README's
//! "Metrics" table) in Prometheus's text format, served over plain HTTP at `ADDR` for as long
//! as `locker` runs. Any request path answers the same page.
//!
//! A hand-written responder of a few lines, not an HTTP server: a scrape is one short request
//! on a connection, and `locker` should not carry a web stack for it.

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long a scraper may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often histograms drop their old samples (the exporter's upkeep).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Installs the Prometheus recorder and serves it at `addr` from a task of the current runtime.
/// Fails (before any lock is taken) when the address cannot be bound.
pub(crate) async fn serve(addr: SocketAddr) -> Result<(), locker::Error> {
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        locker::Error::new(
            locker::ErrorKind::Unavailable,
            format!("--metrics-listen: cannot listen on {addr}"),
        )
        .with_source(e)
    })?;
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| locker::Error::invalid_input("--metrics-listen").with_source(e))?;
    tracing::info!(target: "locker::cli", %addr, "serving metrics");
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(UPKEEP_EVERY);
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    tokio::spawn(async move {
        loop {
            if let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(answer(stream, handle.clone()));
            }
        }
    });
    Ok(())
}

/// Reads the request's head (up to its blank line, or 8 KiB) and answers the page.
async fn answer(mut stream: TcpStream, handle: PrometheusHandle) {
    let mut head = Vec::with_capacity(512);
    let read = async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        true
    };
    if !matches!(tokio::time::timeout(REQUEST_TIMEOUT, read).await, Ok(true)) {
        return;
    }
    let body = handle.render();
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}
