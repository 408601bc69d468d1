//! What only the edge's integration tests need: a local cluster of hermetic nats-server and
//! redis-server, mock generators in their own runtimes (so one can be killed abruptly), and
//! edge replicas as real processes of this package's binary (so one can be killed with
//! SIGKILL). Everything else the tests share is in `tokenfan-testkit`.

#![allow(dead_code)]

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use tokenfan_testkit::{
    edge::{create, finished, short_poll, stream_id},
    servers::{NatsServer, RedisServer, signal},
    wait::wait_until,
};
use tokio_util::sync::CancellationToken;

/// A mock generator on its own runtime and thread; `kill` drops the runtime, closing every
/// connection at once like a crashed process; `pause` blocks its only worker thread, so it
/// stalls like a stopped process (connections open, nothing sent).
pub struct Generator {
    pub addr: SocketAddr,
    pub stats: Arc<tokenfan_generator::Stats>,
    runtime: Option<tokio::runtime::Runtime>,
    paused: Arc<std::sync::atomic::AtomicBool>,
}

impl Generator {
    pub fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("non-blocking");
        let addr = listener.local_addr().expect("addr");
        let stats = Arc::new(tokenfan_generator::Stats::default());
        let config = <tokenfan_generator::GeneratorConfig as clap::Parser>::parse_from([
            "tokenfan-generator",
        ]);
        let task_stats = stats.clone();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let _ = tokenfan_generator::serve_grpc(
                &config,
                listener,
                task_stats,
                CancellationToken::new(),
            )
            .await;
        });
        Self {
            addr,
            stats,
            runtime: Some(runtime),
            paused: Arc::default(),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stalls it (like `SIGSTOP`) until [`Generator::resume`].
    pub fn pause(&self) {
        use std::sync::atomic::Ordering;
        self.paused.store(true, Ordering::SeqCst);
        let paused = self.paused.clone();
        if let Some(rt) = &self.runtime {
            // Blocks the runtime's only worker: no task, timer or socket of it runs.
            rt.spawn(async move {
                while paused.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
        }
    }

    /// Ends a [`Generator::pause`].
    pub fn resume(&self) {
        self.paused
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Crashes it: every call and connection ends at once.
    pub fn kill(&mut self) {
        self.resume();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An edge replica process.
pub struct Edge {
    pub addr: SocketAddr,
    /// The admin listener (`/metrics`, `/readyz`).
    pub admin_addr: SocketAddr,
    pub replica: String,
    child: Child,
}

impl Edge {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A URL on the admin listener.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr)
    }

    /// `POST /v1/streams` (201) on this replica; the new stream's id.
    pub async fn create(&self, http: &reqwest::Client, body: serde_json::Value) -> String {
        stream_id(&create(http, &self.url(""), &[], body).await)
    }

    /// Waits until its `/readyz` answers 200.
    pub async fn wait_ready(&self, http: &reqwest::Client) {
        let url = self.admin_url("/readyz");
        wait_until(Duration::from_secs(20), || async {
            let r = http.get(&url).send().await.ok()?;
            (r.status() == 200).then_some(())
        })
        .await;
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `kill -STOP`: the process keeps its sockets and leases but does nothing.
    pub fn pause(&self) {
        signal(self.child.id(), "STOP");
    }

    /// `kill -CONT`.
    pub fn resume(&self) {
        signal(self.child.id(), "CONT");
    }

    /// `kill -TERM` (a graceful shutdown) and waits for the process to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        signal(self.child.id(), "TERM");
        self.child.wait().expect("wait")
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Extra command-line arguments and environment for every edge process.
#[derive(Debug, Clone, Default)]
pub struct EdgeOptions {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Run Redis with an append-only file, as production does.
    pub persistent_redis: bool,
}

/// NATS, Redis, generators and edge replicas.
pub struct TestCluster {
    pub nats: NatsServer,
    pub redis: RedisServer,
    pub generators: Vec<Generator>,
    pub edges: Vec<Edge>,
    pub http: reqwest::Client,
    options: EdgeOptions,
}

impl TestCluster {
    /// `edges` replicas over `generators` generators.
    pub async fn start(edges: usize, generators: usize) -> Self {
        Self::start_with(edges, generators, &EdgeOptions::default()).await
    }

    /// [`TestCluster::start`] with `options` added to every edge.
    pub async fn start_with(edges: usize, generators: usize, options: &EdgeOptions) -> Self {
        let nats = NatsServer::start();
        let redis = if options.persistent_redis {
            RedisServer::start_persistent()
        } else {
            RedisServer::start()
        };
        let generators: Vec<Generator> = (0..generators).map(|_| Generator::start()).collect();
        let urls: Vec<String> = generators.iter().map(Generator::url).collect();
        let edges = (0..edges)
            .map(|i| {
                spawn_edge(
                    &format!("edge-{i}"),
                    &nats.url(),
                    &redis.url(),
                    &urls.join(","),
                    options,
                )
            })
            .collect();
        let cluster = Self {
            nats,
            redis,
            generators,
            edges,
            http: reqwest::Client::new(),
            options: options.clone(),
        };
        for i in 0..cluster.edges.len() {
            cluster.wait_ready(i).await;
        }
        cluster
    }

    async fn wait_ready(&self, i: usize) {
        self.edge(i).wait_ready(&self.http).await;
    }

    /// `kill -9` of edge `i`, then a new process with the same replica id (on a new port).
    pub async fn restart_edge(&mut self, i: usize) {
        self.edges[i].kill();
        let urls: Vec<String> = self.generators.iter().map(Generator::url).collect();
        let replica = self.edges[i].replica.clone();
        self.edges[i] = spawn_edge(
            &replica,
            &self.nats.url(),
            &self.redis.url(),
            &urls.join(","),
            &self.options,
        );
        self.wait_ready(i).await;
    }

    pub fn edge(&self, i: usize) -> &Edge {
        &self.edges[i]
    }

    /// Generations running on all generators.
    pub fn generator_active(&self) -> usize {
        self.generators.iter().map(|g| g.stats.active()).sum()
    }
}

/// The edge binary on port-0 listeners, logging JSON to a piped stderr (read it with
/// [`listening`]).
pub fn edge_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tokenfan-edge"));
    command
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .stderr(Stdio::piped());
    command
}

/// Reads an edge process's JSON log (its stderr, piped) until it says it listens; its address
/// and its admin listener's. The rest of the log is drained on a thread of its own (printed when
/// `TOKENFAN_TEST_VERBOSE` is set).
pub fn listening(child: &mut Child, name: &str) -> (SocketAddr, SocketAddr) {
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let addrs = loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("{name} exited before listening"))
            .expect("read");
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if v["fields"]["message"] == "tokenfan-edge listening" {
            let field = |name: &str| -> SocketAddr {
                v["fields"][name]
                    .as_str()
                    .expect("address field")
                    .parse()
                    .expect("socket address")
            };
            break (field("addr"), field("admin_addr"));
        }
    };
    let name = name.to_owned();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if std::env::var_os("TOKENFAN_TEST_VERBOSE").is_some() {
                eprintln!("[{name}] {line}");
            }
        }
    });
    addrs
}

