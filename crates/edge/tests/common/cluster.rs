//! A local cluster for tests: hermetic nats-server and redis-server, mock generators in
//! their own runtimes (so one can be killed abruptly), and edge replicas as real processes
//! (so one can be killed with SIGKILL).

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use tokenfan_edge::testkit::{NatsServer, RedisServer};
use tokio_util::sync::CancellationToken;

/// A mock generator on its own runtime and thread; `kill` drops the runtime, closing every
/// connection at once like a crashed process.
pub struct Generator {
    pub addr: SocketAddr,
    pub stats: Arc<tokenfan_generator::Stats>,
    runtime: Option<tokio::runtime::Runtime>,
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
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Crashes it: every call and connection ends at once.
    pub fn kill(&mut self) {
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
    pub replica: String,
    child: Child,
}

impl Edge {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
}

/// NATS, Redis, generators and edge replicas.
pub struct TestCluster {
    pub nats: NatsServer,
    pub redis: RedisServer,
    pub generators: Vec<Generator>,
    pub edges: Vec<Edge>,
    pub http: reqwest::Client,
}

impl TestCluster {
    /// `edges` replicas over `generators` generators.
    pub async fn start(edges: usize, generators: usize) -> Self {
        Self::start_with(edges, generators, &EdgeOptions::default()).await
    }

    /// [`TestCluster::start`] with `options` added to every edge.
    pub async fn start_with(edges: usize, generators: usize, options: &EdgeOptions) -> Self {
        let nats = NatsServer::start();
        let redis = RedisServer::start();
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
        };
        for edge in &cluster.edges {
            let url = edge.url("/readyz");
            super::wait_until(Duration::from_secs(20), || async {
                let r = cluster.http.get(&url).send().await.ok()?;
                (r.status() == 200).then_some(())
            })
            .await;
        }
        cluster
    }

    pub fn edge(&self, i: usize) -> &Edge {
        &self.edges[i]
    }

    /// Generations running on all generators.
    pub fn generator_active(&self) -> usize {
        self.generators.iter().map(|g| g.stats.active()).sum()
    }
}

pub fn spawn_edge(
    replica: &str,
    nats: &str,
    redis: &str,
    generators: &str,
    options: &EdgeOptions,
) -> Edge {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokenfan-edge"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
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
            "--generator-idle-timeout-secs",
            "3",
        ])
        // A short lease, so takeovers are quick, unless the test sets its own.
        .args(
            (!options.args.iter().any(|a| a == "--lease-ttl-ms"))
                .then_some(["--lease-ttl-ms", "1000"])
                .into_iter()
                .flatten(),
        )
        .args(&options.args)
        .envs(options.env.iter().map(|(k, v)| (k, v)))
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn edge");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let addr = loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("{replica} exited before listening"))
            .expect("read");
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if v["fields"]["message"] == "tokenfan-edge listening" {
            break v["fields"]["addr"]
                .as_str()
                .expect("addr")
                .parse()
                .expect("socket address");
        }
    };
    let name = replica.to_string();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if std::env::var_os("TOKENFAN_TEST_VERBOSE").is_some() {
                eprintln!("[{name}] {line}");
            }
        }
    });
    Edge {
        addr,
        replica: replica.to_string(),
        child,
    }
}
