//! The listener: HTTP/1.1 and HTTP/2 (h2c prior knowledge, or TLS with ALPN) on one port,
//! WebSocket over both (RFC 8441 extended CONNECT on HTTP/2), a connection cap, and a graceful
//! stop.

use std::{future::Future, path::Path, pin::Pin, sync::Arc, time::Duration};

use anyhow::Context as _;
use axum::Router;
use hyper::server::conn::{http1, http2};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::limits::PerIp;

/// How long open connections get to finish once shutdown began.
const CONNECTION_DRAIN: Duration = Duration::from_secs(10);

/// Loads a rustls server configuration with ALPN `h2`, `http/1.1`.
pub fn tls_acceptor(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading --tls-cert {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing --tls-cert {}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading --tls-key {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the TLS certificate and key do not match")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Caps on connections and on how slowly a client may send its request headers.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Open connections in all; past it new ones get a bare 503.
    pub max_connections: usize,
    /// Open connections per client address; past it new ones get a bare 429.
    pub per_ip: PerIp,
    /// How long a client may take to send request headers (and finish a TLS handshake).
    pub header_read_timeout: Duration,
}

impl ConnectionLimits {
    /// The limits the configuration sets.
    pub fn from_config(config: &crate::EdgeConfig) -> Self {
        Self {
            max_connections: config.http.max_connections,
            per_ip: PerIp::new(config.limits.max_connections_per_ip),
            header_read_timeout: Duration::from_secs(config.limits.header_read_timeout_secs),
        }
    }
}

/// Accepts connections until `shutdown`, then waits (bounded) for open ones to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<TlsAcceptor>,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) {
    let header_read_timeout = limits.header_read_timeout;
    let protocols = Arc::new(Protocols::new(header_read_timeout));
    let connections = TaskTracker::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    // Refusals in progress (each takes up to ~3 s); past this many, excess connections are
    // just closed.
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let _ = tcp.set_nodelay(true);
        let Some(ip_permit) = limits.per_ip.try_acquire(peer.ip()) else {
            metrics::counter!("tokenfan_edge_connections_refused_per_ip_total").increment(1);
            if let Ok(slot) = refusals.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    refuse(tcp, PER_IP_REFUSAL).await;
                    drop(slot);
                });
            }
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics::counter!("tokenfan_edge_connections_refused_total").increment(1);
            if let Ok(slot) = refusals.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    refuse(tcp, CAPACITY_REFUSAL).await;
                    drop(slot);
                });
            }
            continue;
        };
        let protocols = protocols.clone();
        let service = TowerToHyperService::new(router.clone());
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            // Held for the life of the connection.
            let _permits = (permit, ip_permit);
            let result = match tls {
                None => {
                    let Some(protocol) = sniff(&tcp, header_read_timeout).await else {
                        return;
                    };
                    protocols.serve(tcp, protocol, service, &shutdown).await
                }
                Some(acceptor) => {
                    let stream =
                        match tokio::time::timeout(header_read_timeout, acceptor.accept(tcp)).await
                        {
                            Ok(Ok(s)) => s,
                            Ok(Err(err)) => {
                                tracing::debug!(%peer, %err, "TLS handshake failed");
                                return;
                            }
                            Err(_) => return,
                        };
                    let protocol = match stream.get_ref().1.alpn_protocol() {
                        Some(b"h2") => Protocol::Http2,
                        _ => Protocol::Http1,
                    };
                    protocols.serve(stream, protocol, service, &shutdown).await
                }
            };
            if let Err(err) = result {
                tracing::debug!(%peer, %err, "connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(CONNECTION_DRAIN, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain period; closing them");
    }
}

/// The protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

/// The HTTP/2 client preface begins with the method `PRI`, which no HTTP/1 request uses.
const H2_PREFACE_START: &[u8] = b"PRI";

/// Tells HTTP/1.1 from h2c (prior knowledge) by the connection's first bytes, without reading
/// them: hyper then reads the request into its own buffer directly. (Reading the bytes first
/// and replaying them makes hyper's first read short, and its 8 KiB read buffer grows to
/// 16 KiB for every connection.) None when the client closed or sent nothing in time.
async fn sniff(tcp: &TcpStream, timeout: Duration) -> Option<Protocol> {
    let mut buf = [0u8; H2_PREFACE_START.len()];
    let peek = async {
        loop {
            let n = tcp.peek(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            if buf[..n] != H2_PREFACE_START[..n] {
                return Some(Protocol::Http1);
            }
            if n == H2_PREFACE_START.len() {
                return Some(Protocol::Http2);
            }
            // One or two bytes of `PRI` so far (a peek doesn't wait for more): look again.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(timeout, peek).await.ok().flatten()
}

/// How connections of each protocol are served.
struct Protocols {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl Protocols {
    fn new(header_read_timeout: Duration) -> Self {
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .enable_connect_protocol()
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(20));
        Self { http1, http2 }
    }

    /// Serves one connection until it ends; once `shutdown` fires, asks it to finish (HTTP/1:
    /// close after the response in progress; HTTP/2: GOAWAY) and waits for that.
    async fn serve<I>(
        &self,
        io: I,
        protocol: Protocol,
        service: TowerToHyperService<Router>,
        shutdown: &CancellationToken,
    ) -> Result<(), hyper::Error>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let io = TokioIo::new(io);
        match protocol {
            Protocol::Http1 => {
                let conn = self.http1.serve_connection(io, service).with_upgrades();
                until_done(conn, shutdown, |c| c.graceful_shutdown()).await
            }
            Protocol::Http2 => {
                let conn = self.http2.serve_connection(io, service);
                until_done(conn, shutdown, |c| c.graceful_shutdown()).await
            }
        }
    }
}

/// Drives `conn` to its end, calling `stop` on it once when `shutdown` fires.
async fn until_done<C>(
    conn: C,
    shutdown: &CancellationToken,
    stop: impl FnOnce(Pin<&mut C>),
) -> Result<(), hyper::Error>
where
    C: Future<Output = Result<(), hyper::Error>>,
{
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => result,
        () = shutdown.cancelled() => {
            stop(conn.as_mut());
            conn.await
        }
    }
}

/// Connections being refused at once, at most.
const MAX_REFUSALS: usize = 1024;

/// Over `--max-connections`: the server is full.
const CAPACITY_REFUSAL: (&str, &str) = (
    "503 Service Unavailable",
    r#"{"error":{"code":"capacity","message":"too many connections; retry shortly"}}"#,
);
/// Over `--max-connections-per-ip`: this client holds too many.
const PER_IP_REFUSAL: (&str, &str) = (
    "429 Too Many Requests",
    r#"{"error":{"code":"too_many_connections","message":"this address has too many open connections; close some or retry shortly"}}"#,
);

/// Answers a connection over a cap with a bare status and closes it: waits (briefly) for the
/// request's headers first, since HTTP clients refuse an answer that comes before their
/// request, and reads a little after, since closing with unread data resets the connection
/// and the client could lose the answer. At most about 3 s per refused connection.
async fn refuse(mut tcp: tokio::net::TcpStream, (status, body): (&str, &str)) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buf = [0u8; 4096];
    let mut seen: Vec<u8> = Vec::new();
    let headers = async {
        while seen.len() < 16 * 1024 && !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        true
    };
    if matches!(
        tokio::time::timeout(Duration::from_secs(1), headers).await,
        Ok(false)
    ) {
        return; // the client left
    }
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), tcp.write_all(response.as_bytes())).await;
    let _ = tcp.shutdown().await;
    let drain = async {
        let mut left: usize = 64 * 1024;
        while left > 0 {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}
