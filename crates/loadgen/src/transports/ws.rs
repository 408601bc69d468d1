//! WebSocket `/v1/ws`: a pool of sockets, each multiplexing up to `--streams-per-socket`
//! streams started with `{"type":"start"}`. One task owns each socket; streams are handed to
//! it over a bounded channel and it answers each with a oneshot when the stream ends. A socket
//! connects on its first stream and reconnects on the next one after it failed.
//!
//! When a stream times out, the socket is pinged: a live socket task answers at once, one
//! that does not within 3 s is stuck (the finding is in the report's notes).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
    time::Instant,
};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{Message, protocol::WebSocketConfig},
};
use tokio_util::sync::CancellationToken;

use crate::{
    cli::authority,
    ctx::Ended,
    event::Ev,
    stats::{Kind, Reader, Stats, unix_nanos},
    verify::{CheckOptions, Violation},
};

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// A stream for a socket to start.
struct Start {
    label: String,
    body: Value,
    reply: oneshot::Sender<Ended>,
}

struct Socket {
    tx: mpsc::Sender<Start>,
    /// Streams handed to this socket and not yet answered.
    active: Arc<AtomicUsize>,
}

/// The sockets of a run.
pub struct WsPool {
    sockets: Vec<Socket>,
    /// Cancelled at the end of the run: idle sockets close.
    close: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// What a socket task needs to know.
struct SocketConf {
    index: usize,
    url: String,
    stats: Arc<Stats>,
    opts: CheckOptions,
    timeout: Duration,
    /// TLS of `wss://` URLs.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl WsPool {
    /// `sockets` socket tasks, socket i on target i mod the number of targets.
    pub fn new(
        targets: &[String],
        sockets: usize,
        per_socket: usize,
        stats: Arc<Stats>,
        opts: CheckOptions,
        timeout: Duration,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> anyhow::Result<Self> {
        let close = CancellationToken::new();
        let mut list = Vec::with_capacity(sockets);
        let mut tasks = Vec::with_capacity(sockets);
        for index in 0..sockets {
            let target = &targets[index % targets.len()];
            let scheme = if target.starts_with("https://") {
                "wss"
            } else {
                "ws"
            };
            let url = format!("{scheme}://{}/v1/ws", authority(target)?);
            let (tx, rx) = mpsc::channel(per_socket.max(1));
            let conf = SocketConf {
                index,
                url,
                stats: stats.clone(),
                opts,
                timeout,
                tls: tls.clone(),
            };
            tasks.push(tokio::spawn(socket_task(conf, rx, close.clone())));
            list.push(Socket {
                tx,
                active: Arc::new(AtomicUsize::new(0)),
            });
        }
        Ok(Self {
            sockets: list,
            close,
            tasks: Mutex::new(tasks),
        })
    }

    /// Runs one stream: on socket `slot % sockets` (closed loop) or on the least busy one.
    pub async fn run(&self, slot: Option<usize>, label: String, body: Value) -> Ended {
        let index = match slot {
            Some(s) => s % self.sockets.len(),
            None => self
                .sockets
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| s.active.load(Ordering::Relaxed))
                .map_or(0, |(i, _)| i),
        };
        let socket = &self.sockets[index];
        socket.active.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        let ended = match socket.tx.send(Start { label, body, reply }).await {
            Ok(()) => answer.await.unwrap_or_default(),
            Err(_) => Ended::default(),
        };
        socket.active.fetch_sub(1, Ordering::Relaxed);
        ended
    }

    /// Closes the sockets once their streams are done, and waits for their tasks.
    pub async fn shutdown(&self) {
        self.close.cancel();
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for t in tasks {
            let _ = t.await;
        }
    }
}

/// A stream in flight on a socket.
struct Pending {
    reader: Reader,
    reply: oneshot::Sender<Ended>,
    timeout_at: Instant,
    stream_id: Option<String>,
}

/// An outstanding ping sent after a stream timed out.
struct Probe {
    id: String,
    until: Instant,
    timed_out: usize,
}

async fn next_message(ws: &mut Option<Ws>) -> Option<Result<Message, String>> {
    match ws {
        Some(ws) => ws.next().await.map(|r| r.map_err(|e| e.to_string())),
        None => std::future::pending().await,
    }
}

async fn connect(url: &str, tls: Option<&Arc<rustls::ClientConfig>>) -> Result<Ws, String> {
    // Small client buffers: thousands of sockets on this side too.
    let config = WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0);
    let connector = tls.map(|c| tokio_tungstenite::Connector::Rustls(c.clone()));
    let work = tokio_tungstenite::connect_async_tls_with_config(url, Some(config), true, connector);
    match tokio::time::timeout(Duration::from_secs(10), work).await {
        Err(_) => Err("timeout".to_owned()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok((ws, _))) => Ok(ws),
    }
}

