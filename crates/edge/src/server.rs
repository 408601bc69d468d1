//! The listener: HTTP/1.1 and HTTP/2 (h2c prior knowledge, or TLS with ALPN) on one port,
//! WebSocket over both (RFC 8441 extended CONNECT on HTTP/2), connection caps, a write
//! deadline, and a graceful stop.
//!
//! # What the connection caps count
//!
//! `--max-connections` and `--max-connections-per-ip` count *sockets a client holds open*,
//! whatever runs over them: a TCP connection takes one slot when accepted; an HTTP/2
//! connection with several requests in flight takes one more slot for each beside the first
//! (until each response body ends); and an HTTP/1.1 connection upgraded to a WebSocket keeps
//! its slot until the WebSocket closes, although hyper's connection task ends at the upgrade
//! (each request carries a [`ConnectionSlot`] in its extensions; the WebSocket handler moves
//! it into the socket's task).
//!
//! # The write deadline
//!
//! Every connection's socket is wrapped in [`Deadline`]: a write (or flush) that makes no
//! progress for `--write-timeout-secs` fails with `TimedOut`, which ends the connection (and
//! every response on it). HTTP/2 flow control can stall one response while the socket is
//! still writable, so a streaming response on HTTP/2 also has a watchdog: if the body has a
//! chunk the connection did not take within the deadline, the whole connection is closed.
//!
//! # Idle event streams
//!
//! A plain-TCP HTTP/1.1 `GET /v1/streams/{id}/events` that opens a connection skips hyper
//! ([`events_h1`]): it runs through the same router, but its response is written straight to
//! the socket without hyper's two 8 KiB per-connection buffers; a connection kept alive after
//! it goes to hyper. TLS and HTTP/2 connections, and every other request, are served by hyper.

use std::{
    convert::Infallible,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    path::Path,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use anyhow::Context as _;
use axum::{Router, response::IntoResponse as _};
use hyper::server::conn::{http1, http2};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Sleep,
};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    conn_limits::{IpPermit, PerIp},
    error::ApiError,
};

mod events_h1;

/// How long open connections get to finish once shutdown began.
const CONNECTION_DRAIN: Duration = Duration::from_secs(10);

/// Loads a rustls server configuration with ALPN `h2`, `http/1.1`.
pub(crate) fn tls_acceptor(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
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
pub(crate) struct ConnectionLimits {
    /// Open connections in all; past it new ones get a bare 503.
    pub max_connections: usize,
    /// Open connections per client address; past it new ones get a bare 429.
    pub per_ip: PerIp,
    /// How long a client may take to send request headers (and finish a TLS handshake).
    pub header_read_timeout: Duration,
    /// How long a write may make no progress before the connection is closed.
    pub write_timeout: Duration,
}

impl ConnectionLimits {
    /// The limits the configuration sets.
    pub(crate) fn from_config(config: &crate::EdgeConfig) -> Self {
        Self {
            max_connections: config.http.max_connections,
            per_ip: PerIp::new(config.limits.max_connections_per_ip),
            header_read_timeout: Duration::from_secs(config.limits.header_read_timeout_secs),
            write_timeout: Duration::from_secs(config.http.write_timeout_secs),
        }
    }
}

/// Accepts connections until `lifecycle.accepting`, then waits (bounded) for open ones to
/// finish. Every task it starts goes on `lifecycle.tasks`.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<TlsAcceptor>,
    limits: ConnectionLimits,
    lifecycle: crate::Lifecycle,
) {
    let acceptor = Acceptor {
        serving: Serving {
            protocols: Arc::new(Protocols::new(limits.header_read_timeout)),
            router,
            tls,
            header_read_timeout: limits.header_read_timeout,
            shutdown: lifecycle.accepting,
        },
        caps: Caps {
            global: Arc::new(Semaphore::new(limits.max_connections)),
            per_ip: limits.per_ip.clone(),
        },
        // Refusals in progress (each takes up to ~3 s); past this many, excess connections
        // are just closed.
        refusals: Arc::new(Semaphore::new(MAX_REFUSALS)),
        connections: TaskTracker::new(),
        write_timeout: limits.write_timeout,
        tasks: lifecycle.tasks,
    };
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
            () = acceptor.serving.shutdown.cancelled() => break,
        };
        acceptor.admit(tcp, peer);
    }
    drop(listener);
    acceptor.connections.close();
    if tokio::time::timeout(CONNECTION_DRAIN, acceptor.connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain period; closing them");
    }
}

