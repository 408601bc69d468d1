//! Connections to Redis, shared by the store and the tenant limiter: one server or a Redis
//! Cluster, plain or TLS, with ACL credentials.
//!
//! - `redis://[user:password@]host:port[/db]`: one server over TCP; `rediss://…`: over TLS
//!   (the server's certificate is checked against the system roots, or `--redis-ca-file`;
//!   `--redis-client-cert` / `--redis-client-key` add a client certificate).
//! - `redis+cluster://host:port[,host:port…]` (or `rediss+cluster://`, or any of the above with
//!   `--redis-cluster`): a Redis Cluster, reached through these seed nodes. The client learns
//!   the slot map from them, follows `MOVED`/`ASK`, and refreshes the map after a failover;
//!   calls made during a failover are retried for up to [`CLUSTER_RETRY_WINDOW`].
//!   Every script the edge runs touches keys with one hash tag, so each runs on one node.
//! - `--redis-username` and `--redis-password` (or `--redis-password-file`) override the
//!   credentials of the URL, so the URL itself can stay free of secrets.
//!
//! [`RedisConn`] hides which of the two it is: it implements the redis crate's
//! [`ConnectionLike`], so commands, pipelines and scripts run on it unchanged.

use std::{fmt, path::PathBuf, time::Duration};

use anyhow::{Context as _, bail, ensure};
use redis::{
    Client, Cmd, ConnectionInfo, IntoConnectionInfo as _, Pipeline, RedisFuture, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClientBuilder,
    cluster_async::ClusterConnection,
};

use crate::secret::Secret;

/// How long a TCP (and TLS) connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a reply may take before the call fails.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a call to a Redis Cluster keeps being retried while the cluster reports a
/// topology change (`MOVED`, `TRYAGAIN`, `CLUSTERDOWN`) or the node holding its slot is
/// unreachable: long enough for a replica to take over a dead master with a node timeout of a
/// few seconds, so the failover costs a pause instead of a lost write.
pub(crate) const CLUSTER_RETRY_WINDOW: Duration = Duration::from_secs(6);
/// Longest pause between two of those attempts.
const CLUSTER_RETRY_MAX_WAIT: Duration = Duration::from_millis(500);

/// Redis connection options (flattened into the edge's configuration).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RedisArgs {
    /// `--redis-url` names a Redis Cluster (its seed nodes, comma-separated), like a
    /// `redis+cluster://` URL does.
    #[arg(long, env = "TOKENFAN_EDGE_REDIS_CLUSTER")]
    pub redis_cluster: bool,

    /// Redis ACL user name (overrides the one in `--redis-url`).
    #[arg(long, env = "TOKENFAN_EDGE_REDIS_USERNAME")]
    pub redis_username: Option<String>,

    /// Redis password (overrides the one in `--redis-url`). Prefer the environment variable
    /// or `--redis-password-file`: command lines are visible to other local users.
    #[arg(long, env = "TOKENFAN_EDGE_REDIS_PASSWORD", hide_env_values = true)]
    pub redis_password: Option<Secret>,

    /// File holding the Redis password (e.g. a mounted Secret).
    #[arg(long, env = "TOKENFAN_EDGE_REDIS_PASSWORD_FILE")]
    pub redis_password_file: Option<PathBuf>,

    /// PEM CA certificates that sign the Redis server's certificate (`rediss://`); default:
    /// the system's roots.
    #[arg(long, env = "TOKENFAN_EDGE_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// PEM client certificate for Redis TLS (`tls-auth-clients yes`).
    #[arg(
        long,
        env = "TOKENFAN_EDGE_REDIS_CLIENT_CERT",
        requires = "redis_client_key"
    )]
    pub redis_client_cert: Option<PathBuf>,

    /// PEM private key of `--redis-client-cert`.
    #[arg(
        long,
        env = "TOKENFAN_EDGE_REDIS_CLIENT_KEY",
        requires = "redis_client_cert"
    )]
    pub redis_client_key: Option<PathBuf>,
}

/// Where to connect, parsed from `--redis-url` and [`RedisArgs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// A Redis Cluster (else one server).
    pub cluster: bool,
    /// TLS (`rediss`).
    pub tls: bool,
    /// One URL per node (`redis://` or `rediss://`, credentials included).
    pub nodes: Vec<String>,
}