async fn socket_task(conf: SocketConf, mut rx: mpsc::Receiver<Start>, close: CancellationToken) {
    let stats = conf.stats.clone();
    let mut ws: Option<Ws> = None;
    let mut pending: HashMap<String, Pending> = HashMap::new();
    let mut by_stream: HashMap<String, String> = HashMap::new();
    let mut requests = 0u64;
    let mut probe: Option<Probe> = None;
    let mut probes = 0u64;
    let mut timed_out = 0usize;
    let mut rx_open = true;
    loop {
        let wake = pending
            .values()
            .map(|p| p.timeout_at)
            .chain(probe.as_ref().map(|p| p.until))
            .min();
        tokio::select! {
            start = rx.recv(), if rx_open => {
                let Some(start) = start else {
                    rx_open = false;
                    continue;
                };
                if ws.is_none() {
                    match connect(&conf.url, conf.tls.as_ref()).await {
                        Ok(s) => ws = Some(s),
                        Err(e) => {
                            stats.error("ws_connect", || format!("{}: {e}", conf.url));
                            let _ = start.reply.send(Ended::default());
                            continue;
                        }
                    }
                }
                requests += 1;
                let rid = format!("r{requests}");
                let msg = json!({"type": "start", "request_id": rid, "request": start.body});
                let sent_ns = unix_nanos();
                let reader = Reader::new(
                    stats.clone(),
                    Kind::Ws,
                    start.label,
                    conf.opts,
                    sent_ns,
                    sent_ns,
                );
                pending.insert(rid, Pending {
                    reader,
                    reply: start.reply,
                    timeout_at: Instant::now() + conf.timeout,
                    stream_id: None,
                });
                let sent = match ws.as_mut() {
                    Some(s) => s.send(Message::text(msg.to_string())).await.map_err(|e| e.to_string()),
                    None => Err("not connected".to_owned()),
                };
                if let Err(e) = sent {
                    stats.error("ws_send", || e);
                    fail_all(&mut pending, &mut by_stream);
                    ws = None;
                }
            }
            msg = next_message(&mut ws) => {
                let recv = unix_nanos();
                let text = match msg {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(frame))) => {
                        stats.error("ws_closed_by_server", || format!("{frame:?}"));
                        fail_all(&mut pending, &mut by_stream);
                        ws = None;
                        continue;
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        stats.error("ws_read", || e);
                        fail_all(&mut pending, &mut by_stream);
                        ws = None;
                        continue;
                    }
                    None => {
                        stats.error("ws_eof", String::new);
                        fail_all(&mut pending, &mut by_stream);
                        ws = None;
                        continue;
                    }
                };
                on_text(&conf, &text, recv, &mut pending, &mut by_stream, &mut probe);
            }
            () = sleep_until_opt(wake) => {
                let now = Instant::now();
                let expired: Vec<String> = pending
                    .iter()
                    .filter(|(_, p)| p.timeout_at <= now)
                    .map(|(k, _)| k.clone())
                    .collect();
                for rid in expired {
                    let Some(p) = pending.remove(&rid) else { continue };
                    let id = p.stream_id.clone().unwrap_or_default();
                    if let Some(sid) = &p.stream_id {
                        by_stream.remove(sid);
                        // Free the subscription on the server.
                        if let Some(s) = ws.as_mut() {
                            let msg = json!({"type": "unsubscribe", "stream_id": sid});
                            let _ = s.send(Message::text(msg.to_string())).await;
                        }
                    }
                    let tokens = p.reader.tokens();
                    let label = p.reader.label.clone();
                    stats.error("timeout_body", || format!("{label}, stream {id}, {tokens} tokens"));
                    stats.stalled(Kind::Ws, id, tokens);
                    let _ = p.reply.send(Ended { ok: false, completed: p.reader.end().completed });
                    timed_out += 1;
                }
                if let Some(p) = &probe && p.until <= now {
                    stats.note(format!(
                        "socket {} ({}): {} streams timed out; it did NOT answer a ping within \
                         3 s (the server's socket task is stuck)",
                        conf.index, conf.url, p.timed_out
                    ));
                    probe = None;
                }
                if timed_out > 0
                    && probe.is_none()
                    && let Some(s) = ws.as_mut()
                {
                    probes += 1;
                    let id = format!("stall-probe-{probes}");
                    let msg = json!({"type": "ping", "id": id});
                    if s.send(Message::text(msg.to_string())).await.is_ok() {
                        probe = Some(Probe { id, until: Instant::now() + Duration::from_secs(3), timed_out });
                    }
                    timed_out = 0;
                }
            }
            () = close.cancelled(), if pending.is_empty() && probe.is_none() => break,
        }
        if !rx_open && pending.is_empty() {
            break;
        }
    }
    if let Some(mut s) = ws {
        let _ = s.close(None).await;
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The socket failed: every stream on it ends (each is verified as far as it got).
fn fail_all(pending: &mut HashMap<String, Pending>, by_stream: &mut HashMap<String, String>) {
    by_stream.clear();
    for (_, p) in pending.drain() {
        let end = p.reader.end();
        let _ = p.reply.send(Ended {
            ok: false,
            completed: end.completed,
        });
    }
}

fn on_text(
    conf: &SocketConf,
    text: &str,
    recv: i64,
    pending: &mut HashMap<String, Pending>,
    by_stream: &mut HashMap<String, String>,
    probe: &mut Option<Probe>,
) {
    let stats = &conf.stats;
    let ev = match serde_json::from_str::<Ev<'_>>(text) {
        Ok(ev) => ev,
        Err(e) => {
            stats.add_violations([(Violation::UnparseableEvent, 1)].into_iter());
            stats.example(|| format!("violation in ws: unparseable_event: {e}: {text}"));
            return;
        }
    };
    match (ev.kind.as_deref(), ev.seq) {
        (Some("started"), _) => {
            let (Some(rid), Some(sid)) = (&ev.request_id, &ev.stream_id) else {
                stats.error("ws_bad_started", || text.to_owned());
                return;
            };
            match pending.get_mut(rid.as_ref()) {
                Some(p) => {
                    p.stream_id = Some(sid.to_string());
                    by_stream.insert(sid.to_string(), rid.to_string());
                }
                None => stats.error("ws_unknown_request", || text.to_owned()),
            }
        }
        (Some("pong"), _) => {
            let answered = probe
                .as_ref()
                .is_some_and(|p| ev.id.as_ref().and_then(Value::as_str) == Some(p.id.as_str()));
            if answered && let Some(p) = probe.take() {
                stats.note(format!(
                    "socket {} ({}): {} streams timed out; it answered a ping at once",
                    conf.index, conf.url, p.timed_out
                ));
            }
        }
        // A protocol error (no seq): about a request or a stream of this socket.
        (Some("error"), None) => {
            let code = ev.code.as_deref().unwrap_or("?");
            stats.error(format!("ws_error_{code}"), || text.to_owned());
            let rid = ev
                .request_id
                .as_deref()
                .filter(|r| pending.contains_key(*r))
                .map(str::to_owned)
                .or_else(|| {
                    ev.stream_id
                        .as_deref()
                        .and_then(|s| by_stream.get(s).cloned())
                });
            if let Some(rid) = rid
                && let Some(p) = pending.remove(&rid)
            {
                if let Some(sid) = &p.stream_id {
                    by_stream.remove(sid);
                }
                // A stream refused before it started is only an error; one cut off (e.g.
                // slow_consumer) is verified as far as it got.
                let completed = if p.stream_id.is_some() {
                    p.reader.end().completed
                } else {
                    p.reader.discard();
                    false
                };
                let _ = p.reply.send(Ended {
                    ok: false,
                    completed,
                });
            }
        }
        _ => {
            let Some(rid) = ev.stream_id.as_deref().and_then(|s| by_stream.get(s)) else {
                stats.error("ws_unknown_stream", || text.to_owned());
                return;
            };
            let rid = rid.clone();
            let Some(p) = pending.get_mut(&rid) else {
                return;
            };
            p.reader.native(&ev, recv);
            if p.reader.has_terminal()
                && let Some(p) = pending.remove(&rid)
            {
                if let Some(sid) = &p.stream_id {
                    by_stream.remove(sid);
                }
                let end = p.reader.end();
                let _ = p.reply.send(Ended {
                    ok: end.terminal,
                    completed: end.completed,
                });
            }
        }
    }
}