/// What accepting a connection needs.
struct Acceptor {
    serving: Serving,
    caps: Caps,
    refusals: Arc<Semaphore>,
    /// Counts the open connections (their tasks are on `tasks`), for the drain.
    connections: TaskTracker,
    write_timeout: Duration,
    tasks: TaskTracker,
}

/// What serving an accepted connection needs.
#[derive(Clone)]
struct Serving {
    protocols: Arc<Protocols>,
    router: Router,
    tls: Option<TlsAcceptor>,
    header_read_timeout: Duration,
    /// Stop accepting: open connections are asked to finish.
    shutdown: CancellationToken,
}

impl Acceptor {
    /// Serves `tcp` when both caps have room; else answers it with the refusal.
    fn admit(&self, tcp: TcpStream, peer: SocketAddr) {
        let _ = tcp.set_nodelay(true);
        let Some(ip_permit) = self.caps.per_ip.try_acquire(peer.ip()) else {
            metrics::counter!("tokenfan_edge_connections_refused_per_ip_total").increment(1);
            return self.refuse(tcp, ApiError::TooManyConnections);
        };
        let Ok(permit) = self.caps.global.clone().try_acquire_owned() else {
            metrics::counter!("tokenfan_edge_connections_refused_total").increment(1);
            return self.refuse(tcp, connections_full());
        };
        let connection = Arc::new(Connection {
            _base: Permits {
                _global: permit,
                _ip: ip_permit,
            },
            open: Mutex::new((0, Vec::new())),
            upgraded: AtomicBool::new(false),
            timed_out: AtomicBool::new(false),
            kill: CancellationToken::new(),
            caps: self.caps.clone(),
            ip: peer.ip(),
            write_timeout: self.write_timeout,
            tasks: self.tasks.clone(),
        });
        let serve = self.serving.clone().connection(tcp, peer, connection);
        self.tasks.spawn(self.connections.track_future(serve));
    }

    /// Answers `tcp` with `refusal` in a task of its own, while fewer than [`MAX_REFUSALS`]
    /// are; else just closes it.
    fn refuse(&self, tcp: TcpStream, refusal: ApiError) {
        if let Ok(slot) = self.refusals.clone().try_acquire_owned() {
            self.tasks.spawn(async move {
                refuse(tcp, refusal).await;
                drop(slot);
            });
        }
    }
}

