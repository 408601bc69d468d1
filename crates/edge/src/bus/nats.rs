//! The cluster bus: NATS core (at-most-once, no JetStream).
//!
//! - One NATS message per published batch on [`subjects::stream_events`]: the payload is the
//!   events' native JSON joined with `\n` (serde_json escapes newlines inside strings, so a raw
//!   `\n` only ever separates events); headers `tokenfan-first-seq`, `tokenfan-last-seq` and,
//!   when the stream has one, `traceparent`.
//! - One NATS subscription per [`Bus::subscribe`] call; a task parses each message back into
//!   events and hands it to a bounded feed. A full feed drops the batch (the receiver refills
//!   gaps from the store by seq); dropping the feed ends the task and unsubscribes.
//! - Control requests (cancel, touch) are the bare stream id on [`subjects::CANCEL`] and
//!   [`subjects::TOUCH`].
//!
//! The client reconnects forever after the first successful connect and re-registers every
//! live subscription itself. While it is disconnected, `publish` and `subscribe` fail at once
//! instead of queueing stale batches behind the outage.
//!
//! # Production NATS ([`NatsArgs`])
//!
//! - `--nats-url a,b,c` is a seed list: the first connect tries each (in random order) until
//!   one answers, so start-up survives a node being down; later the client also reconnects
//!   to the nodes the server announces (`connect_urls`).
//! - Authentication: user and password, a token, an NKey seed file, or a `.creds` file (a
//!   user JWT and its seed: decentralised auth) — one of them. Secrets come from files or
//!   environment variables and are never logged (see [`crate::secret`]).
//! - TLS: `tls://` URLs, or `--nats-ca-file` (which then requires TLS on every node), and
//!   an optional client certificate (`--nats-client-cert`, `--nats-client-key`) for servers
//!   that verify clients.

use std::{
    fmt,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::ensure;
use async_nats::{
    ConnectOptions, HeaderMap, HeaderValue, Message, ServerAddr, Subscriber, connection::State,
};
use bytes::{BufMut as _, Bytes, BytesMut};
use futures::StreamExt as _;
use tokio::sync::mpsc;

use super::{Bus, BusBatch, BusError, EventFeed, subjects};
use crate::{event::Event, ids::StreamId, secret::Secret};

/// Batches a feed may hold before new ones are dropped for it.
const FEED_CAPACITY: usize = 1024;
/// Requests a control feed may hold before the forwarder waits for the reader.
const CONTROL_CAPACITY: usize = 1024;
/// Bound on the TCP connect + NATS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on handing one message to the client (only reached when its queue is full).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on registering a subscription with the server (SUB, then an echo round trip).
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest pause between reconnect attempts.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(2);

type Batch = Arc<[Arc<Event>]>;

/// NATS connection options (flattened into the edge's configuration).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NatsArgs {
    /// NATS user name (with `--nats-password` or `--nats-password-file`).
    #[arg(long, env = "TOKENFAN_EDGE_NATS_USER")]
    pub nats_user: Option<String>,

    /// NATS password. Prefer the environment variable or `--nats-password-file`: command
    /// lines are visible to other local users.
    #[arg(long, env = "TOKENFAN_EDGE_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<Secret>,

    /// File holding the NATS password.
    #[arg(long, env = "TOKENFAN_EDGE_NATS_PASSWORD_FILE")]
    pub nats_password_file: Option<PathBuf>,

    /// NATS authentication token.
    #[arg(long, env = "TOKENFAN_EDGE_NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<Secret>,

    /// File holding the NATS authentication token.
    #[arg(long, env = "TOKENFAN_EDGE_NATS_TOKEN_FILE")]
    pub nats_token_file: Option<PathBuf>,

    /// File holding an NKey user seed (`SU…`): the client signs the server's nonce with it.
    #[arg(long, env = "TOKENFAN_EDGE_NATS_NKEY_FILE")]
    pub nats_nkey_file: Option<PathBuf>,

    /// A NATS `.creds` file (user JWT and NKey seed), as `nsc` or a managed NATS service
    /// issues them.
    #[arg(long, env = "TOKENFAN_EDGE_NATS_CREDS_FILE")]
    pub nats_creds_file: Option<PathBuf>,

    /// PEM CA certificates that sign the NATS servers' certificates; setting it requires TLS
    /// on every connection.
    #[arg(long, env = "TOKENFAN_EDGE_NATS_CA_FILE")]
    pub nats_ca_file: Option<PathBuf>,

    /// PEM client certificate for NATS TLS (servers with `verify: true`).
    #[arg(
        long,
        env = "TOKENFAN_EDGE_NATS_CLIENT_CERT",
        requires = "nats_client_key"
    )]
    pub nats_client_cert: Option<PathBuf>,

    /// PEM private key of `--nats-client-cert`.
    #[arg(
        long,
        env = "TOKENFAN_EDGE_NATS_CLIENT_KEY",
        requires = "nats_client_cert"
    )]
    pub nats_client_key: Option<PathBuf>,
}

