//! Wedged connections, on purpose: a TCP [`Proxy`] that stops forwarding on the connections it
//! already carries (they stay open, and nothing more goes through them either way), and the
//! checks that a locker replaces such connections on both of its sides
//! ([`connections_heal`]) and that, with healing off, the same wedge does cost it its locks
//! ([`wedge_costs_locks_without_healing`]), so the first check can fail.
//!
//! A backend's test calls [`check`] with the kind of server and a way to make its factory from a
//! URL: a private server is started, a proxy put in front of it, and the locker under test
//! connects through the proxy while an observer connects directly.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use locker_core::{BackendFactory, LockAttempt, Locker, LockerBuilder};

use crate::servers::{self, ServerKind};

/// Runs [`connections_heal`], or with `healing` false [`wedge_costs_locks_without_healing`],
/// against a private server of `kind` behind a [`Proxy`]; `factory` makes a backend factory
/// from a URL (the proxy's, then the server's own for the observer). Panics with what failed.
///
/// ```ignore
/// #[test]
/// fn connections_heal_after_a_wedge() {
///     locker_conformance::wedge::check(ServerKind::Postgres, true, |url| {
///         Arc::new(PostgresConfig::from_url(url).expect("config"))
///     });
/// }
/// ```
pub fn check(kind: ServerKind, healing: bool, factory: impl Fn(&str) -> Arc<dyn BackendFactory>) {
    let server = servers::start_private(kind).unwrap_or_else(|e| panic!("{e}"));
    let (proxy, through) = Proxy::for_url(server.url()).expect("proxy");
    let (through, direct) = (factory(&through), factory(server.url()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let result = runtime.block_on(async {
        if healing {
            connections_heal(&proxy, through, direct).await
        } else {
            wedge_costs_locks_without_healing(&proxy, through, direct).await
        }
    });
    if let Err(e) = result {
        panic!("{kind}: {e}");
    }
}

/// A TCP proxy on `127.0.0.1` that can wedge the connections it carries. Dropping it closes
/// every connection.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

struct Shared {
    target: SocketAddr,
    /// Connections accepted so far; a connection's number is its place in that count.
    accepted: AtomicUsize,
    /// Connections numbered below this forward nothing more.
    wedged_below: AtomicUsize,
    closed: AtomicBool,
    streams: Mutex<Vec<TcpStream>>,
}

impl Proxy {
    /// Listens on a free port of `127.0.0.1` and forwards each connection to `target`.
    pub fn start(target: impl ToSocketAddrs) -> std::io::Result<Proxy> {
        let target = target.to_socket_addrs()?.next().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "no target address")
        })?;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            target,
            accepted: AtomicUsize::new(0),
            wedged_below: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            streams: Mutex::new(Vec::new()),
        });
        let accept = shared.clone();
        thread::Builder::new()
            .name("test-proxy".into())
            .spawn(move || accept.accept_loop(listener))?;
        Ok(Proxy { addr, shared })
    }

    /// Starts a proxy to the first `127.0.0.1:PORT` of `url`, and returns it with `url`
    /// pointing at the proxy instead.
    pub fn for_url(url: &str) -> std::io::Result<(Proxy, String)> {
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidInput, "no 127.0.0.1:PORT");
        let at = url.find("127.0.0.1:").ok_or_else(bad)?;
        let digits = &url[at + "127.0.0.1:".len()..];
        let len = digits.bytes().take_while(u8::is_ascii_digit).count();
        let port: u16 = digits[..len].parse().map_err(|_| bad())?;
        let proxy = Proxy::start(("127.0.0.1", port))?;
        let end = at + "127.0.0.1:".len() + len;
        let redirected = format!(
            "{}127.0.0.1:{}{}",
            &url[..at],
            proxy.addr().port(),
            &url[end..]
        );
        Ok((proxy, redirected))
    }

    /// The address to connect to instead of the target's.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many connections the proxy has accepted.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// From now on, the connections accepted so far forward nothing, in either direction,
    /// and stay open: their clients see calls that never get an answer. New connections work.
    pub fn wedge_existing(&self) {
        self.shared
            .wedged_below
            .store(self.accepted(), Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        if let Ok(streams) = self.shared.streams.lock() {
            for s in streams.iter() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        // Wakes the accept loop, which then sees `closed`.
        let _ = TcpStream::connect(self.addr);
    }
}

impl Shared {
    fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        for client in listener.incoming() {
            if self.closed.load(Ordering::SeqCst) {
                return;
            }
            let Ok(client) = client else { continue };
            let n = self.accepted.fetch_add(1, Ordering::SeqCst);
            let Ok(server) = TcpStream::connect(self.target) else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let clones = (
                client.try_clone(),
                server.try_clone(),
                client.try_clone(),
                server.try_clone(),
            );
            let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = clones else {
                continue;
            };
            if let Ok(mut streams) = self.streams.lock() {
                streams.push(c3);
                streams.push(s3);
            }
            for (from, to) in [(client, s2), (server, c2)] {
                let shared = self.clone();
                let _ = thread::Builder::new()
                    .name("test-proxy-pump".into())
                    .spawn(move || shared.pump(n, from, to));
            }
        }
    }

    fn pump(&self, n: usize, mut from: TcpStream, mut to: TcpStream) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let read = match from.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown(Shutdown::Write);
                    return;
                }
                Ok(read) => read,
            };
            if n < self.wedged_below.load(Ordering::SeqCst) {
                // Wedged: hold both ends open and forward nothing, until the proxy closes.
                while !self.closed.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(50));
                }
                return;
            }
            if to.write_all(&buf[..read]).is_err() {
                let _ = from.shutdown(Shutdown::Read);
                return;
            }
        }
    }
}

