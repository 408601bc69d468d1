//! Hermetic backend servers for tests: a `nats-server` and a `redis-server` on free loopback
//! ports, each in its own temporary directory, killed when dropped; and the production
//! shapes of both: a NATS cluster (with a configuration block for TLS and authentication), a
//! Redis with TLS, and a Redis Cluster with a replica per master. `make test` installs the
//! binaries (Debian `nats-server`, `redis-server`, `redis-tools`) when they are missing.
//!
//! TLS servers take their certificates from [`crate::tls::TlsFiles`].

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub use crate::temp::temp_dir;
use crate::tls::TlsFiles;

/// A child process killed (and its directory removed) on drop.
#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    dir: PathBuf,
    /// Where it listens.
    pub addr: SocketAddr,
    /// How it was started, for [`ServerProcess::restart`].
    command: (String, Vec<String>),
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl ServerProcess {
    /// Kills the server now (`kill -9`), keeping its port and directory for a restart.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Starts it again, with the same arguments, port and directory (after [`Self::kill`]).
    pub fn restart(&mut self) {
        self.kill();
        let (binary, args) = self.command.clone();
        let mut child = start_child(&binary, &args, &self.dir);
        wait_for_port(self.addr, &mut child, &binary);
        self.child = child;
    }

    /// Pauses the process (`SIGSTOP`): its sockets stay open and nothing answers.
    pub fn pause(&self) {
        signal(self.child.id(), "STOP");
    }

    /// Resumes a paused process (`SIGCONT`).
    pub fn resume(&self) {
        signal(self.child.id(), "CONT");
    }
}

/// Sends `SIGNAME` to `pid` with kill(1).
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status();
    assert!(
        status.is_ok_and(|s| s.success()),
        "kill -{name} {pid} failed"
    );
}

/// A port nothing listens on right now (bound and released at once).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

fn find(binary: &str) -> String {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/bin"] {
        let path = format!("{dir}/{binary}");
        if std::path::Path::new(&path).exists() {
            return path;
        }
    }
    binary.to_string()
}

fn wait_for_port(addr: SocketAddr, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited early with {status}; is it installed?");
        }
        assert!(Instant::now() < deadline, "{what} did not listen on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spawn(
    what: &str,
    binary: &str,
    args: &[String],
    dir: PathBuf,
    addr: SocketAddr,
) -> ServerProcess {
    let mut child = start_child(binary, args, &dir);
    wait_for_port(addr, &mut child, what);
    ServerProcess {
        child,
        dir,
        addr,
        command: (binary.to_owned(), args.to_vec()),
    }
}

/// Runs `start` up to three times: a cluster takes many ports (and Redis Cluster also the
/// port + 10,000 of each node), picked free but unreserved, so another process on the machine
/// may take one before the server binds it; the server then exits and `start` panics, its
/// started nodes are killed as the panic unwinds, and the next attempt picks new ports.
fn with_fresh_ports<T>(what: &str, start: impl Fn() -> T) -> T {
    for attempt in 1.. {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(&start)) {
            Ok(started) => return started,
            Err(panic) if attempt >= 3 => std::panic::resume_unwind(panic),
            Err(_) => {
                eprintln!("{what}: start failed (attempt {attempt}); retrying on other ports")
            }
        }
    }
    unreachable!("the loop returns or panics")
}

fn start_child(binary: &str, args: &[String], dir: &std::path::Path) -> Child {
    Command::new(find(binary))
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {binary} ({e}); run `make deps`"))
}

/// A NATS server (with JetStream off: the bus is at-most-once by design).
#[derive(Debug)]
pub struct NatsServer {
    /// The process.
    pub process: ServerProcess,
}

impl NatsServer {
    /// Starts one on a free port.
    pub fn start() -> Self {
        let port = free_port();
        Self::start_on(port)
    }

    fn start_on(port: u16) -> Self {
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let args = vec![
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
        ];
        Self {
            process: spawn("nats-server", "nats-server", &args, temp_dir("nats"), addr),
        }
    }