impl Target {
    /// Parses a `--redis-url`: one URL, or for a cluster several comma-separated seed nodes
    /// where the later ones may be bare `host:port` (they take the first one's scheme and
    /// credentials).
    pub(crate) fn parse(url: &str, force_cluster: bool) -> anyhow::Result<Self> {
        let mut parts = url.split(',').map(str::trim).filter(|s| !s.is_empty());
        let first = parts.next().context("--redis-url is empty")?;
        let Some((scheme, rest)) = first.split_once("://") else {
            bail!(
                "--redis-url {}: no scheme (redis://, rediss://, redis+cluster://, rediss+cluster://)",
                redact(first)
            );
        };
        let (base, cluster) = match scheme {
            "redis" | "rediss" => (scheme, force_cluster),
            "redis+cluster" => ("redis", true),
            "rediss+cluster" => ("rediss", true),
            other => bail!(
                "--redis-url: unsupported scheme {other:?} (redis://, rediss://, redis+cluster://, rediss+cluster://)"
            ),
        };
        let authority = rest.split('/').next().unwrap_or_default();
        let userinfo = authority
            .rfind('@')
            .map(|at| &authority[..=at])
            .unwrap_or_default();
        let mut nodes = vec![format!("{base}://{rest}")];
        for part in parts {
            nodes.push(match part.split_once("://") {
                Some((s, more)) => {
                    let s = s.strip_suffix("+cluster").unwrap_or(s);
                    ensure!(
                        s == base,
                        "--redis-url: every node must use the same scheme ({base}://)"
                    );
                    format!("{s}://{more}")
                }
                None => format!("{base}://{userinfo}{part}"),
            });
        }
        ensure!(
            cluster || nodes.len() == 1,
            "--redis-url lists {} servers: several seed nodes need a Redis Cluster \
             (redis+cluster:// or --redis-cluster)",
            nodes.len()
        );
        Ok(Self {
            cluster,
            tls: base == "rediss",
            nodes,
        })
    }
}

/// `url` with any password replaced by `***`, for logs and errors.
pub(crate) fn redact(url: &str) -> String {
    url.split(',')
        .map(|one| {
            let start = one.find("://").map_or(0, |i| i + 3);
            let end = one[start..].find('/').map_or(one.len(), |i| start + i);
            match one[start..end].rfind('@') {
                Some(at) => {
                    let userinfo = &one[start..start + at];
                    let user = userinfo.split(':').next().unwrap_or_default();
                    let shown = if userinfo.contains(':') {
                        format!("{user}:***")
                    } else {
                        "***".to_owned()
                    };
                    format!("{}{shown}{}", &one[..start], &one[start + at..])
                }
                None => one.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl RedisArgs {
    /// Checks what can be checked without connecting.
    pub fn validate(&self, url: Option<&str>) -> anyhow::Result<()> {
        let tls_files = self.redis_ca_file.is_some() || self.redis_client_cert.is_some();
        let Some(url) = url else {
            ensure!(
                !self.redis_cluster && !tls_files && self.redis_username.is_none(),
                "--redis-cluster, --redis-username and the --redis-*-file TLS options need --redis-url"
            );
            return Ok(());
        };
        let target = Target::parse(url, self.redis_cluster)?;
        ensure!(
            target.tls || !tls_files,
            "--redis-ca-file and --redis-client-cert need a TLS URL (rediss:// or rediss+cluster://)"
        );
        Ok(())
    }

    /// The CA and client certificate files read, when any is configured.
    fn certificates(&self) -> anyhow::Result<Option<redis::TlsCertificates>> {
        let read = |path: &PathBuf, what: &str| {
            std::fs::read(path).with_context(|| format!("{what}: cannot read {}", path.display()))
        };
        let root_cert = self
            .redis_ca_file
            .as_ref()
            .map(|p| read(p, "--redis-ca-file"))
            .transpose()?;
        let client_tls = match (&self.redis_client_cert, &self.redis_client_key) {
            (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
                client_cert: read(cert, "--redis-client-cert")?,
                client_key: read(key, "--redis-client-key")?,
            }),
            _ => None,
        };
        Ok(
            (root_cert.is_some() || client_tls.is_some()).then_some(redis::TlsCertificates {
                client_tls,
                root_cert,
            }),
        )
    }

    /// Each node's connection info with the configured credentials applied.
    fn connection_infos(&self, target: &Target) -> anyhow::Result<Vec<ConnectionInfo>> {
        let password = crate::secret::resolve(
            self.redis_password.as_ref(),
            self.redis_password_file.as_deref(),
            "--redis-password",
        )?;
        target
            .nodes
            .iter()
            .map(|node| {
                let info = node
                    .as_str()
                    .into_connection_info()
                    .with_context(|| format!("--redis-url: {} is not a Redis URL", redact(node)))?;
                let mut settings = info.redis_settings().clone();
                if let Some(user) = &self.redis_username {
                    settings = settings.set_username(user);
                }
                if let Some(password) = &password {
                    settings = settings.set_password(password.expose());
                }
                Ok(info.set_redis_settings(settings))
            })
            .collect()
    }
}

/// A connection to one Redis server or to a Redis Cluster. Cheap to clone (every clone
/// multiplexes over the same connections); reconnects by itself after an outage.
#[derive(Clone)]
pub enum RedisConn {
    /// One server: a [`ConnectionManager`] that re-establishes its connection after failures.
    Single(ConnectionManager),
    /// A Redis Cluster: one connection per node, routed by slot, following `MOVED`.
    Cluster(ClusterConnection),
}

impl fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Single(_) => "RedisConn::Single",
            Self::Cluster(_) => "RedisConn::Cluster",
        })
    }
}