impl NatsArgs {
    /// Checks what can be checked without connecting: at most one way to authenticate, a
    /// password only with a user, and the URLs parse.
    pub fn validate(&self, url: Option<&str>) -> anyhow::Result<()> {
        let password = self.nats_password.is_some() || self.nats_password_file.is_some();
        let token = self.nats_token.is_some() || self.nats_token_file.is_some();
        ensure!(
            self.nats_user.is_some() == password,
            "--nats-user and --nats-password (or --nats-password-file) go together"
        );
        let ways = [
            self.nats_user.is_some(),
            token,
            self.nats_nkey_file.is_some(),
            self.nats_creds_file.is_some(),
        ];
        ensure!(
            ways.iter().filter(|w| **w).count() <= 1,
            "choose one NATS authentication: --nats-user, --nats-token, --nats-nkey-file or \
             --nats-creds-file"
        );
        match url {
            Some(url) => {
                seed_list(url)?;
            }
            None => ensure!(
                !(ways.contains(&true) || self.nats_ca_file.is_some()),
                "the --nats-* options need --nats-url"
            ),
        }
        Ok(())
    }

    /// Client options with credentials and TLS applied (files are read here).
    async fn options(&self) -> anyhow::Result<ConnectOptions> {
        use crate::secret::resolve;
        use anyhow::Context as _;

        let mut options = ConnectOptions::new();
        if let Some(user) = &self.nats_user {
            let password = resolve(
                self.nats_password.as_ref(),
                self.nats_password_file.as_deref(),
                "--nats-password",
            )?
            .context("--nats-user needs --nats-password or --nats-password-file")?;
            options = options.user_and_password(user.clone(), password.expose().to_owned());
        }
        if let Some(token) = resolve(
            self.nats_token.as_ref(),
            self.nats_token_file.as_deref(),
            "--nats-token",
        )? {
            options = options.token(token.expose().to_owned());
        }
        if let Some(file) = &self.nats_nkey_file {
            let seed = resolve(None, Some(file), "--nats-nkey")?.unwrap_or_else(|| Secret::new(""));
            let seed = seed.expose().trim();
            // Checked here so a wrong file fails start-up with a clear message, not a failed
            // handshake.
            nkeys::KeyPair::from_seed(seed).map_err(|_| {
                anyhow::anyhow!(
                    "--nats-nkey-file: {} does not hold an NKey seed",
                    file.display()
                )
            })?;
            options = options.nkey(seed.to_owned());
        }
        if let Some(file) = &self.nats_creds_file {
            options = options
                .credentials_file(file)
                .await
                .with_context(|| format!("--nats-creds-file: cannot use {}", file.display()))?;
        }
        if let Some(ca) = &self.nats_ca_file {
            ensure!(
                ca.is_file(),
                "--nats-ca-file: {} is not a readable file",
                ca.display()
            );
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&self.nats_client_cert, &self.nats_client_key) {
            for (path, flag) in [(cert, "--nats-client-cert"), (key, "--nats-client-key")] {
                ensure!(
                    path.is_file(),
                    "{flag}: {} is not a readable file",
                    path.display()
                );
            }
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        Ok(options)
    }
}

/// The comma-separated seed URLs of `--nats-url`.
fn seed_list(url: &str) -> anyhow::Result<Vec<ServerAddr>> {
    let seeds = url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|one| {
            one.parse::<ServerAddr>().map_err(|err| {
                anyhow::anyhow!("--nats-url: {} is not a NATS URL: {err}", redact(one))
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    ensure!(!seeds.is_empty(), "--nats-url is empty");
    Ok(seeds)
}

/// Fan-out between replicas over NATS.
#[derive(Clone)]
pub struct NatsBus {
    client: async_nats::Client,
    /// Forwarding tasks alive (event feeds and control feeds).
    active_feeds: Arc<AtomicUsize>,
}

impl fmt::Debug for NatsBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsBus")
            .field("state", &self.client.connection_state())
            .field("active_feeds", &self.active_feeds())
            .finish()
    }
}

impl NatsBus {
    /// Connects to `url` (one or more comma-separated `nats://host:port`) as
    /// `tokenfan-edge/<replica>`, without credentials.
    pub async fn connect(url: &str, replica: &str) -> Result<Self, BusError> {
        Self::connect_with(url, &NatsArgs::default(), replica).await
    }

    /// Connects to the seed list `url` with the credentials and TLS of `args`. The first
    /// connect must reach one of the seeds (a wrong URL, credential or certificate fails
    /// start-up with a clear error); after that the client reconnects forever.
    pub async fn connect_with(url: &str, args: &NatsArgs, replica: &str) -> Result<Self, BusError> {
        let shown = redact(url);
        let seeds = seed_list(url).map_err(|err| backend_error(format!("{err:#}")))?;
        let options = args
            .options()
            .await
            .map_err(|err| backend_error(format!("NATS options: {err:#}")))?;
        let client = options
            .name(format!("tokenfan-edge/{replica}"))
            .max_reconnects(None)
            .connection_timeout(CONNECT_TIMEOUT)
            .reconnect_delay_callback(reconnect_delay)
            .event_callback(|event| async move { log_event(event) })
            .connect(seeds)
            .await
            .map_err(|err| backend_error(format!("cannot connect to NATS at {shown}: {err}")))?;
        tracing::info!(url = %shown, "bus: connected to NATS");
        Ok(Self {
            client,
            active_feeds: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Whether the client is connected right now (for readiness).
    pub fn connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// How many feeds (event and control) have a live forwarding task.
    pub fn active_feeds(&self) -> usize {
        self.active_feeds.load(Ordering::Relaxed)
    }

    fn ensure_connected(&self) -> Result<(), BusError> {
        match self.client.connection_state() {
            State::Connected => Ok(()),
            state => Err(backend_error(format!(
                "not connected to NATS ({state}); reconnecting"
            ))),
        }
    }

    /// Subscribes to `subject` and returns once the server has registered it, so nothing
    /// published after this returns (from any connection) is missed.
    async fn subscribe_registered(&self, subject: String) -> Result<Subscriber, BusError> {
        self.ensure_connected()?;
        let register = async {
            let sub = self
                .client
                .subscribe(subject.clone())
                .await
                .map_err(|err| backend_error(format!("subscribing to {subject}: {err}")))?;
            round_trip(&self.client)
                .await
                .map_err(|err| backend_error(format!("registering {subject}: {err}")))?;
            Ok(sub)
        };
        tokio::time::timeout(SUBSCRIBE_TIMEOUT, register)
            .await
            .map_err(|_| {
                backend_error(format!(
                    "registering {subject} took longer than {SUBSCRIBE_TIMEOUT:?}"
                ))
            })?
    }

    /// Publishes `id` on a control subject.
    async fn publish_control(&self, subject: &'static str, id: &StreamId) -> Result<(), BusError> {
        self.ensure_connected()?;
        let payload = Bytes::copy_from_slice(id.as_str().as_bytes());
        tokio::time::timeout(PUBLISH_TIMEOUT, self.client.publish(subject, payload))
            .await
            .map_err(|_| backend_error(format!("publishing {id} on {subject} timed out")))?
            .map_err(|err| backend_error(format!("publishing {id} on {subject}: {err}")))
    }

    /// Receives the stream ids published on a control subject.
    async fn control_requests(
        &self,
        subject: &'static str,
    ) -> Result<mpsc::Receiver<StreamId>, BusError> {
        let sub = self.subscribe_registered(subject.to_owned()).await?;
        let (tx, rx) = mpsc::channel(CONTROL_CAPACITY);
        tokio::spawn(forward_ids(sub, tx, subject, self.feed_guard()));
        Ok(rx)
    }

    fn feed_guard(&self) -> FeedGuard {
        self.active_feeds.fetch_add(1, Ordering::Relaxed);
        FeedGuard(self.active_feeds.clone())
    }
}

#[async_trait::async_trait]
impl Bus for NatsBus {
    async fn publish(
        &self,
        id: &StreamId,
        events: Batch,
        traceparent: Option<String>,
    ) -> Result<(), BusError> {
        let (Some(first), Some(last)) = (events.first(), events.last()) else {
            return Ok(());
        };
        let subject = subjects::stream_events(id).inspect_err(|_| count_error())?;
        let payload = encode_batch(&events)?;
        let mut headers = HeaderMap::new();
        headers.insert(subjects::HEADER_FIRST_SEQ, first.seq.to_string());
        headers.insert(subjects::HEADER_LAST_SEQ, last.seq.to_string());
        if let Some(tp) = traceparent {
            match tp.parse::<HeaderValue>() {
                Ok(value) => headers.insert(subjects::HEADER_TRACEPARENT, value),
                Err(_) => tracing::debug!(%id, "bus: traceparent not usable as a header; dropped"),
            }
        }
        self.ensure_connected()?;
        tokio::time::timeout(
            PUBLISH_TIMEOUT,
            self.client.publish_with_headers(subject, headers, payload),
        )
        .await
        .map_err(|_| backend_error(format!("publishing to stream {id} timed out")))?
        .map_err(|err| backend_error(format!("publishing to stream {id}: {err}")))
    }

    async fn subscribe(&self, id: &StreamId) -> Result<EventFeed, BusError> {
        let subject = subjects::stream_events(id).inspect_err(|_| count_error())?;
        let sub = self.subscribe_registered(subject).await?;
        let (tx, rx) = mpsc::channel(FEED_CAPACITY);
        tokio::spawn(forward_events(sub, tx, id.clone(), self.feed_guard()));
        Ok(rx)
    }

    async fn request_cancel(&self, id: &StreamId) -> Result<(), BusError> {
        self.publish_control(subjects::CANCEL, id).await
    }

    async fn cancel_requests(&self) -> Result<mpsc::Receiver<StreamId>, BusError> {
        self.control_requests(subjects::CANCEL).await
    }

    async fn request_touch(&self, id: &StreamId) -> Result<(), BusError> {
        self.publish_control(subjects::TOUCH, id).await
    }

    async fn touch_requests(&self) -> Result<mpsc::Receiver<StreamId>, BusError> {
        self.control_requests(subjects::TOUCH).await
    }

    fn healthy(&self) -> bool {
        self.connected()
    }
}

/// Waits until the server has processed everything this client sent before: the client
/// echoes an empty message to itself through a fresh inbox. (`Client::flush` only flushes the
/// socket, and async-nats has no public PING; the server handles one connection's commands in
/// order, so the echo comes back only after the earlier SUBs are registered.)
async fn round_trip(client: &async_nats::Client) -> Result<(), String> {
    let inbox = client.new_inbox();
    let mut echo = client
        .subscribe(inbox.clone())
        .await
        .map_err(|err| err.to_string())?;
    client
        .publish(inbox, Bytes::new())
        .await
        .map_err(|err| err.to_string())?;
    let back = echo.next().await;
    let _ = echo.unsubscribe().await;
    back.map(|_| ())
        .ok_or_else(|| "the connection closed".to_owned())
}

/// Keeps [`NatsBus::active_feeds`] honest however a forwarding task ends.
struct FeedGuard(Arc<AtomicUsize>);

impl Drop for FeedGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Moves one stream's messages into its feed until the feed's receiver is dropped or the
/// client closes for good; then unsubscribes.
async fn forward_events(
    mut sub: Subscriber,
    tx: mpsc::Sender<BusBatch>,
    id: StreamId,
    _guard: FeedGuard,
) {
    loop {
        let message = tokio::select! {
            biased;
            () = tx.closed() => break,
            message = sub.next() => match message {
                Some(message) => message,
                None => break,
            },
        };
        let events = match decode_batch(&message) {
            Ok(events) => events,
            Err(err) => {
                count_error();
                tracing::warn!(%id, %err, "bus: undecodable batch dropped");
                continue;
            }
        };
        let traceparent = message
            .headers
            .as_ref()
            .and_then(|h| h.get(subjects::HEADER_TRACEPARENT))
            .map(|v| Arc::from(v.as_str()));
        match tx.try_send(BusBatch {
            events,
            traceparent,
        }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!("tokenfan_edge_bus_dropped_batches_total").increment(1);
                tracing::debug!(%id, "bus: feed full; batch dropped");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => break,
        }
    }
    let _ = sub.unsubscribe().await;
}

/// Moves the stream ids of a control subject into its feed until the receiver is dropped.
async fn forward_ids(
    mut sub: Subscriber,
    tx: mpsc::Sender<StreamId>,
    subject: &'static str,
    _guard: FeedGuard,
) {
    loop {
        let message = tokio::select! {
            biased;
            () = tx.closed() => break,
            message = sub.next() => match message {
                Some(message) => message,
                None => break,
            },
        };
        let Some(id) = std::str::from_utf8(&message.payload)
            .ok()
            .and_then(StreamId::parse)
        else {
            count_error();
            tracing::warn!(
                subject,
                len = message.payload.len(),
                "bus: control message without a valid stream id ignored"
            );
            continue;
        };
        if tx.send(id).await.is_err() {
            break;
        }
    }
    let _ = sub.unsubscribe().await;
}

/// The events' native JSON joined with `\n`.
fn encode_batch(events: &[Arc<Event>]) -> Result<Bytes, BusError> {
    let len = events.iter().map(|e| e.json().len() + 1).sum();
    let mut payload = BytesMut::with_capacity(len);
    for (i, event) in events.iter().enumerate() {
        let json = event.json();
        // serde_json writes a newline inside a string as `\n`, never raw; an empty JSON means
        // the event failed to serialize. Either would corrupt the framing.
        if json.is_empty() || json.contains(&b'\n') {
            return Err(backend_error(format!(
                "event {} has no single-line JSON form",
                event.seq
            )));
        }
        if i > 0 {
            payload.put_u8(b'\n');
        }
        payload.put_slice(json);
    }
    Ok(payload.freeze())
}

/// Parses a batch message; refuses anything that is not a non-empty run of consecutive events
/// matching its seq headers.
fn decode_batch(message: &Message) -> Result<Batch, String> {
    let batch: Vec<Arc<Event>> = message
        .payload
        .split(|b| *b == b'\n')
        .map(|line| Event::from_json(line).map(Arc::new))
        .collect::<Option<_>>()
        .ok_or("an event line is not native event JSON")?;
    let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
        return Err("empty batch".into());
    };
    if batch.windows(2).any(|w| w[1].seq != w[0].seq + 1) {
        return Err("events are not consecutive".into());
    }
    if let Some(headers) = &message.headers {
        for (name, want) in [
            (subjects::HEADER_FIRST_SEQ, first.seq),
            (subjects::HEADER_LAST_SEQ, last.seq),
        ] {
            if let Some(value) = headers.get(name)
                && value.as_str().parse::<u64>().ok() != Some(want)
            {
                return Err(format!("header {name} = {value} does not match the events"));
            }
        }
    }
    Ok(batch.into())
}

fn count_error() {
    metrics::counter!("tokenfan_edge_backend_errors_total", "backend" => "nats").increment(1);
}

fn backend_error(what: impl fmt::Display) -> BusError {
    count_error();
    BusError(format!("nats: {what}"))
}

/// 0 ms, then doubling from 10 ms up to [`MAX_RECONNECT_DELAY`].
fn reconnect_delay(attempts: usize) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let exp = u32::try_from(attempts - 2).unwrap_or(u32::MAX).min(16);
    Duration::from_millis(10u64 << exp).min(MAX_RECONNECT_DELAY)
}

fn log_event(event: async_nats::Event) {
    match event {
        async_nats::Event::Connected => tracing::info!("bus: NATS connected"),
        async_nats::Event::Disconnected => {
            tracing::warn!("bus: NATS disconnected; reconnecting");
        }
        async_nats::Event::SlowConsumer(sid) => {
            metrics::counter!("tokenfan_edge_bus_dropped_batches_total").increment(1);
            tracing::warn!(sid, "bus: NATS client dropped a message (slow consumer)");
        }
        async_nats::Event::ServerError(_) | async_nats::Event::ClientError(_) => {
            count_error();
            tracing::warn!(%event, "bus: NATS");
        }
        event => tracing::info!(%event, "bus: NATS"),
    }
}

/// The URL without credentials, for logs and errors.
fn redact(url: &str) -> String {
    url.split(',')
        .map(|one| match (one.find("://"), one.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}://***@{}", &one[..scheme], &one[at + 1..])
            }
            (None, Some(at)) => format!("***@{}", &one[at + 1..]),
            _ => one.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::{event::EventKind, testkit::NatsServer};

    const WAIT: Duration = Duration::from_secs(10);

    fn batch(seqs: std::ops::RangeInclusive<u64>) -> Batch {
        seqs.map(|s| {
            Arc::new(Event::new(
                s,
                EventKind::Token {
                    text: format!("t{s}"),
                },
            ))
        })
        .collect()
    }

    fn seqs(batch: &[Arc<Event>]) -> Vec<u64> {
        batch.iter().map(|e| e.seq).collect()
    }

    /// Polls `check` until it holds, failing the test after `within`.
    async fn wait_until(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + within;
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn recv<T>(rx: &mut mpsc::Receiver<T>) -> T {
        tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("in time")
            .expect("feed open")
    }

    async fn connect(server: &NatsServer) -> NatsBus {
        NatsBus::connect(&server.url(), "test")
            .await
            .expect("connects")
    }

    #[tokio::test]
    async fn conforms() {
        let server = NatsServer::start();
        let bus = connect(&server).await;
        assert!(bus.connected());
        crate::bus::conformance::run(&bus).await;
    }

    #[tokio::test]
    async fn the_first_connect_fails_clearly() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let err = NatsBus::connect(&format!("nats://user:secret@127.0.0.1:{port}"), "test")
            .await
            .expect_err("nothing listens");
        assert!(err.0.contains("cannot connect to NATS"), "{err}");
        assert!(
            !err.0.contains("secret"),
            "credentials stay out of errors: {err}"
        );
    }

    #[tokio::test]
    async fn batches_round_trip_with_their_framing() {
        let events: Batch = vec![
            Arc::new(Event::new(
                7,
                EventKind::Token {
                    text: "line\nbreak \"quoted\" 你好 🎉".into(),
                },
            )),
            Arc::new(Event::with_emit_time(
                8,
                EventKind::Token { text: "x".into() },
                Some(42),
            )),
            Arc::new(Event::new(
                9,
                EventKind::Done {
                    finish_reason: crate::event::FinishReason::Stop,
                    usage: crate::event::Usage {
                        prompt_tokens: 1,
                        completion_tokens: 2,
                    },
                },
            )),
        ]
        .into();
        let payload = encode_batch(&events).expect("encodes");
        assert_eq!(payload.split(|b| *b == b'\n').count(), 3);
        let message = Message {
            subject: "s".into(),
            reply: None,
            payload,
            headers: None,
            status: None,
            description: None,
            length: 0,
        };
        let back = decode_batch(&message).expect("decodes");
        for (a, b) in back.iter().zip(events.iter()) {
            assert_eq!((a.seq, &a.kind, a.json()), (b.seq, &b.kind, b.json()));
        }
        assert_eq!(back[1].emitted_at, Some(42));

        let bad = |payload: &'static [u8]| Message {
            payload: Bytes::from_static(payload),
            ..message.clone()
        };
        assert!(decode_batch(&bad(b"")).is_err());
        assert!(decode_batch(&bad(b"not json")).is_err());
        assert!(
            decode_batch(&bad(
                b"{\"type\":\"token\",\"seq\":1,\"text\":\"a\"}\n{\"type\":\"token\",\"seq\":3,\"text\":\"b\"}"
            ))
            .is_err(),
            "a gap inside a batch"
        );
        let mut headers = HeaderMap::new();
        headers.insert(subjects::HEADER_LAST_SEQ, "10");
        let lying = Message {
            headers: Some(headers),
            ..message.clone()
        };
        assert!(decode_batch(&lying).is_err(), "seq headers must match");
    }

    #[tokio::test]
    async fn seq_and_traceparent_headers_arrive() {
        let server = NatsServer::start();
        let bus = connect(&server).await;
        let raw = async_nats::connect(server.url()).await.expect("raw client");
        let id = StreamId::random();
        let mut sub = raw
            .subscribe(subjects::stream_events(&id).expect("subject"))
            .await
            .expect("subscribe");
        round_trip(&raw).await.expect("registered");

        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let events = batch(5..=7);
        bus.publish(&id, events.clone(), Some(tp.into()))
            .await
            .expect("publish");
        let message = tokio::time::timeout(WAIT, sub.next())
            .await
            .expect("in time")
            .expect("message");
        let headers = message.headers.as_ref().expect("headers");
        assert_eq!(
            headers
                .get(subjects::HEADER_TRACEPARENT)
                .map(|v| v.as_str()),
            Some(tp)
        );
        assert_eq!(
            headers.get(subjects::HEADER_FIRST_SEQ).map(|v| v.as_str()),
            Some("5")
        );
        assert_eq!(
            headers.get(subjects::HEADER_LAST_SEQ).map(|v| v.as_str()),
            Some("7")
        );
        let lines: Vec<&[u8]> = message.payload.split(|b| *b == b'\n').collect();
        let want: Vec<&[u8]> = events.iter().map(|e| e.json()).collect();
        assert_eq!(lines, want, "the native JSON of each event, one per line");

        bus.publish(&id, batch(8..=8), None).await.expect("publish");
        let message = tokio::time::timeout(WAIT, sub.next())
            .await
            .expect("in time")
            .expect("message");
        let headers = message.headers.as_ref().expect("headers");
        assert!(headers.get(subjects::HEADER_TRACEPARENT).is_none());
        assert_eq!(&message.payload[..], batch(8..=8)[0].json());

        bus.publish(&id, Vec::new().into(), Some(tp.into()))
            .await
            .expect("an empty batch is a no-op");
    }

    #[tokio::test]
    async fn dropping_the_feed_ends_its_task_and_subscription() {
        let server = NatsServer::start();
        let bus = connect(&server).await;
        let raw = async_nats::connect(server.url()).await.expect("raw client");
        let id = StreamId::random();
        let subject = subjects::stream_events(&id).expect("subject");

        let feed = bus.subscribe(&id).await.expect("subscribe");
        assert_eq!(bus.active_feeds(), 1);
        drop(feed);
        wait_until("the forwarding task ended", WAIT, || {
            bus.active_feeds() == 0
        })
        .await;
        // The UNSUB went out before the task ended; a round trip makes sure the server has it.
        round_trip(&bus.client).await.expect("round trip");
        let err = raw
            .request(subject, Bytes::from_static(b"anyone?"))
            .await
            .expect_err("nobody subscribes any more");
        assert_eq!(
            err.kind(),
            async_nats::client::RequestErrorKind::NoResponders
        );
        bus.publish(&id, batch(1..=1), None)
            .await
            .expect("publishing to a stream nobody follows is fine");

        let cancels = bus.cancel_requests().await.expect("control");
        assert_eq!(bus.active_feeds(), 1);
        drop(cancels);
        wait_until("the control task ended", WAIT, || bus.active_feeds() == 0).await;
    }

    #[tokio::test]
    async fn a_full_feed_drops_new_batches_and_recovers() {
        let server = NatsServer::start();
        let bus = connect(&server).await;
        let id = StreamId::random();
        let mut feed = bus.subscribe(&id).await.expect("subscribe");
        let total = FEED_CAPACITY as u64 + 200;
        for seq in 1..=total {
            bus.publish(&id, batch(seq..=seq), None)
                .await
                .expect("publish");
        }
        wait_until("the feed is full", WAIT, || feed.len() == FEED_CAPACITY).await;
        for want in 1..=FEED_CAPACITY as u64 {
            assert_eq!(
                seqs(&recv(&mut feed).await.events),
                [want],
                "the oldest batches kept"
            );
        }
        let sentinel = total + 1000;
        bus.publish(&id, batch(sentinel..=sentinel), None)
            .await
            .expect("publish");
        let mut last = FEED_CAPACITY as u64;
        loop {
            let got = seqs(&recv(&mut feed).await.events);
            assert!(
                got[0] > last,
                "still in order after drops: {got:?} after {last}"
            );
            last = got[0];
            if last == sentinel {
                break;
            }
        }
    }

    #[tokio::test]
    async fn control_subjects_carry_ids_and_ignore_garbage() {
        let server = NatsServer::start();
        let bus = connect(&server).await;
        let raw = async_nats::connect(server.url()).await.expect("raw client");
        let mut cancels = bus.cancel_requests().await.expect("control");
        raw.publish(subjects::CANCEL, Bytes::from_static(b"../../etc"))
            .await
            .expect("publish");
        let id = StreamId::random();
        bus.request_cancel(&id).await.expect("cancel");
        assert_eq!(recv(&mut cancels).await, id);

        let mut touches = bus.touch_requests().await.expect("control");
        bus.request_touch(&id).await.expect("touch");
        assert_eq!(recv(&mut touches).await, id);
        assert!(cancels.try_recv().is_err(), "a touch is not a cancel");
        assert!(bus.healthy());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_nats_restart_is_survived() {
        let server = NatsServer::start();
        let bus = connect(&server).await;
        let old = StreamId::random();
        let mut old_feed = bus.subscribe(&old).await.expect("subscribe");
        let mut cancels = bus.cancel_requests().await.expect("control");

        let server = tokio::task::spawn_blocking(move || {
            let mut server = server;
            server.restart();
            server
        })
        .await
        .expect("restarted");

        // A fresh subscribe + publish round trip works once the client is back on its own.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut attempt = 0u64;
        loop {
            attempt += 1;
            assert!(
                Instant::now() < deadline,
                "no round trip within 20 s of the restart"
            );
            let id = StreamId::random();
            let round_trip = async {
                let mut feed = bus.subscribe(&id).await.ok()?;
                bus.publish(&id, batch(attempt..=attempt), None)
                    .await
                    .ok()?;
                tokio::time::timeout(Duration::from_millis(500), feed.recv())
                    .await
                    .ok()
                    .flatten()
            };
            if let Some(got) = round_trip.await {
                assert_eq!(seqs(&got.events), [attempt]);
                break;
            }
            if !bus.connected() {
                wait_until("reconnected", Duration::from_secs(20), || bus.connected()).await;
            }
        }

        assert!(
            bus.client.statistics().connects.load(Ordering::Relaxed) >= 2,
            "the client really reconnected"
        );
        // The subscriptions made before the restart were re-registered by the client.
        bus.publish(&old, batch(1..=2), None)
            .await
            .expect("publish");
        assert_eq!(seqs(&recv(&mut old_feed).await.events), [1, 2]);
        let target = StreamId::random();
        bus.request_cancel(&target).await.expect("cancel");
        assert_eq!(recv(&mut cancels).await, target);
        drop(server);
    }

    #[test]
    fn reconnect_delays_grow_and_stay_bounded() {
        assert_eq!(reconnect_delay(1), Duration::ZERO);
        assert_eq!(reconnect_delay(2), Duration::from_millis(10));
        assert_eq!(reconnect_delay(3), Duration::from_millis(20));
        assert_eq!(reconnect_delay(1_000_000), MAX_RECONNECT_DELAY);
    }

    #[test]
    fn credentials_are_redacted() {
        assert_eq!(
            redact("nats://u:p@a:4222,nats://b:4222"),
            "nats://***@a:4222,nats://b:4222"
        );
        assert_eq!(redact("tok@host:4222"), "***@host:4222");
    }
}
