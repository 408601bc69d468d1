//! `min-reader`: the smallest fan-out reader, the yardstick `tokenfan-loadgen watch` is checked
//! against (docs/benchmarks.md, "Is the load generator accurate?").
//!
//! ```text
//! min-reader --target http://127.0.0.1:8080 --viewers 2000 [--max-tokens 500] [--ttft-ms 5000]
//!            [--inter-token-ms 20] [--seed 1] [--timeout-secs 120]
//! ```
//!
//! Creates one stream (`POST /v1/streams`, 201, `"emit_times": true`), opens `--viewers` raw
//! TCP connections with `GET /v1/streams/{id}/events`, and for every token takes the wall
//! clock right after the `read` that returned it minus the token's `emitted_at_unix_nanos`
//! (the added delay, as the load generator defines it). Nothing else happens on the hot path:
//! no HTTP library, no JSON parser (a byte scan for the emit time and for `"type":"done"`), no
//! verification beyond counting; samples go into a per-viewer `Vec`. One current-thread tokio
//! runtime: pin it to a core with `taskset`. Tokens emitted before a viewer's request was sent
//! (history replay) give no sample, as in the load generator. Prints the count and
//! p50/p90/p99/p99.9/max/mean in ms, and the viewers that ended without their `done` event.

use std::{
    process::ExitCode,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
    time::Instant,
};

struct Args {
    host: String,
    viewers: usize,
    max_tokens: u64,
    ttft_ms: u64,
    inter_token_ms: u64,
    seed: u64,
    timeout: Duration,
}

const USAGE: &str = "usage: min-reader --target http://HOST:PORT --viewers N [--max-tokens 500] \
                     [--ttft-ms 5000] [--inter-token-ms 20] [--seed 1] [--timeout-secs 120]";

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        host: String::new(),
        viewers: 0,
        max_tokens: 500,
        ttft_ms: 5000,
        inter_token_ms: 20,
        seed: 1,
        timeout: Duration::from_secs(120),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("{flag}: not a number: {v}"))
        };
        match flag.as_str() {
            "--target" => {
                a.host = value
                    .strip_prefix("http://")
                    .ok_or("--target: http://HOST:PORT only")?
                    .trim_end_matches('/')
                    .to_owned()
            }
            "--viewers" => a.viewers = usize::try_from(num(&value)?).map_err(|e| e.to_string())?,
            "--max-tokens" => a.max_tokens = num(&value)?,
            "--ttft-ms" => a.ttft_ms = num(&value)?,
            "--inter-token-ms" => a.inter_token_ms = num(&value)?,
            "--seed" => a.seed = num(&value)?,
            "--timeout-secs" => a.timeout = Duration::from_secs(num(&value)?),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if a.host.is_empty() || a.viewers == 0 {
        return Err("--target and --viewers are required".to_owned());
    }
    Ok(a)
}