impl RedisConn {
    /// Connects to `url` as configured by `args` and waits for the first connection (so a
    /// wrong URL, password or certificate fails start-up with a clear error).
    pub async fn connect(url: &str, args: &RedisArgs) -> anyhow::Result<Self> {
        let target = Target::parse(url, args.redis_cluster)?;
        let certs = args.certificates()?;
        ensure!(
            target.tls || certs.is_none(),
            "--redis-ca-file and --redis-client-cert need a TLS URL (rediss://)"
        );
        let mut infos = args.connection_infos(&target)?;
        let shown = redact(url);
        if target.cluster {
            let mut builder = ClusterClientBuilder::new(infos)
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(RESPONSE_TIMEOUT)
                // Quick redirects and reconnects; a failover is outlasted by
                // `CLUSTER_RETRY_WINDOW` around each call (see `RedisConn::req_packed_command`).
                .retries(6)
                .min_retry_wait(100)
                .max_retry_wait(1_000);
            if let Some(certs) = certs {
                builder = builder.certs(certs);
            }
            let client = builder
                .build()
                .with_context(|| format!("Redis Cluster at {shown}"))?;
            let conn = client
                .get_async_connection()
                .await
                .with_context(|| format!("cannot connect to the Redis Cluster at {shown}"))?;
            Ok(Self::Cluster(conn))
        } else {
            let info = infos.remove(0);
            let client = match certs {
                Some(certs) => Client::build_with_tls(info, certs),
                None => Client::open(info),
            }
            .with_context(|| format!("Redis at {shown}"))?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_response_timeout(Some(RESPONSE_TIMEOUT))
                // A call made while Redis is down fails within about a second rather than
                // queueing behind a long reconnect loop; the next call tries again.
                .set_number_of_retries(3)
                .set_max_delay(Duration::from_millis(500));
            let conn = ConnectionManager::new_with_config(client, config)
                .await
                .with_context(|| format!("cannot connect to Redis at {shown}"))?;
            Ok(Self::Single(conn))
        }
    }
}

/// Whether a Redis Cluster call failed because the cluster is changing under it (a failover
/// in progress), so the same call may succeed a moment later. Every call the edge makes is
/// safe to repeat: appends skip stored seqs, the rest set absolute values.
fn cluster_in_flux(err: &redis::RedisError) -> bool {
    err.is_cluster_error()
        || err.is_connection_refusal()
        || err.is_connection_dropped()
        || moved_inside_transaction(err)
}

/// A `MULTI`…`EXEC` sent on a stale slot map comes back as an aborted transaction whose
/// commands each got `MOVED`; the client follows `MOVED` only for single commands.
fn moved_inside_transaction(err: &redis::RedisError) -> bool {
    use redis::ServerErrorKind::{Ask, ClusterDown, Moved, TryAgain};
    err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ExecAbort)
        && err.clone().into_server_errors().is_some_and(|errors| {
            errors
                .iter()
                .any(|(_, e)| matches!(e.kind(), Some(Moved | Ask | TryAgain | ClusterDown)))
        })
}