/// Short timings, so that a wedge shows within seconds: liveness of 3 s written every 200 ms,
/// calls slow after 300 ms.
fn builder(factory: Arc<dyn BackendFactory>) -> LockerBuilder {
    Locker::builder(ArcFactory(factory))
        .report_every(Duration::from_millis(200))
        .liveness_ttl(Duration::from_secs(3))
        .recheck_every(Duration::from_millis(300))
        .extend_every(Duration::from_secs(5))
        .lock_ttl(Duration::from_secs(60))
        .slow_call_after(Duration::from_millis(300))
        .reconnect_after_failures(3)
}

struct ArcFactory(Arc<dyn BackendFactory>);

#[locker_core::async_trait]
impl BackendFactory for ArcFactory {
    async fn connect(&self) -> locker_core::Result<Arc<dyn locker_core::LockBackend>> {
        self.0.connect().await
    }

    async fn connect_reporter(&self) -> locker_core::Result<Arc<dyn locker_core::LockBackend>> {
        self.0.connect_reporter().await
    }
}

/// Acquires `key`, retrying every failed or unanswered attempt (each waits 2 s at most) until
/// `within` has passed. `Ok` with the time it took, or the last failure.
async fn acquire_within(locker: &Locker, key: &str, within: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    let mut last = String::from("no attempt");
    while start.elapsed() < within {
        match tokio::time::timeout(Duration::from_secs(2), locker.acquire(key)).await {
            Ok(Ok(LockAttempt::Acquired(guard))) => {
                let took = start.elapsed();
                let _ = guard.release().await;
                return Ok(took);
            }
            Ok(Ok(LockAttempt::Held(holder))) => {
                last = format!("held by {}", holder.owner_hash);
            }
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "no answer within 2 s".into(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last)
}

/// With every connection of a locker wedged while it holds a lock: its reporter replaces its
/// connection before the liveness record lapses (an observer never sees the process dead, and
/// the lock stays held), its jobs' connection is replaced (a new acquire succeeds within
/// seconds), the held lock's heartbeat still works, and the proxy saw the new connections.
pub async fn connections_heal(
    proxy: &Proxy,
    through_proxy: Arc<dyn BackendFactory>,
    direct: Arc<dyn BackendFactory>,
) -> Result<(), String> {
    let locker = builder(through_proxy).build().map_err(|e| e.to_string())?;
    let observer = builder(direct).build().map_err(|e| e.to_string())?;
    let key = "wedge-heal-held";
    let guard = match locker.acquire(key).await.map_err(|e| e.to_string())? {
        LockAttempt::Acquired(g) => g,
        LockAttempt::Held(h) => return Err(format!("{key} is held by {}", h.owner_hash)),
    };
    let before = proxy.accepted();
    proxy.wedge_existing();

    // Meanwhile, an observer tries to take the lock, as another process of the cluster would:
    // it gets it only if this process's liveness record lapsed.
    let watch_until = Instant::now() + Duration::from_secs(8);
    let watcher = {
        let observer = observer.clone();
        tokio::spawn(async move {
            let mut checks = 0;
            while Instant::now() < watch_until {
                match observer.acquire(key).await {
                    Ok(LockAttempt::Held(_)) => {}
                    Ok(LockAttempt::Acquired(_)) => {
                        return Err(format!(
                            "the observer took {key} after {checks} checks: the process's \
                             liveness lapsed"
                        ))
                    }
                    Err(e) => return Err(format!("observer: {e}")),
                }
                checks += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(checks)
        })
    };
    let took = acquire_within(&locker, "wedge-heal-new", Duration::from_secs(8))
        .await
        .map_err(|e| format!("no acquire went through after the wedge: {e}"))?;
    let checks = watcher.await.map_err(|e| format!("watcher: {e}"))??;
    // An observer-side take-over attempt finds the lock held by a live process.
    match observer.acquire(key).await.map_err(|e| e.to_string())? {
        LockAttempt::Held(h) if h.process_hash == locker.process_hash() => {}
        LockAttempt::Held(h) => return Err(format!("{key} is held by {}", h.owner_hash)),
        LockAttempt::Acquired(_) => {
            return Err(format!("the observer took {key}: the process looked dead"))
        }
    }
    guard
        .heartbeat()
        .beat()
        .await
        .map_err(|e| format!("the held lock's beat failed after healing: {e}"))?;
    guard.extend().await.map_err(|e| format!("extend: {e}"))?;
    let after = proxy.accepted();
    if after < before + 2 {
        return Err(format!(
            "the proxy accepted {} new connections (expected one per side)",
            after - before
        ));
    }
    eprintln!(
        "wedge: a new acquire went through {took:?} after the wedge; {} new connections; \
         {checks} observer checks saw the lock held by a live process",
        after - before
    );
    let _ = guard.release().await;
    locker.shutdown().await;
    observer.shutdown().await;
    Ok(())
}

/// The same wedge with healing off (`reconnect_after_failures(0)`) does harm: no acquire goes
/// through for 5 s, or the process's liveness lapses so that an observer takes the held lock
/// over (a client library's pool may open new connections by itself for the jobs' side, but
/// the reporter's write that waits on a wedged connection still waits). This is what
/// [`connections_heal`] guards against; it shows that check can fail.
pub async fn wedge_costs_locks_without_healing(
    proxy: &Proxy,
    through_proxy: Arc<dyn BackendFactory>,
    direct: Arc<dyn BackendFactory>,
) -> Result<(), String> {
    let locker = builder(through_proxy)
        .reconnect_after_failures(0)
        .build()
        .map_err(|e| e.to_string())?;
    let observer = builder(direct).build().map_err(|e| e.to_string())?;
    let key = "wedge-control-held";
    let guard = match locker.acquire(key).await.map_err(|e| e.to_string())? {
        LockAttempt::Acquired(g) => g,
        LockAttempt::Held(h) => return Err(format!("{key} is held by {}", h.owner_hash)),
    };
    proxy.wedge_existing();
    let start = Instant::now();
    let taken_over = async {
        while start.elapsed() < Duration::from_secs(10) {
            match observer.acquire(key).await {
                Ok(LockAttempt::Acquired(g)) => {
                    let _ = g.release().await;
                    return Some(start.elapsed());
                }
                Ok(LockAttempt::Held(_)) | Err(_) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        None
    };
    let (acquired, taken_over) = tokio::join!(
        acquire_within(&locker, "wedge-control-new", Duration::from_secs(5)),
        taken_over
    );
    drop(guard);
    locker.abandon().await;
    observer.shutdown().await;
    match (acquired, taken_over) {
        (Ok(took), None) => Err(format!(
            "without healing, an acquire went through {took:?} after the wedge and the \
             liveness never lapsed: the client recovered by itself, and the wedge test proves \
             nothing for it"
        )),
        (acquired, taken_over) => {
            eprintln!(
                "wedge without healing: new acquire {}; held lock {}",
                match acquired {
                    Ok(took) => format!("went through after {took:?}"),
                    Err(e) => format!("never went through in 5 s ({e})"),
                },
                match taken_over {
                    Some(t) => format!("taken over by the observer after {t:?} (liveness lapsed)"),
                    None => "kept".into(),
                }
            );
            Ok(())
        }
    }
}