fn unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The digits after `"emitted_at_unix_nanos":` in one line.
fn emitted_at(line: &[u8]) -> Option<i64> {
    const KEY: &[u8] = b"\"emitted_at_unix_nanos\":";
    let at = find(line, KEY)? + KEY.len();
    let digits = line[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&line[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// Creates the stream; returns its id.
async fn create(a: &Args) -> Result<String, String> {
    let body = format!(
        r#"{{"prompt":"min-reader","seed":{},"max_tokens":{},"timing":{{"ttft_ms":{},"inter_token_ms":{},"jitter_ms":0}},"emit_times":true}}"#,
        a.seed, a.max_tokens, a.ttft_ms, a.inter_token_ms
    );
    let mut s = TcpStream::connect(&a.host)
        .await
        .map_err(|e| format!("connect {}: {e}", a.host))?;
    let req = format!(
        "POST /v1/streams HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        a.host,
        body.len()
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .map_err(|_| "no answer to POST /v1/streams in 10 s".to_owned())?
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&got);
    if !text.starts_with("HTTP/1.1 201") {
        return Err(format!(
            "POST /v1/streams: {}",
            text.lines().next().unwrap_or("")
        ));
    }
    const KEY: &str = "\"id\":\"";
    let at = text.find(KEY).ok_or("no \"id\" in the 201 body")? + KEY.len();
    let end = text[at..].find('"').ok_or("unterminated id")?;
    Ok(text[at..at + end].to_owned())
}

/// What one viewer got.
#[derive(Default)]
struct Viewer {
    /// Added delay of each live token, µs.
    samples: Vec<u32>,
    tokens: u64,
    done: bool,
    error: Option<String>,
}

/// One viewer; `connecting` is its place among the connections being opened, given up once
/// its request is sent.
async fn view(
    host: String,
    id: String,
    deadline: Instant,
    connecting: OwnedSemaphorePermit,
) -> Viewer {
    let mut v = Viewer::default();
    let read = async {
        let mut s = TcpStream::connect(&host).await?;
        let req = format!(
            "GET /v1/streams/{id}/events HTTP/1.1\r\nhost: {host}\r\naccept: text/event-stream\r\n\r\n"
        );
        let subscribed = unix_nanos();
        s.write_all(req.as_bytes()).await?;
        drop(connecting);
        let mut buf: Vec<u8> = Vec::with_capacity(4096);
        let mut status_seen = false;
        loop {
            if s.read_buf(&mut buf).await? == 0 {
                return Ok::<_, std::io::Error>(());
            }
            let recv = unix_nanos();
            let Some(last_nl) = buf.iter().rposition(|&b| b == b'\n') else {
                continue;
            };
            for line in buf[..last_nl].split(|&b| b == b'\n') {
                if !status_seen {
                    status_seen = true;
                    if !line.starts_with(b"HTTP/1.1 200") {
                        let l = String::from_utf8_lossy(line).trim().to_owned();
                        return Err(std::io::Error::other(l));
                    }
                    continue;
                }
                if !line.starts_with(b"data:") {
                    continue;
                }
                if let Some(emitted) = emitted_at(line) {
                    v.tokens += 1;
                    if emitted >= subscribed {
                        let us = (recv - emitted).max(0) / 1000;
                        v.samples.push(u32::try_from(us).unwrap_or(u32::MAX));
                    }
                } else if find(line, b"\"type\":\"done\"").is_some() {
                    v.done = true;
                    return Ok(());
                }
            }
            buf.drain(..=last_nl);
        }
    };
    match tokio::time::timeout_at(deadline, read).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => v.error = Some(e.to_string()),
        Err(_) => v.error = Some("timeout".to_owned()),
    }
    v
}

fn main() -> ExitCode {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("min-reader: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("min-reader: {e}");
            return ExitCode::from(2);
        }
    };
    rt.block_on(async move {
        let id = match create(&a).await {
            Ok(id) => id,
            Err(e) => {
                eprintln!("min-reader: {e}");
                return ExitCode::from(2);
            }
        };
        let created = Instant::now();
        let deadline = created + a.timeout;
        // Connections open 200 at a time, as the load generator's idle scenario does.
        let connecting = Arc::new(Semaphore::new(200));
        let mut set = JoinSet::new();
        for _ in 0..a.viewers {
            let (host, id, connecting) = (a.host.clone(), id.clone(), connecting.clone());
            let Ok(permit) = connecting.acquire_owned().await else {
                break;
            };
            set.spawn(view(host, id, deadline, permit));
        }
        let (mut samples, mut tokens, mut done, mut errors) = (Vec::new(), 0u64, 0usize, Vec::new());
        while let Some(r) = set.join_next().await {
            match r {
                Ok(v) => {
                    samples.extend_from_slice(&v.samples);
                    tokens += v.tokens;
                    done += usize::from(v.done);
                    if let Some(e) = v.error {
                        errors.push(e);
                    }
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        samples.sort_unstable();
        let ms = |q: f64| {
            let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len().max(1)) - 1;
            samples.get(i).map_or(f64::NAN, |&us| f64::from(us) / 1000.0)
        };
        let mean = samples.iter().map(|&s| f64::from(s)).sum::<f64>() / samples.len().max(1) as f64 / 1000.0;
        println!(
            "stream {id}: {} viewers, {done} got their done event, {tokens} tokens ({} live samples)",
            a.viewers,
            samples.len()
        );
        println!(
            "added delay: p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms, mean {mean:.3} ms",
            ms(0.50),
            ms(0.90),
            ms(0.99),
            ms(0.999),
            ms(1.0)
        );
        if errors.is_empty() && done == a.viewers {
            ExitCode::SUCCESS
        } else {
            errors.sort();
            errors.dedup();
            eprintln!(
                "min-reader: {} viewers without their done event; errors: {}",
                a.viewers - done,
                errors.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
            );
            ExitCode::from(1)
        }
    })
}