/// Starts edge replica `replica` of a cluster on these backends and generators.
pub fn spawn_edge(
    replica: &str,
    nats: &str,
    redis: &str,
    generators: &str,
    options: &EdgeOptions,
) -> Edge {
    let mut child = edge_command()
        .args([
            "--log-filter",
            "warn,tokenfan_edge=info",
            "--replica-id",
            replica,
            "--nats-url",
            nats,
            "--redis-url",
            redis,
            "--generator",
            generators,
        ])
        // Defaults for these tests, as environment so that `options.args` may override them.
        .env("TOKENFAN_EDGE_LEASE_TTL_MS", "1000")
        .env("TOKENFAN_EDGE_GENERATOR_IDLE_TIMEOUT_SECS", "3")
        .args(&options.args)
        .envs(options.env.iter().map(|(k, v)| (k, v)))
        .spawn()
        .expect("spawn edge");
    let (addr, admin_addr) = listening(&mut child, replica);
    Edge {
        addr,
        admin_addr,
        replica: replica.to_string(),
        child,
    }
}

impl TestCluster {
    /// `POST /v1/streams` (201) on edge `edge`; the new stream's id.
    pub async fn create(&self, edge: usize, body: serde_json::Value) -> String {
        self.edge(edge).create(&self.http, body).await
    }

    /// Short-poll of `id` on edge `edge` from `after`.
    pub async fn short_poll(&self, edge: usize, id: &str, after: u64) -> serde_json::Value {
        short_poll(&self.http, &self.edge(edge).url(""), id, after).await
    }

    /// Every event of a stream, short-polled on edge `edge` until it ended there.
    pub async fn finished(&self, edge: usize, id: &str) -> Vec<serde_json::Value> {
        finished(
            &self.http,
            &self.edge(edge).url(""),
            id,
            Duration::from_secs(30),
        )
        .await
    }
}