/// Serves one accepted connection (TLS handshake or protocol sniffing first) until it ends.
/// The permits go with the last holder of `connection`: this task, or an upgraded WebSocket
/// that still runs.
impl Serving {
    async fn connection(self, tcp: TcpStream, peer: SocketAddr, connection: Arc<Connection>) {
        let Self {
            protocols,
            router,
            tls,
            header_read_timeout,
            shutdown,
        } = self;
        let kill = connection.kill.clone();
        let mut counted = Counted {
            router,
            connection: connection.clone(),
        };
        let result = match tls {
            None => {
                let mut tcp = tcp;
                let Some((protocol, prefix)) = sniff(&mut tcp, header_read_timeout).await else {
                    return;
                };
                let events = if protocol == Protocol::Http1 && prefix.is_empty() {
                    match events_h1::take_request(&mut tcp).await {
                        Ok(request) => request,
                        Err(err) => {
                            tracing::debug!(%peer, %err, "reading the request failed");
                            return;
                        }
                    }
                } else {
                    None
                };
                let mut io = Deadline::new(tcp, connection);
                if let Some(request) = events {
                    let keep_alive = !events_h1::wants_close(request.headers());
                    let Ok(response) = tower::Service::call(&mut counted, request).await;
                    match events_h1::respond(&mut io, response, keep_alive).await {
                        // Shutdown ended the response: close, so the client reconnects.
                        Ok(true) if !shutdown.is_cancelled() => {}
                        Ok(_) => return,
                        Err(err) => {
                            tracing::debug!(%peer, %err, "connection ended with an error");
                            return;
                        }
                    }
                }
                let service = TowerToHyperService::new(counted);
                let io = Prefixed::new(prefix, io);
                // Boxed, like the TLS path below: this task's own state then stays as small
                // as an idle event stream needs.
                Box::pin(protocols.serve(io, protocol, service, &shutdown, &kill)).await
            }
            Some(acceptor) => {
                Box::pin(async move {
                    let stream =
                        match tokio::time::timeout(header_read_timeout, acceptor.accept(tcp)).await
                        {
                            Ok(Ok(s)) => s,
                            Ok(Err(err)) => {
                                tracing::debug!(%peer, %err, "TLS handshake failed");
                                return Ok(());
                            }
                            Err(_) => return Ok(()),
                        };
                    let protocol = match stream.get_ref().1.alpn_protocol() {
                        Some(b"h2") => Protocol::Http2,
                        _ => Protocol::Http1,
                    };
                    let io = Deadline::new(stream, connection);
                    let service = TowerToHyperService::new(counted);
                    protocols
                        .serve(io, protocol, service, &shutdown, &kill)
                        .await
                })
                .await
            }
        };
        if let Err(err) = result {
            tracing::debug!(%peer, %err, "connection ended with an error");
        }
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

/// Tells HTTP/1.1 from h2c (prior knowledge) by the connection's first bytes. Usually they are
/// all there at once and are only peeked, so hyper reads the request into its own buffer
/// directly. (Reading the bytes first and replaying them makes hyper's first read short, and
/// its 8 KiB read buffer grows to 16 KiB for every connection.) When only one or two bytes of
/// `PRI` have arrived, a peek would return at once again and again, so those bytes are read
/// (waiting for the socket like any read) and returned, to be replayed by [`Prefixed`]. None
/// when the client closed or sent nothing in time.
async fn sniff(tcp: &mut TcpStream, timeout: Duration) -> Option<(Protocol, Vec<u8>)> {
    let decide = |seen: &[u8]| {
        if seen[..] != H2_PREFACE_START[..seen.len()] {
            Some(Protocol::Http1)
        } else if seen.len() == H2_PREFACE_START.len() {
            Some(Protocol::Http2)
        } else {
            None
        }
    };
    let look = async {
        let mut buf = [0u8; H2_PREFACE_START.len()];
        let n = tcp.peek(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        if let Some(protocol) = decide(&buf[..n]) {
            return Some((protocol, Vec::new()));
        }
        // A partial preface: read it, then wait for (and read) the rest of the 3 bytes.
        let mut seen = Vec::with_capacity(H2_PREFACE_START.len());
        loop {
            let want = H2_PREFACE_START.len() - seen.len();
            let n = tcp.read(&mut buf[..want]).await.ok()?;
            if n == 0 {
                return None;
            }
            seen.extend_from_slice(&buf[..n]);
            if let Some(protocol) = decide(&seen) {
                return Some((protocol, seen));
            }
        }
    };
    tokio::time::timeout(timeout, look).await.ok().flatten()
}

/// A socket with bytes already read from it put back in front.
struct Prefixed<I> {
    prefix: Vec<u8>,
    taken: usize,
    inner: I,
}

impl<I> Prefixed<I> {
    fn new(prefix: Vec<u8>, inner: I) -> Self {
        Self {
            prefix,
            taken: 0,
            inner,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.taken < this.prefix.len() {
            let rest = &this.prefix[this.taken..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.taken += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A socket whose writes fail with `TimedOut` once one makes no progress for the connection's
/// write timeout (counted once per connection in `tokenfan_edge_write_timeouts_total`,
/// `transport="ws"` once upgraded, else `"http"`). The timer is armed only while a write
/// waits, so an idle connection costs nothing.
struct Deadline<I> {
    inner: I,
    connection: Arc<Connection>,
    timer: Option<Pin<Box<Sleep>>>,
    expired: bool,
}

impl<I> Deadline<I> {
    fn new(inner: I, connection: Arc<Connection>) -> Self {
        Self {
            inner,
            connection,
            timer: None,
            expired: false,
        }
    }

    /// Passes a write's result through, arming the timer while it waits and failing it once
    /// the timer fires.
    fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if result.is_ready() {
            self.timer = None;
            return result;
        }
        let timeout = self.connection.write_timeout;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        if !self.expired {
            self.expired = true;
            self.connection.count_write_timeout();
        }
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client did not read within --write-timeout-secs",
        )))
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Deadline<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Deadline<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(cx, result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.check(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(cx, result)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.check(cx, result)
    }
}

impl events_h1::Socket for Deadline<TcpStream> {
    fn poll_peer(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        self.inner
            .poll_peek(cx, &mut buf)
            .map(|peeked| !matches!(peeked, Ok(n) if n > 0))
    }
}

/// The caps every connection draws from.
#[derive(Clone)]
struct Caps {
    global: Arc<Semaphore>,
    per_ip: PerIp,
}

/// One slot of both caps.
struct Permits {
    _global: OwnedSemaphorePermit,
    _ip: IpPermit,
}

/// One accepted connection: its slot of the caps and the extra slots of its HTTP/2 streams.
/// Held by the connection's task and by every request's [`ConnectionSlot`], so it (and its
/// permits) lives as long as the longest of them.
struct Connection {
    /// The connection's own slot.
    _base: Permits,
    /// Requests in flight, and the extra slots held for those beside the first.
    open: Mutex<(usize, Vec<Permits>)>,
    /// Set when a request upgraded the connection to a WebSocket.
    upgraded: AtomicBool,
    /// Set when a write timed out (counted once).
    timed_out: AtomicBool,
    /// Cancelled to close the connection at once (a stalled HTTP/2 response).
    kill: CancellationToken,
    caps: Caps,
    ip: IpAddr,
    write_timeout: Duration,
    /// The edge's tracker (the connection's watchdogs run on it).
    tasks: TaskTracker,
}

impl Connection {
    /// Counts the connection's write timeout, once, under its transport.
    fn count_write_timeout(&self) {
        if self.timed_out.swap(true, Ordering::Relaxed) {
            return;
        }
        let transport = if self.upgraded.load(Ordering::Relaxed) {
            "ws"
        } else {
            "http"
        };
        metrics::counter!("tokenfan_edge_write_timeouts_total", "transport" => transport)
            .increment(1);
    }

    /// Counts a new request; past the first in flight it needs a slot of its own.
    fn open_request(self: &Arc<Self>) -> Result<ConnectionSlot, ApiError> {
        let mut open = lock(&self.open);
        if open.0 >= 1 {
            let Some(ip) = self.caps.per_ip.try_acquire(self.ip) else {
                metrics::counter!("tokenfan_edge_connections_refused_per_ip_total").increment(1);
                return Err(ApiError::TooManyConnections);
            };
            let Ok(global) = self.caps.global.clone().try_acquire_owned() else {
                metrics::counter!("tokenfan_edge_connections_refused_total").increment(1);
                return Err(connections_full());
            };
            open.1.push(Permits {
                _global: global,
                _ip: ip,
            });
        }
        open.0 += 1;
        Ok(ConnectionSlot(Arc::new(SlotGuard(self.clone()))))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A request's share of its connection's caps, in the request's extensions: released when the
/// response body ends, or, for a WebSocket, when the socket task that took it ends.
#[derive(Clone)]
pub struct ConnectionSlot(Arc<SlotGuard>);

impl ConnectionSlot {
    /// Marks the connection upgraded (its write timeouts then count as `ws`).
    pub fn upgraded(&self) {
        self.0.0.upgraded.store(true, Ordering::Relaxed);
    }

    /// Counts a write timeout of this connection (once per connection, whoever notices first:
    /// the socket's deadline or the WebSocket's own).
    pub(crate) fn count_write_timeout(&self) {
        self.0.0.count_write_timeout();
    }

    /// Whether a write on this connection timed out.
    pub(crate) fn write_timed_out(&self) -> bool {
        self.0.0.timed_out.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for ConnectionSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnectionSlot")
    }
}

struct SlotGuard(Arc<Connection>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let mut open = lock(&self.0.open);
        open.0 = open.0.saturating_sub(1);
        let extra = open.0.saturating_sub(1);
        open.1.truncate(extra);
    }
}

/// The router behind the caps: counts each request against its connection's slots (answering
/// 429/503 itself past a cap) and keeps the slot until the response body ends.
#[derive(Clone)]
struct Counted {
    router: Router,
    connection: Arc<Connection>,
}

impl<B> tower::Service<axum::extract::Request<B>> for Counted
where
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = axum::response::Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: axum::extract::Request<B>) -> Self::Future {
        use tower::ServiceExt as _;
        let slot = match self.connection.open_request() {
            Ok(slot) => slot,
            Err(refusal) => return Box::pin(async move { Ok(refusal.into_response()) }),
        };
        request.extensions_mut().insert(slot.clone());
        let connection = self.connection.clone();
        let h2 = request.version() == http::Version::HTTP_2;
        let call = self.router.clone().oneshot(request);
        Box::pin(async move {
            let response = call.await?;
            let streaming = response
                .headers()
                .get(http::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
            let watch = (h2 && streaming).then(|| Watchdog::start(&connection));
            Ok(response.map(|body| {
                axum::body::Body::new(SlotBody {
                    inner: body,
                    _slot: slot,
                    watch,
                })
            }))
        })
    }
}

/// A response body holding its request's slot (and, for an HTTP/2 stream, its watchdog).
struct SlotBody {
    inner: axum::body::Body,
    _slot: ConnectionSlot,
    watch: Option<Watchdog>,
}

impl hyper::body::Body for SlotBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let result = Pin::new(&mut self.inner).poll_frame(cx);
        if let Some(watch) = &self.watch {
            // Polled again: the connection took the previous chunk.
            watch.pending(matches!(result, Poll::Ready(Some(_))));
        }
        result
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Closes an HTTP/2 connection when a streaming response on it has had a chunk waiting for
/// longer than the write timeout (flow control stalled it: the client stopped reading). The
/// task sleeps until the next possible deadline and ends with the body.
struct Watchdog {
    /// Milliseconds (since `base`) at which the body last produced a chunk the connection has
    /// not come back for; 0 = none waiting.
    since: Arc<AtomicU64>,
    base: tokio::time::Instant,
    _stop: tokio_util::sync::DropGuard,
}

impl Watchdog {
    fn start(connection: &Arc<Connection>) -> Self {
        let since = Arc::new(AtomicU64::new(0));
        let base = tokio::time::Instant::now();
        let stop = CancellationToken::new();
        let timeout = connection.write_timeout;
        let kill = connection.kill.clone();
        let tasks = connection.tasks.clone();
        let connection = Arc::downgrade(connection);
        let watched = since.clone();
        let stopped = stop.clone();
        tasks.spawn(async move {
            let mut wake = tokio::time::Instant::now() + timeout;
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(wake) => {}
                    () = stopped.cancelled() => return,
                }
                let at = watched.load(Ordering::Relaxed);
                if at == 0 {
                    wake = tokio::time::Instant::now() + timeout;
                    continue;
                }
                let stalled_since = base + Duration::from_millis(at - 1);
                if stalled_since + timeout <= tokio::time::Instant::now() {
                    if let Some(connection) = connection.upgrade() {
                        connection.count_write_timeout();
                    }
                    kill.cancel();
                    return;
                }
                wake = stalled_since + timeout;
            }
        });
        Self {
            since,
            base,
            _stop: stop.drop_guard(),
        }
    }

    fn pending(&self, waiting: bool) {
        let value = if waiting {
            self.base.elapsed().as_millis() as u64 + 1
        } else {
            0
        };
        self.since.store(value, Ordering::Relaxed);
    }
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
        service: TowerToHyperService<Counted>,
        shutdown: &CancellationToken,
        kill: &CancellationToken,
    ) -> Result<(), hyper::Error>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let io = TokioIo::new(io);
        match protocol {
            Protocol::Http1 => {
                let conn = self.http1.serve_connection(io, service).with_upgrades();
                until_done(conn, shutdown, kill, |c| c.graceful_shutdown()).await
            }
            Protocol::Http2 => {
                let conn = self.http2.serve_connection(io, service);
                until_done(conn, shutdown, kill, |c| c.graceful_shutdown()).await
            }
        }
    }
}

/// Drives `conn` to its end, calling `stop` on it once when `shutdown` fires; drops it (closing
/// the socket) when `kill` fires.
async fn until_done<C>(
    conn: C,
    shutdown: &CancellationToken,
    kill: &CancellationToken,
    stop: impl FnOnce(Pin<&mut C>),
) -> Result<(), hyper::Error>
where
    C: Future<Output = Result<(), hyper::Error>>,
{
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => return result,
        () = kill.cancelled() => return Ok(()),
        () = shutdown.cancelled() => {}
    }
    stop(conn.as_mut());
    tokio::select! {
        result = conn.as_mut() => result,
        () = kill.cancelled() => Ok(()),
    }
}

/// Connections being refused at once, at most.
const MAX_REFUSALS: usize = 1024;

/// Over `--max-connections`: the server is full (over `--max-connections-per-ip` is
/// [`ApiError::TooManyConnections`]).
fn connections_full() -> ApiError {
    ApiError::Capacity("too many connections; retry shortly".into())
}

/// Answers a connection over a cap with a bare status and closes it: waits (briefly) for the
/// request's headers first, since HTTP clients refuse an answer that comes before their
/// request, and reads a little after, since closing with unread data resets the connection
/// and the client could lose the answer. At most about 3 s per refused connection.
async fn refuse(mut tcp: tokio::net::TcpStream, refusal: ApiError) {
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
    let status = refusal.status();
    let body = refusal.body().to_string();
    let retry_after = refusal.retry_after().unwrap_or(1);
    let response = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\nretry-after: {retry_after}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        status.as_str(),
        status.canonical_reason().unwrap_or(""),
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

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt as _;

    use super::*;

    /// Context switches of this thread so far (each wait of the runtime that sleeps is one).
    fn voluntary_switches() -> u64 {
        std::fs::read_to_string("/proc/thread-self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (client, server)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_partial_preface_is_waited_for_not_polled() {
        let (mut client, mut server) = pair().await;
        client.write_all(b"PR").await.expect("write");
        // The bytes are there before sniffing starts, so a peek would succeed every time.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let before = voluntary_switches();
        let sniffed = sniff(&mut server, Duration::from_millis(500)).await;
        let wakeups = voluntary_switches() - before;
        assert!(sniffed.is_none(), "nothing decided without a third byte");
        // Waiting on the socket costs a handful of wake-ups; re-peeking every 1 ms ~500.
        assert!(wakeups < 50, "{wakeups} wake-ups while waiting 500 ms");
    }

    #[tokio::test]
    async fn a_preface_sent_byte_by_byte_is_replayed_to_the_server() {
        use tokio::io::AsyncReadExt as _;
        let (mut client, mut server) = pair().await;
        let sender = tokio::spawn(async move {
            for b in b"PRI * HTTP/2.0" {
                client.write_all(&[*b]).await.expect("write");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            client
        });
        let (protocol, prefix) = sniff(&mut server, Duration::from_secs(5))
            .await
            .expect("decided");
        assert_eq!(protocol, Protocol::Http2);
        let mut replayed = Prefixed::new(prefix, server);
        let _client = sender.await.expect("sender");
        let mut got = vec![0u8; 14];
        replayed.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"PRI * HTTP/2.0");

        let (mut client, mut server) = pair().await;
        client
            .write_all(b"GET / HTTP/1.1\r\n")
            .await
            .expect("write");
        let (protocol, prefix) = sniff(&mut server, Duration::from_secs(5))
            .await
            .expect("decided");
        assert_eq!(
            (protocol, prefix.len()),
            (Protocol::Http1, 0),
            "peeked only"
        );
    }

    /// Reads from `tcp` until what was read ends with `end`.
    async fn read_until(tcp: &mut TcpStream, end: &str) -> String {
        use tokio::io::AsyncReadExt as _;
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        let read = async {
            while !got.ends_with(end.as_bytes()) {
                let n = tcp.read(&mut buf).await.expect("read");
                assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
                got.extend_from_slice(&buf[..n]);
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("in time");
        String::from_utf8(got).expect("utf-8")
    }

    #[tokio::test]
    async fn an_events_response_then_hyper_on_the_same_connection() {
        use tokio::io::AsyncReadExt as _;
        let router = Router::new()
            .route(
                "/v1/streams/{id}/events",
                axum::routing::get(|| async { "first" }),
            )
            .route("/next", axum::routing::get(|| async { "second" }));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let lifecycle = crate::Lifecycle::default();
        let limits = ConnectionLimits {
            max_connections: 10,
            per_ip: PerIp::new(10),
            header_read_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(5),
        };
        tokio::spawn(serve(listener, router, None, limits, lifecycle.clone()));

        // Kept alive: the events response, then the next request is hyper's.
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(b"GET /v1/streams/abc/events HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        let first = read_until(&mut tcp, "first").await;
        assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{first}");
        assert!(first.contains("\r\ncontent-length: 5\r\n"), "{first}");
        assert!(!first.contains("connection"), "{first}");
        tcp.write_all(b"GET /next HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut second = String::new();
        tcp.read_to_string(&mut second).await.expect("read");
        assert!(second.starts_with("HTTP/1.1 200 OK\r\n"), "{second}");
        assert!(second.ends_with("second"), "{second}");

        // Asked to close: the response says so and the connection ends.
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(
            b"GET /v1/streams/abc/events HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await
        .expect("write");
        let mut only = String::new();
        tcp.read_to_string(&mut only).await.expect("read");
        assert!(only.contains("\r\nconnection: close\r\n"), "{only}");
        assert!(only.ends_with("\r\n\r\nfirst"), "{only}");
        lifecycle.root.cancel();
    }
}
