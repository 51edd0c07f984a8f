//! etcd, one member or a cluster, from the local `etcd` binary.

use std::ffi::OsString;
use std::time::{SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;

use super::process::{free_port, tcp_exchange, temp_dir, which, ServerProcess};
use super::{Provider, Server, ServerError, ServerKind};

/// Starts an etcd cluster of `members` members (1 for a single server).
pub(super) fn start(members: usize) -> Result<Server, ServerError> {
    start_custom(members, Vec::new(), false)
}

/// [`start`] with extra `etcd` flags; with `tls`, clients talk HTTPS (pass `--cert-file` and
/// `--key-file` in `extra`) and the endpoints are `https://127.0.0.1:port`.
pub(super) fn start_custom(
    members: usize,
    extra: Vec<String>,
    tls: bool,
) -> Result<Server, ServerError> {
    let kind = if members == 1 {
        ServerKind::Etcd
    } else {
        ServerKind::EtcdCluster
    };
    let program = which("etcd").ok_or_else(|| ServerError::NotAvailable {
        what: format!("{kind} (etcd not found in PATH)"),
        how: kind.how_to_get(),
    })?;
    let mut ports = Vec::new();
    for _ in 0..members {
        ports.push((free_port(0)?, free_port(0)?));
    }
    let token = cluster_token();
    let mut processes = Vec::new();
    let mut dirs: Vec<Box<dyn std::any::Any + Send + Sync>> = Vec::new();
    let mut endpoints = Vec::new();
    for (i, (client, _)) in ports.iter().copied().enumerate() {
        let dir = temp_dir("etcd")?;
        let data = dir.path().join("data");
        let mut args = member_args(i, &ports, &data.to_string_lossy(), &token);
        if tls {
            for arg in &mut args {
                if arg.starts_with("--listen-client-urls=")
                    || arg.starts_with("--advertise-client-urls=")
                {
                    *arg = arg.replace("=http://", "=https://");
                }
            }
        }
        args.extend(extra.iter().cloned());
        let args: Vec<OsString> = args.into_iter().map(OsString::from).collect();
        processes.push(
            ServerProcess::new(
                format!("etcd member m{i} on 127.0.0.1:{client}"),
                &program,
                args,
                None,
                dir.path().join("server.log"),
                Signal::SIGTERM,
                move || {
                    if tls {
                        // The health endpoint speaks HTTPS now; a TCP accept will do.
                        std::net::TcpStream::connect(("127.0.0.1", client)).is_ok()
                    } else {
                        healthy(client)
                    }
                },
            )
            .cleanup_on_exit(dir.path().to_owned()),
        );
        dirs.push(Box::new(dir));
        let scheme = if tls { "https" } else { "http" };
        endpoints.push(format!("{scheme}://127.0.0.1:{client}"));
    }
    Server::from_nodes(kind, Provider::Process, endpoints, processes, None, dirs)
}

/// Whether the etcd member whose client port is `port` reports itself healthy (it has a
/// leader).
pub(super) fn healthy(port: u16) -> bool {
    tcp_exchange(
        port,
        b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n",
        |b| b.ends_with(b"}") || b.ends_with(b"}\n"),
    )
    .is_some_and(|r| r.contains("\"health\":\"true\""))
}

/// A cluster token no other cluster of this machine has.
pub(super) fn cluster_token() -> String {
    format!(
        "locker-test-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    )
}

/// The flags of member `i` of a cluster whose members have the `(client, peer)` loopback
/// `ports`, with its data in `data_dir`.
pub(super) fn member_args(
    i: usize,
    ports: &[(u16, u16)],
    data_dir: &str,
    token: &str,
) -> Vec<String> {
    let initial_cluster = ports
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
        .collect::<Vec<_>>()
        .join(",");
    let (client, peer) = ports[i];
    let client_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    vec![
        format!("--name=m{i}"),
        format!("--data-dir={data_dir}"),
        format!("--listen-client-urls={client_url}"),
        format!("--advertise-client-urls={client_url}"),
        format!("--listen-peer-urls={peer_url}"),
        format!("--initial-advertise-peer-urls={peer_url}"),
        format!("--initial-cluster={initial_cluster}"),
        format!("--initial-cluster-token={token}"),
        "--initial-cluster-state=new".into(),
        "--heartbeat-interval=50".into(),
        "--election-timeout=500".into(),
        "--logger=zap".into(),
        "--log-level=warn".into(),
    ]
}
