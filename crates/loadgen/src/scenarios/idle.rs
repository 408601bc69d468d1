//! `idle`: the server's resident memory per idle connection. Reads the server's VmRSS with no
//! client connection, opens `--connections` idle ones (`sse`: raw HTTP/1.1
//! `GET /v1/streams/{id}/events` on a stream that stays silent; `ws`: WebSockets with no
//! subscription; `ws-subscribed`: WebSockets each subscribed to the silent stream), waits until
//! the server counts them all (tokenfan's `tokenfan_edge_connections{transport}` gauge; with
//! `--no-metrics` or a server without `/metrics`, `--settle-secs` after the last one opened),
//! reads VmRSS again and reports (after − before) / N. The silent stream is created with
//! `timing.ttft_ms` = `--silent-ttft-ms`, and the reading must fall before that; the run checks
//! it did and that no token reached any connection.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use futures::{SinkExt as _, StreamExt as _};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    time::Instant,
};
use tokio_tungstenite::tungstenite::{Message, protocol::WebSocketConfig};
use tokio_util::sync::CancellationToken;

use crate::{
    Outcome,
    cli::{IdleArgs, IdleKind, authority},
    metrics::{fetch, metric},
    procfs::{CpuUse, cpu_reading, cpu_use, proc_memory},
    report::{now_unix_ms, write_json},
    transports::poll::short_poll_status,
};

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

/// The JSON result of `idle --json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdleReport {
    pub tool: String,
    pub label: Option<String>,
    pub scenario: String,
    pub kind: String,
    pub target: String,
    pub started_at_unix_ms: i64,
    pub connections: usize,
    pub opened: usize,
    pub opened_in_secs: f64,
    /// The server's connection gauge before and at the reading (None without `/metrics`).
    pub gauge_before: Option<f64>,
    pub gauge_at_reading: Option<f64>,
    pub server_rss_before_kib: u64,
    pub server_rss_after_kib: u64,
    pub server_rss_per_connection_kib: f64,
    pub server_anon_per_connection_kib: f64,
    pub server_rss_after_close_kib: u64,
    pub client_rss_per_connection_kib: f64,
    pub cpu: CpuUse,
    pub tokens_seen: u64,
    pub closed_early: u64,
    pub errors: BTreeMap<String, u64>,
    /// The reading fell inside the silent window (None for `ws`, which has no stream).
    pub inside_silent_window: Option<bool>,
    pub ok: bool,
}

#[derive(Default)]
struct IdleStats {
    open: AtomicUsize,
    extra_bytes: AtomicU64,
    tokens_seen: AtomicU64,
    ws_texts: AtomicU64,
    closed_early: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
}

