//! Hermetic backend servers for tests: a `nats-server` and a `redis-server` on free loopback
//! ports, each in its own temporary directory, killed when dropped. `make test` installs the
//! binaries (Debian `nats-server`, `redis-server`) when they are missing.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A child process killed (and its directory removed) on drop.
#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    dir: PathBuf,
    /// Where it listens.
    pub addr: SocketAddr,
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
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

fn temp_dir(name: &str) -> PathBuf {
    let mut bytes = [0u8; 8];
    let _ = getrandom::fill(&mut bytes);
    let dir = std::env::temp_dir().join(format!(
        "tokenfan-{name}-{}-{:016x}",
        std::process::id(),
        u64::from_le_bytes(bytes)
    ));
    let _ = std::fs::create_dir_all(&dir);
    dir
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
    let mut child = Command::new(find(binary))
        .args(args)
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {binary} ({e}); run `make deps`"));
    wait_for_port(addr, &mut child, what);
    ServerProcess { child, dir, addr }
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

/// A Redis server that keeps nothing on disk.
#[derive(Debug)]
pub struct RedisServer {
    /// The process.
    pub process: ServerProcess,
}

impl RedisServer {
    /// Starts one on a free port.
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    fn start_on(port: u16) -> Self {
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let dir = temp_dir("redis");
        let args = vec![
            "--bind".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
            "--save".into(),
            String::new(),
            "--appendonly".into(),
            "no".into(),
            "--dir".into(),
            dir.display().to_string(),
        ];
        Self {
            process: spawn("redis-server", "redis-server", &args, dir, addr),
        }
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.process.addr)
    }

    /// Kills it (losing everything) and starts an empty one on the same port.
    pub fn restart(&mut self) {
        let port = self.process.addr.port();
        self.process.kill();
        *self = Self::start_on(port);
    }
}