/// The first key of a pipeline (the argument after its first command's name), if any.
fn first_key(pipeline: &Pipeline) -> Option<Vec<u8>> {
    pipeline
        .cmd_iter()
        .next()?
        .args_iter()
        .nth(1)
        .and_then(|arg| match arg {
            redis::Arg::Simple(bytes) => Some(bytes.to_vec()),
            _ => None,
        })
}

/// Runs `attempt` until it succeeds, fails for another reason, or [`CLUSTER_RETRY_WINDOW`]
/// has passed, with a growing pause between attempts.
async fn outlast_failover<'a, T, F>(mut attempt: F) -> redis::RedisResult<T>
where
    F: FnMut() -> RedisFuture<'a, T>,
{
    let deadline = tokio::time::Instant::now() + CLUSTER_RETRY_WINDOW;
    let mut wait = Duration::from_millis(50);
    loop {
        match attempt().await {
            Err(err) if cluster_in_flux(&err) && tokio::time::Instant::now() + wait < deadline => {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(CLUSTER_RETRY_MAX_WAIT);
            }
            other => return other,
        }
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => {
                // A clone of the connection is a handle to the same one (no new sockets).
                let c = c.clone();
                Box::pin(outlast_failover(move || {
                    let mut c = c.clone();
                    Box::pin(async move { c.req_packed_command(cmd).await })
                }))
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => {
                let c = c.clone();
                let key = first_key(pipeline);
                Box::pin(outlast_failover(move || {
                    let (mut c, key) = (c.clone(), key.clone());
                    Box::pin(async move {
                        let result = c.req_packed_commands(pipeline, offset, count).await;
                        if let (Err(err), Some(key)) = (&result, key)
                            && moved_inside_transaction(err)
                        {
                            // A single command on the same slot gets `MOVED`, which makes the
                            // client refresh its slot map before the transaction is retried.
                            let _ = redis::cmd("EXISTS")
                                .arg(key)
                                .query_async::<Value>(&mut c)
                                .await;
                        }
                        result
                    })
                }))
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_one_server_or_a_cluster() {
        let t = Target::parse("redis://127.0.0.1:6379", false).expect("one");
        assert_eq!((t.cluster, t.tls), (false, false));
        assert_eq!(t.nodes, ["redis://127.0.0.1:6379"]);

        let t = Target::parse("rediss+cluster://u:p@a:1,b:2, rediss://u:p@c:3/", false)
            .expect("cluster");
        assert_eq!((t.cluster, t.tls), (true, true));
        assert_eq!(
            t.nodes,
            ["rediss://u:p@a:1", "rediss://u:p@b:2", "rediss://u:p@c:3/"]
        );

        let t = Target::parse("redis://a:1,b:2", true).expect("--redis-cluster");
        assert!(t.cluster);
        assert_eq!(t.nodes, ["redis://a:1", "redis://b:2"]);

        let err = Target::parse("redis://a:1,b:2", false).expect_err("several, no cluster");
        assert!(err.to_string().contains("Redis Cluster"), "{err}");
        assert!(Target::parse("http://a:1", false).is_err());
        assert!(Target::parse("a:1", false).is_err());
        assert!(Target::parse("redis+cluster://a:1,rediss://b:2", false).is_err());
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("rediss://user:s3cret@host:6380/0,redis://:pw@h:1,redis://h:2"),
            "rediss://user:***@host:6380/0,redis://:***@h:1,redis://h:2"
        );
        assert_eq!(redact("redis://tokenonly@h:1"), "redis://***@h:1");
        let args = RedisArgs {
            redis_password: Some(Secret::new("s3cret")),
            ..RedisArgs::default()
        };
        assert!(!format!("{args:?}").contains("s3cret"));
    }

    #[test]
    fn tls_files_need_a_tls_url() {
        let args = RedisArgs {
            redis_ca_file: Some("/ca.pem".into()),
            ..RedisArgs::default()
        };
        assert!(args.validate(Some("redis://h:1")).is_err());
        assert!(args.validate(Some("rediss://h:1")).is_ok());
        assert!(args.validate(None).is_err());
        assert!(RedisArgs::default().validate(None).is_ok());
    }
}