    /// Starts one on a free port with `extra` added to its configuration file (an
    /// `authorization { … }` block, say).
    pub fn start_with_config(extra: &str) -> Self {
        let port = free_port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let dir = temp_dir("nats");
        let file = dir.join("nats.conf");
        std::fs::write(&file, format!("listen: 127.0.0.1:{port}\n{extra}\n"))
            .expect("write nats.conf");
        let args = vec!["-c".to_owned(), file.display().to_string()];
        Self {
            process: spawn("nats-server", "nats-server", &args, dir, addr),
        }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://{}", self.process.addr)
    }

    /// Kills it and starts a new one on the same port.
    pub fn restart(&mut self) {
        let port = self.process.addr.port();
        self.process.kill();
        *self = Self::start_on(port);
    }
}

/// A Redis server: by default it keeps nothing on disk; [`RedisServer::start_persistent`] runs
/// it as production does, with an append-only file (`appendfsync everysec`).
#[derive(Debug)]
pub struct RedisServer {
    /// The process.
    pub process: ServerProcess,
    persistent: bool,
}

impl RedisServer {
    /// Starts one on a free port.
    pub fn start() -> Self {
        Self::start_on(free_port(), false, temp_dir("redis"))
    }

    /// Starts one on a free port with an append-only file.
    pub fn start_persistent() -> Self {
        Self::start_on(free_port(), true, temp_dir("redis"))
    }

    fn start_on(port: u16, persistent: bool, dir: PathBuf) -> Self {
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let appendonly = if persistent { "yes" } else { "no" };
        let args = vec![
            "--bind".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
            "--save".into(),
            String::new(),
            "--appendonly".into(),
            appendonly.into(),
            "--appendfsync".into(),
            "everysec".into(),
            "--dir".into(),
            dir.display().to_string(),
        ];
        Self {
            process: spawn("redis-server", "redis-server", &args, dir, addr),
            persistent,
        }
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.process.addr)
    }

    /// Kills it (`kill -9`) and starts it again on the same port: empty, or, when persistent,
    /// with what its append-only file holds.
    pub fn restart(&mut self) {
        let port = self.process.addr.port();
        self.process.kill();
        // Taken, so dropping the old process does not remove the directory.
        let kept = std::mem::take(&mut self.process.dir);
        let dir = if self.persistent {
            kept
        } else {
            let _ = std::fs::remove_dir_all(&kept);
            temp_dir("redis")
        };
        *self = Self::start_on(port, self.persistent, dir);
    }

    /// A copy of the data directory as it is now (what a backup or a volume snapshot holds).
    pub fn snapshot(&self) -> PathBuf {
        let copy = temp_dir("redis-snapshot");
        copy_dir(&self.process.dir, &copy);
        copy
    }

    /// Kills it (`kill -9`) and starts it on the same port from `snapshot`: a Redis that
    /// comes back with older state.
    pub fn restart_from(&mut self, snapshot: &std::path::Path) {
        let port = self.process.addr.port();
        self.process.kill();
        let dir = std::mem::take(&mut self.process.dir);
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::create_dir_all(&dir);
        copy_dir(snapshot, &dir);
        *self = Self::start_on(port, self.persistent, dir);
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    let _ = std::fs::create_dir_all(to);
    for entry in std::fs::read_dir(from).into_iter().flatten().flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            copy_dir(&entry.path(), &target);
        } else {
            let _ = std::fs::copy(entry.path(), target);
        }
    }
}

