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