fn bump(map: &Mutex<BTreeMap<String, u64>>, key: impl Into<String>) {
    *map.lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(key.into())
        .or_default() += 1;
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

pub async fn run(args: IdleArgs) -> anyhow::Result<Outcome> {
    if args.connections == 0 || args.connect_concurrency == 0 {
        bail!("--connections and --connect-concurrency must be at least 1");
    }
    let target = args.target.trim_end_matches('/').to_owned();
    let host = authority(&target)?;
    if target.starts_with("https://") {
        bail!("idle supports http:// targets only");
    }
    let pid = args.server_pid.to_string();
    proc_memory(&pid).with_context(|| format!("--server-pid {pid}"))?;
    let client = reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .build()
        .context("building the HTTP client")?;
    let started_at = now_unix_ms();
    let label = match args.kind {
        IdleKind::Sse => "transport=\"sse\"",
        IdleKind::Ws | IdleKind::WsSubscribed => "transport=\"ws\"",
    };
    // `+ 0.0` turns a gauge of -0 into 0.
    let gauge = |text: &str| metric(text, "tokenfan_edge_connections", label) + 0.0;
    let g0 = if args.no_metrics {
        None
    } else {
        match fetch(&client, &target).await {
            Ok(text) => Some(gauge(&text)),
            Err(e) => {
                println!("server /metrics not readable ({e:#}): not waiting for its gauge");
                None
            }
        }
    };

    // The silent stream: created first, so its memory is in the baseline.
    let stream_id = match args.kind {
        IdleKind::Ws => None,
        IdleKind::Sse | IdleKind::WsSubscribed => {
            Some(create_silent(&client, &target, &args).await?)
        }
    };
    let created = Instant::now();
    let silent_until = created + Duration::from_millis(u64::from(args.silent_ttft_ms));
    tokio::time::sleep(secs(args.settle_secs)).await;
    let before = proc_memory(&pid)?;
    let client_before = proc_memory("self")?;
    let cpu_before = cpu_reading(&[args.server_pid])?;

    // Open the connections; each is then held by a task until `close`.
    let close = CancellationToken::new();
    let stats = Arc::new(IdleStats::default());
    let opening = Instant::now();
    let mut holders = tokio::task::JoinSet::new();
    {
        let mut opens = futures::stream::iter(0..args.connections)
            .map(|_| open_idle(&host, args.kind, stream_id.as_deref()))
            .buffer_unordered(args.connect_concurrency);
        let open_deadline = opening + secs(args.open_timeout_secs);
        loop {
            let next = tokio::time::timeout_at(open_deadline, opens.next()).await;
            match next {
                Err(_) => {
                    bump(&stats.errors, "open_timeout");
                    break;
                }
                Ok(None) => break,
                Ok(Some(Ok(conn))) => {
                    stats.open.fetch_add(1, Ordering::Relaxed);
                    holders.spawn(hold(conn, stats.clone(), close.clone()));
                }
                Ok(Some(Err(e))) => {
                    let kind = e.to_string();
                    let kind = kind.split(':').next().unwrap_or("open").to_owned();
                    if stats.errors.lock().map(|m| m.is_empty()).unwrap_or(false) {
                        eprintln!("first connection error: {e:#}");
                    }
                    bump(&stats.errors, kind);
                }
            }
        }
    }
    let opened_in = opening.elapsed();
    let opened = stats.open.load(Ordering::Relaxed);
    // Wait (bounded) until the server counts them all.
    let mut counted = g0;
    if let Some(g0) = g0 {
        let want = g0 + args.connections as f64;
        let count_deadline = Instant::now() + secs(args.open_timeout_secs);
        loop {
            if let Ok(text) = fetch(&client, &target).await {
                counted = Some(gauge(&text));
            }
            if counted.is_some_and(|c| c >= want) || Instant::now() >= count_deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    tokio::time::sleep(secs(args.settle_secs)).await;
    let after = proc_memory(&pid)?;
    let client_after = proc_memory("self")?;
    let cpu_after = cpu_reading(&[args.server_pid])?;
    let measured_at = Instant::now();
    let gauge_at_reading = counted;
    // Still silent? (A short-poll answers at once with the events so far.)
    let silent = match &stream_id {
        None => None,
        Some(id) => Some(short_poll_status(&client, &target, id).await),
    };

    let n = args.connections as f64;
    let per = |a: u64, b: u64| (b as f64 - a as f64) / n;
    println!(
        "== idle: {} {} connections to {target} (server pid {pid}){}",
        args.connections,
        match args.kind {
            IdleKind::Sse => "SSE (GET /v1/streams/{id}/events, HTTP/1.1, one TCP connection each)",
            IdleKind::Ws => "WebSocket (/v1/ws, no subscription)",
            IdleKind::WsSubscribed => "WebSocket (/v1/ws, each subscribed to the silent stream)",
        },
        args.label
            .as_deref()
            .map(|l| format!(" [{l}]"))
            .unwrap_or_default(),
    );
    match (g0, counted) {
        (Some(g0), Some(c)) => println!(
            "opened {opened} in {:.2} s; server gauge tokenfan_edge_connections{{{label}}} {g0} \
             → {c} (wanted ≥ {})",
            opened_in.as_secs_f64(),
            g0 + n
        ),
        _ => println!(
            "opened {opened} in {:.2} s; server gauge not read",
            opened_in.as_secs_f64()
        ),
    }
    println!(
        "server VmRSS {} KiB → {} KiB: +{} KiB = {:.2} KiB ({:.0} bytes) per connection",
        before.rss_kib,
        after.rss_kib,
        after.rss_kib as i64 - before.rss_kib as i64,
        per(before.rss_kib, after.rss_kib),
        per(before.rss_kib, after.rss_kib) * 1024.0,
    );
    println!(
        "server RssAnon {} KiB → {} KiB: {:.2} KiB per connection; threads {} → {}",
        before.anon_kib,
        after.anon_kib,
        per(before.anon_kib, after.anon_kib),
        before.threads,
        after.threads
    );
    println!(
        "client VmRSS {} KiB → {} KiB ({:.2} KiB per connection, client side)",
        client_before.rss_kib,
        client_after.rss_kib,
        per(client_before.rss_kib, client_after.rss_kib)
    );
    let cpu = cpu_use(&cpu_before, &cpu_after, args.clk_tck);
    println!("{}", cpu.line("from before opening to the reading"));
    let within = measured_at < silent_until;
    if let Some(id) = &stream_id {
        println!(
            "silent stream {id}: ttft {} ms, measured {:.1} s after it was created ({}); \
             short-poll: {}",
            args.silent_ttft_ms,
            measured_at.duration_since(created).as_secs_f64(),
            if within {
                "inside the silent window"
            } else {
                "PAST the silent window"
            },
            match &silent {
                Some(Ok((status, events))) => format!("status {status}, {events} events"),
                Some(Err(e)) => format!("failed: {e:#}"),
                None => String::new(),
            }
        );
    }
    let errors = stats
        .errors
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    println!(
        "on the held connections: {} SSE bytes after the response head, {} token events \
         seen, {} WebSocket text messages, {} closed early",
        stats.extra_bytes.load(Ordering::Relaxed),
        stats.tokens_seen.load(Ordering::Relaxed),
        stats.ws_texts.load(Ordering::Relaxed),
        stats.closed_early.load(Ordering::Relaxed),
    );
    println!(
        "errors by kind: {}",
        if errors.is_empty() {
            "none".to_owned()
        } else {
            format!("{errors:?}")
        }
    );

    // Close them all and see what the server gives back.
    close.cancel();
    while holders.join_next().await.is_some() {}
    if let Some(g0) = g0 {
        let drain_deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(text) = fetch(&client, &target).await {
                counted = Some(gauge(&text));
            }
            if counted.is_some_and(|c| c <= g0) || Instant::now() >= drain_deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    tokio::time::sleep(secs(args.settle_secs)).await;
    let closed = proc_memory(&pid)?;
    println!(
        "after closing them: gauge {}, server VmRSS {} KiB ({:+} KiB against the baseline), \
         VmHWM {} KiB",
        counted.map_or_else(|| "not read".to_owned(), |c| c.to_string()),
        closed.rss_kib,
        closed.rss_kib as i64 - before.rss_kib as i64,
        closed.hwm_kib
    );
    let drained = match (g0, counted) {
        (Some(g0), Some(c)) => c <= g0,
        _ => true,
    };
    let ok = errors.is_empty()
        && opened == args.connections
        && drained
        && stats.tokens_seen.load(Ordering::Relaxed) == 0
        && stats.closed_early.load(Ordering::Relaxed) == 0
        && (stream_id.is_none() || within);
    println!(
        "RESULT: {}",
        if ok {
            "ok".to_owned()
        } else {
            "FAILED (see above)".to_owned()
        }
    );
    if let Some(path) = &args.json {
        let report = IdleReport {
            tool: "tokenfan-loadgen".to_owned(),
            label: args.label.clone(),
            scenario: "idle".to_owned(),
            kind: match args.kind {
                IdleKind::Sse => "sse",
                IdleKind::Ws => "ws",
                IdleKind::WsSubscribed => "ws-subscribed",
            }
            .to_owned(),
            target: target.clone(),
            started_at_unix_ms: started_at,
            connections: args.connections,
            opened,
            opened_in_secs: opened_in.as_secs_f64(),
            gauge_before: g0,
            gauge_at_reading,
            server_rss_before_kib: before.rss_kib,
            server_rss_after_kib: after.rss_kib,
            server_rss_per_connection_kib: per(before.rss_kib, after.rss_kib),
            server_anon_per_connection_kib: per(before.anon_kib, after.anon_kib),
            server_rss_after_close_kib: closed.rss_kib,
            client_rss_per_connection_kib: per(client_before.rss_kib, client_after.rss_kib),
            cpu,
            tokens_seen: stats.tokens_seen.load(Ordering::Relaxed),
            closed_early: stats.closed_early.load(Ordering::Relaxed),
            errors,
            inside_silent_window: stream_id.as_ref().map(|_| within),
            ok,
        };
        write_json(path, &report)?;
    }
    Ok(Outcome { ok, report: None })
}

/// Creates a stream that emits nothing for `--silent-ttft-ms`; returns its id.
async fn create_silent(
    client: &reqwest::Client,
    target: &str,
    args: &IdleArgs,
) -> anyhow::Result<String> {
    let body = json!({
        "prompt": "an idle stream",
        "seed": 1,
        "max_tokens": 8,
        "timing": {"ttft_ms": args.silent_ttft_ms, "inter_token_ms": 20, "jitter_ms": 0},
    });
    let resp = client
        .post(format!("{target}/v1/streams"))
        .json(&body)
        .send()
        .await
        .context("POST /v1/streams")?;
    let status = resp.status();
    let text = resp.text().await?;
    if status != reqwest::StatusCode::CREATED {
        bail!("POST /v1/streams: {status}: {text}");
    }
    let v: serde_json::Value = serde_json::from_str(&text)?;
    v["id"]
        .as_str()
        .map(str::to_owned)
        .context("201 without an id")
}

type WsStream = tokio_tungstenite::WebSocketStream<TcpStream>;

enum IdleConn {
    Sse(TcpStream),
    Ws(Box<WsStream>),
}

/// Opens one idle connection and returns once the server answered it.
async fn open_idle(
    host: &str,
    kind: IdleKind,
    stream_id: Option<&str>,
) -> anyhow::Result<IdleConn> {
    let work = async {
        let tcp = TcpStream::connect(host).await.context("connect")?;
        tcp.set_nodelay(true).context("connect")?;
        match kind {
            IdleKind::Sse => {
                let id = stream_id.context("sse: no stream")?;
                let mut tcp = tcp;
                let request = format!(
                    "GET /v1/streams/{id}/events HTTP/1.1\r\nHost: {host}\r\n\
                     Accept: text/event-stream\r\n\r\n"
                );
                tcp.write_all(request.as_bytes()).await.context("write")?;
                // Read the response head (and the first chunk with it, if it came along).
                let mut head = Vec::with_capacity(512);
                let mut buf = [0u8; 512];
                loop {
                    let n = tcp.read(&mut buf).await.context("read")?;
                    if n == 0 {
                        bail!("eof: closed before the response head");
                    }
                    head.extend_from_slice(&buf[..n]);
                    if find(&head, b"\r\n\r\n").is_some() {
                        break;
                    }
                    if head.len() > 16 * 1024 {
                        bail!("head: too long");
                    }
                }
                if !head.starts_with(b"HTTP/1.1 200") {
                    let line = String::from_utf8_lossy(&head);
                    let line = line.lines().next().unwrap_or("").to_owned();
                    bail!("status: {line}");
                }
                Ok(IdleConn::Sse(tcp))
            }
            IdleKind::Ws | IdleKind::WsSubscribed => {
                let url = format!("ws://{host}/v1/ws");
                // Small client buffers: 10 000 sockets on the client side too.
                let config = WebSocketConfig::default()
                    .read_buffer_size(4096)
                    .write_buffer_size(0);
                let (mut ws, _) =
                    tokio_tungstenite::client_async_with_config(url, tcp, Some(config))
                        .await
                        .context("handshake")?;
                if kind == IdleKind::WsSubscribed {
                    let id = stream_id.context("ws-subscribed: no stream")?;
                    let sub = json!({"type": "subscribe", "stream_id": id, "after": 0});
                    ws.send(Message::text(sub.to_string()))
                        .await
                        .context("send")?;
                    // The socket handles messages in order: the pong means the subscribe was
                    // taken (a refusal would come first, as an error).
                    ws.send(Message::text(r#"{"type":"ping","id":1}"#))
                        .await
                        .context("send")?;
                    loop {
                        match ws.next().await {
                            Some(Ok(Message::Text(t))) if t.contains("\"pong\"") => break,
                            Some(Ok(Message::Text(t))) => bail!("subscribe: {t}"),
                            Some(Ok(_)) => {}
                            Some(Err(e)) => bail!("read: {e}"),
                            None => bail!("eof: closed before the pong"),
                        }
                    }
                }
                Ok(IdleConn::Ws(Box::new(ws)))
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), work)
        .await
        .context("timeout")?
}

/// Holds one connection until `close`, counting anything it receives.
async fn hold(conn: IdleConn, stats: Arc<IdleStats>, close: CancellationToken) {
    match conn {
        IdleConn::Sse(mut tcp) => {
            let mut buf = [0u8; 1024];
            loop {
                tokio::select! {
                    r = tcp.read(&mut buf) => match r {
                        Ok(0) | Err(_) => {
                            stats.closed_early.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        Ok(n) => {
                            stats.extra_bytes.fetch_add(n as u64, Ordering::Relaxed);
                            if find(&buf[..n], b"event: token").is_some() {
                                stats.tokens_seen.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    },
                    () = close.cancelled() => return,
                }
            }
        }
        IdleConn::Ws(mut ws) => loop {
            tokio::select! {
                m = ws.next() => match m {
                    Some(Ok(Message::Text(t))) => {
                        stats.ws_texts.fetch_add(1, Ordering::Relaxed);
                        if t.contains("\"token\"") {
                            stats.tokens_seen.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => {
                        stats.closed_early.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                },
                () = close.cancelled() => {
                    let _ = WsStream::close(&mut ws, None).await;
                    return;
                }
            }
        },
    }
}