/// Runs `redis-cli` with `args` and returns its output (panics when it cannot run).
pub fn redis_cli(args: &[&str]) -> String {
    let out = Command::new(find("redis-cli"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run redis-cli ({e}); run `make deps`"));
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Polls `check` every 50 ms until it holds; panics with `what` after `timeout`.
fn wait_blocking(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A plain HTTP/1.0 GET on loopback (the NATS monitoring port), body only.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    text.split_once("\r\n\r\n").map(|(_, body)| body.to_owned())
}

impl RedisServer {
    /// Starts one that speaks TLS only (`--port 0 --tls-port …`) with `tls`'s certificate;
    /// `verify_clients` requires a client certificate signed by the CA. `extra` are more
    /// `redis-server` arguments (e.g. `--user` ACL rules).
    pub fn start_tls(tls: &TlsFiles, verify_clients: bool, extra: &[&str]) -> Self {
        let port = free_port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let dir = temp_dir("redis-tls");
        let mut args: Vec<String> = [
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            &tls.cert.display().to_string(),
            "--tls-key-file",
            &tls.key.display().to_string(),
            "--tls-ca-cert-file",
            &tls.ca.display().to_string(),
            "--tls-auth-clients",
            if verify_clients { "yes" } else { "no" },
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &dir.display().to_string(),
        ]
        .map(str::to_owned)
        .to_vec();
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        Self {
            process: spawn("redis-server", "redis-server", &args, dir, addr),
            persistent: false,
        }
    }

    /// `rediss://127.0.0.1:<port>` (for [`RedisServer::start_tls`]).
    pub fn tls_url(&self) -> String {
        format!("rediss://{}", self.process.addr)
    }
}

/// A Redis Cluster on loopback: `masters` masters with `replicas` replicas each, created by
/// `redis-cli --cluster create`, with a 1 s node timeout so failovers take a few seconds.
#[derive(Debug)]
pub struct RedisCluster {
    /// Every node, masters first (as `redis-cli --cluster create` assigns them at creation;
    /// roles change on failover: ask [`RedisCluster::master_of`]).
    pub nodes: Vec<ServerProcess>,
    /// `redis-cli` arguments for TLS (empty without TLS).
    cli_tls: Vec<String>,
}

impl RedisCluster {
    /// Starts the nodes, creates the cluster and waits until every slot is served.
    pub fn start(masters: usize, replicas: usize) -> Self {
        Self::start_with(masters, replicas, None)
    }

    /// [`RedisCluster::start`] with TLS only, between nodes too (`--tls-cluster`,
    /// `--tls-replication`), with `tls`'s certificate; clients are not asked for one.
    pub fn start_tls(masters: usize, replicas: usize, tls: &TlsFiles) -> Self {
        Self::start_with(masters, replicas, Some(tls))
    }

    fn start_with(masters: usize, replicas: usize, tls: Option<&TlsFiles>) -> Self {
        with_fresh_ports("Redis Cluster", || Self::try_start(masters, replicas, tls))
    }

    fn try_start(masters: usize, replicas: usize, tls: Option<&TlsFiles>) -> Self {
        let count = masters * (1 + replicas);
        let path = |p: &PathBuf| p.display().to_string();
        let cli_tls: Vec<String> = tls
            .map(|t| {
                vec![
                    "--tls".to_owned(),
                    "--cacert".to_owned(),
                    path(&t.ca),
                    "--cert".to_owned(),
                    path(&t.cert),
                    "--key".to_owned(),
                    path(&t.key),
                ]
            })
            .unwrap_or_default();
        let nodes: Vec<ServerProcess> = (0..count)
            .map(|_| {
                let port = free_port();
                let addr: SocketAddr = ([127, 0, 0, 1], port).into();
                let dir = temp_dir("redis-cluster");
                let listen: Vec<String> = match tls {
                    None => vec!["--port".into(), port.to_string()],
                    Some(t) => [
                        "--port",
                        "0",
                        "--tls-port",
                        &port.to_string(),
                        "--tls-cluster",
                        "yes",
                        "--tls-replication",
                        "yes",
                        "--tls-cert-file",
                        &path(&t.cert),
                        "--tls-key-file",
                        &path(&t.key),
                        "--tls-ca-cert-file",
                        &path(&t.ca),
                        "--tls-auth-clients",
                        "no",
                    ]
                    .map(str::to_owned)
                    .to_vec(),
                };
                let mut args = listen;
                args.extend(
                    [
                        "--bind",
                        "127.0.0.1",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "1000",
                        // A replica may take over however long ago it last heard from its master
                        // (a master killed right after the cluster formed would otherwise leave
                        // its replica "too stale" to fail over).
                        "--cluster-replica-validity-factor",
                        "0",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        &dir.display().to_string(),
                    ]
                    .map(str::to_owned),
                );
                spawn("redis-server", "redis-server", &args, dir, addr)
            })
            .collect();
        let mut create: Vec<String> = cli_tls.clone();
        create.extend(["--cluster".into(), "create".into()]);
        create.extend(nodes.iter().map(|n| n.addr.to_string()));
        create.extend([
            "--cluster-replicas".into(),
            replicas.to_string(),
            "--cluster-yes".into(),
        ]);
        let out = redis_cli(&create.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(
            out.contains("[OK] All 16384 slots covered"),
            "cluster create: {out}"
        );
        let cluster = Self { nodes, cli_tls };
        cluster.wait_healthy();
        wait_blocking("every replica synced", Duration::from_secs(30), || {
            (0..cluster.nodes.len()).all(|i| {
                let info = cluster.info(i, &["info", "replication"]);
                info.contains("role:master") || info.contains("master_link_status:up")
            })
        });
        cluster
    }

    /// `redis+cluster://` (`rediss+cluster://` with TLS) with every node as a seed.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self.nodes.iter().map(|n| n.addr.to_string()).collect();
        let scheme = if self.cli_tls.is_empty() {
            "redis"
        } else {
            "rediss"
        };
        format!("{scheme}+cluster://{}", seeds.join(","))
    }

    fn info(&self, node: usize, what: &[&str]) -> String {
        let port = self.nodes[node].addr.port().to_string();
        let mut args: Vec<&str> = self.cli_tls.iter().map(String::as_str).collect();
        args.extend(["-h", "127.0.0.1", "-p", &port]);
        args.extend(what);
        redis_cli(&args)
    }

    /// Waits until every live node reports `cluster_state:ok` and agrees on the slot map
    /// (each slot has a live master).
    pub fn wait_healthy(&self) {
        let live: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| TcpStream::connect(self.nodes[i].addr).is_ok())
            .collect();
        wait_blocking(
            "the Redis Cluster is healthy",
            Duration::from_secs(30),
            || {
                live.iter().all(|&i| {
                    let info = self.info(i, &["cluster", "info"]);
                    info.contains("cluster_state:ok") && info.contains("cluster_slots_fail:0")
                })
            },
        );
    }

    /// The index of the node that is master for `key`'s slot right now, as a live node
    /// sees it.
    pub fn master_of(&self, key: &str) -> usize {
        self.try_master_of(key)
            .unwrap_or_else(|| panic!("no live master serves the slot of {key}"))
    }

    /// [`RedisCluster::master_of`], or none while the slot has no live master.
    pub fn try_master_of(&self, key: &str) -> Option<usize> {
        let live = (0..self.nodes.len())
            .find(|&i| TcpStream::connect(self.nodes[i].addr).is_ok())
            .expect("a live node");
        let slot: u16 = self
            .info(live, &["cluster", "keyslot", key])
            .trim()
            .parse()
            .expect("slot");
        let nodes = self.info(live, &["cluster", "nodes"]);
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let serves = fields[8..].iter().any(|range| {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                matches!((lo.parse::<u16>(), hi.parse::<u16>()), (Ok(lo), Ok(hi)) if (lo..=hi).contains(&slot))
            });
            if serves {
                let addr = fields[1].split('@').next().unwrap_or_default();
                return self.nodes.iter().position(|n| n.addr.to_string() == addr);
            }
        }
        None
    }

    /// Keys stored on node `i` (`DBSIZE`).
    pub fn keys_on(&self, i: usize) -> u64 {
        self.info(i, &["dbsize"]).trim().parse().unwrap_or(0)
    }

    /// Kills the master of `key`'s slot and waits until a replica took its slots over;
    /// returns the killed node's index.
    pub fn fail_master_of(&mut self, key: &str) -> usize {
        let old = self.master_of(key);
        self.nodes[old].kill();
        wait_blocking(
            "a replica took over the killed master's slots",
            Duration::from_secs(30),
            || {
                let live = (0..self.nodes.len())
                    .find(|&i| i != old && TcpStream::connect(self.nodes[i].addr).is_ok());
                live.is_some_and(|i| {
                    self.info(i, &["cluster", "info"])
                        .contains("cluster_state:ok")
                }) && self.try_master_of(key).is_some_and(|m| m != old)
            },
        );
        old
    }
}

/// A NATS cluster on loopback: `size` nodes, each routing to all the others, with a
/// monitoring port each (`/varz`, `/routez`), and `extra` appended to every node's
/// configuration file (a `tls { … }` or `authorization { … }` block).
#[derive(Debug)]
pub struct NatsCluster {
    /// The nodes' client listeners.
    pub nodes: Vec<ServerProcess>,
    /// Each node's monitoring address.
    pub monitors: Vec<SocketAddr>,
}

impl NatsCluster {
    /// Starts the nodes and waits until each is routed to every other.
    pub fn start(size: usize, extra: &str) -> Self {
        with_fresh_ports("NATS cluster", || Self::try_start(size, extra))
    }

    fn try_start(size: usize, extra: &str) -> Self {
        let ports: Vec<(u16, u16, u16)> = (0..size)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let mut nodes = Vec::new();
        let mut monitors = Vec::new();
        for (i, (client, route, monitor)) in ports.iter().enumerate() {
            let routes: Vec<String> = ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, (_, r, _))| format!("nats-route://127.0.0.1:{r}"))
                .collect();
            let dir = temp_dir("nats-cluster");
            let config = format!(
                "server_name: n{i}\nlisten: 127.0.0.1:{client}\nhttp: 127.0.0.1:{monitor}\n\
                 cluster {{\n  name: tokenfan\n  listen: 127.0.0.1:{route}\n  routes: [{}]\n}}\n{extra}\n",
                routes.join(", ")
            );
            let file = dir.join("nats.conf");
            std::fs::write(&file, config).expect("write nats.conf");
            let addr: SocketAddr = ([127, 0, 0, 1], *client).into();
            let args = vec!["-c".to_owned(), file.display().to_string()];
            nodes.push(spawn("nats-server", "nats-server", &args, dir, addr));
            monitors.push(([127, 0, 0, 1], *monitor).into());
        }
        let cluster = Self { nodes, monitors };
        cluster.wait_routed();
        cluster
    }

    /// Waits until every live node has a route to every other live node.
    pub fn wait_routed(&self) {
        let live: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| TcpStream::connect(self.nodes[i].addr).is_ok())
            .collect();
        let want = format!("\"num_routes\": {}", live.len() - 1);
        wait_blocking(
            "the NATS cluster is routed",
            Duration::from_secs(20),
            || {
                live.iter().all(|&i| {
                    http_get(self.monitors[i], "/routez").is_some_and(|body| body.contains(&want))
                })
            },
        );
    }

    /// Every node's URL with `scheme` (`nats` or `tls`), comma-separated: a seed list.
    pub fn urls(&self, scheme: &str) -> String {
        self.nodes
            .iter()
            .map(|n| format!("{scheme}://{}", n.addr))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A counter of node `i`'s `/varz` (e.g. `in_msgs`), when it answers.
    pub fn varz(&self, i: usize, counter: &str) -> Option<u64> {
        let body = http_get(self.monitors[i], "/varz")?;
        let at = body.find(&format!("\"{counter}\":"))?;
        body[at + counter.len() + 3..]
            .trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    }
}
