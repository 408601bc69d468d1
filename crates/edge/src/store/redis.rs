//! The cluster store: stream metadata, history and owner leases in Redis.
//!
//! # Key layout
//!
//! Every key of a stream carries the stream id as its hash tag, so all of them land on one
//! Redis Cluster slot and the Lua scripts below may touch them together (see [`keys`]):
//!
//! | key | type | what |
//! |---|---|---|
//! | `tokenfan:{<id>}:meta` | HASH | `model`, `owner`, `status`, `spec_json`, `tenant`, `epoch` (ownership epoch), `stop` (`1` once a stop was requested), and `len` (events recorded so far; absent = 0) |
//! | `tokenfan:{<id>}:events` | LIST | event JSON ([`Event::json`]); element `i` is seq `i + 1` |
//! | `tokenfan:{<id>}:batches` | LIST | one `"<epoch> <first seq> <last seq>"` per stored batch (the fencing audit) |
//! | `tokenfan:{<id>}:lease` | STRING | the owner's replica id, with a `PX` TTL |
//!
//! A running stream's keys live [`LeaseTerms::keep`] past its owner's last renewal, so
//! nothing leaks when an owner dies and nobody takes over; [`Store::expire`] sets the
//! history TTL once the stream ended (and drops the lease).
//!
//! # Fencing
//!
//! Every write an owner makes (`append`, `renew`) compares its epoch with `meta.epoch` inside
//! the same script, and a takeover (`claim`) increments `meta.epoch` inside its script: an
//! owner that lost its lease cannot write one event after another replica claimed the stream.
//!
//! # Round trips
//!
//! Each trait call is one round trip: one `EVALSHA` (the scripts are loaded automatically on
//! `NOSCRIPT`, i.e. once per server), or one `HGETALL`/`GET`/`LRANGE`. The connection
//! ([`RedisConn`]: one server, plain or TLS, or a Redis Cluster) multiplexes every call and
//! reconnects by itself after the server went away; calls made while it is down fail with
//! [`StoreError::Backend`].
//!
//! # Redis Cluster
//!
//! With a cluster connection every call is routed by the slot of its keys. Each call touches
//! the keys of one stream only, all with the stream's hash tag, so every script runs on one
//! master; streams spread over the slots (and so the masters) by their random ids. After a
//! failover the client learns the new slot map from `MOVED` and retries; calls made while a
//! slot has no master are retried for up to
//! [`CLUSTER_RETRY_WINDOW`](crate::redis_conn::CLUSTER_RETRY_WINDOW), then fail with
//! [`StoreError::Backend`].

use std::{
    collections::HashMap,
    sync::{Arc, LazyLock},
    time::Duration,
};

use ::redis::{AsyncCommands as _, RedisError, Script};

use super::{Appended, Claim, LeaseTerms, Store, StoreError, StoredBatch, StreamMeta};
use crate::{
    event::Event,
    ids::StreamId,
    redis_conn::{RedisArgs, RedisConn},
    stream::StreamStatus,
};

/// How long [`RedisStore::ping`] waits for `PONG`.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// The keys of a stream (the edge's key names live in [`crate::redis_keys`]).
pub use crate::redis_keys as keys;

/// `KEYS`: meta, events, lease, batches. `ARGV`: owner, lease ttl ms, keep ms, then field/value
/// pairs of the meta hash (including `epoch`).
///
/// Records the stream and the owner's lease when `meta` does not exist (returns 1); else
/// changes nothing (returns 0).
const CREATE_LUA: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('DEL', KEYS[2], KEYS[4])
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
return 1
";

/// `KEYS`: meta, events, batches. `ARGV`: epoch (`''`: not fenced, a heal), then triples (seq,
/// status after it or `''`, json).
///
/// `{-1}` when `meta` does not exist, `{-2}` when `epoch` is not `meta.epoch` (fenced); else
/// appends, in the order given, each event whose seq is the one after the last stored (so
/// already-stored seqs are skipped and nothing is stored past a gap), nothing once a terminal
/// status is recorded, records the new length in `meta.len` and the status of the last
/// appended terminal event in `meta.status`, logs the batch with its epoch, gives `events` and
/// `batches` the TTL `meta` has left, and returns `{length, stop requested (0/1)}`.
const APPEND_LUA: &str = r"
local m = redis.call('HMGET', KEYS[1], 'status', 'epoch', 'stop')
if not m[1] then
  return {-1, 0}
end
local epoch = m[2] or '0'
if ARGV[1] ~= '' and tonumber(epoch) ~= tonumber(ARGV[1]) then
  return {-2, 0}
end
local stop = 0
if m[3] == '1' then
  stop = 1
end
local len = redis.call('LLEN', KEYS[2])
if m[1] ~= 'running' then
  return {len, stop}
end
local batch = {}
local status = false
for i = 2, #ARGV, 3 do
  if status then
    break
  end
  if tonumber(ARGV[i]) == len + #batch + 1 then
    batch[#batch + 1] = ARGV[i + 2]
    if ARGV[i + 1] ~= '' then
      status = ARGV[i + 1]
    end
  end
end
if #batch == 0 then
  return {len, stop}
end
for i = 1, #batch, 1000 do
  redis.call('RPUSH', KEYS[2], unpack(batch, i, math.min(i + 999, #batch)))
end
redis.call('RPUSH', KEYS[3], epoch .. ' ' .. (len + 1) .. ' ' .. (len + #batch))
len = len + #batch
if status then
  redis.call('HSET', KEYS[1], 'len', len, 'status', status)
else
  redis.call('HSET', KEYS[1], 'len', len)
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[2], ttl)
  redis.call('PEXPIRE', KEYS[3], ttl)
end
return {len, stop}
";

/// `KEYS`: meta, events. `ARGV`: after.
///
/// Nil when `meta` does not exist; else `{recorded length, list length, events after}`.
const READ_LUA: &str = r"
local recorded = redis.call('HGET', KEYS[1], 'len')
if not recorded then
  if redis.call('EXISTS', KEYS[1]) == 0 then
    return false
  end
  recorded = '0'
end
return {tonumber(recorded), redis.call('LLEN', KEYS[2]), redis.call('LRANGE', KEYS[2], ARGV[1], -1)}
";

/// `KEYS`: meta, events, lease, batches. `ARGV`: ttl in ms (0 = now).
///
/// 0 when `meta` does not exist; else sets the TTL of meta, events and batches, deletes the
/// lease and returns 1.
const EXPIRE_LUA: &str = r"
if redis.call('PEXPIRE', KEYS[1], ARGV[1]) == 0 then
  return 0
end
redis.call('PEXPIRE', KEYS[2], ARGV[1])
redis.call('PEXPIRE', KEYS[4], ARGV[1])
redis.call('DEL', KEYS[3])
return 1
";

/// `KEYS`: meta, lease, events, batches. `ARGV`: owner, lease ttl ms, keep ms.
///
/// `{-1}` when `meta` does not exist, `{-3}` when the stream's terminal status is recorded,
/// `{-2}` when the lease is held; else increments `meta.epoch`, records the owner, takes the
/// lease, extends the keys' lifetime and returns `{epoch, stop requested (0/1)}`.
const CLAIM_LUA: &str = r"
local m = redis.call('HMGET', KEYS[1], 'status', 'stop')
if not m[1] then
  return {-1, 0}
end
if m[1] ~= 'running' then
  return {-3, 0}
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  return {-2, 0}
end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'owner', ARGV[1])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
redis.call('PEXPIRE', KEYS[4], ARGV[3])
local stop = 0
if m[2] == '1' then
  stop = 1
end
return {epoch, stop}
";

/// `KEYS`: meta, lease, events, batches. `ARGV`: owner, epoch, lease ttl ms, keep ms.
///
/// `-1` when `meta` does not exist, `-2` when `epoch` is not `meta.epoch` or another owner
/// holds the lease (fenced); else takes or renews the lease, extends the keys' lifetime and
/// returns whether a stop was requested (0/1).
const RENEW_LUA: &str = r"
local m = redis.call('HMGET', KEYS[1], 'epoch', 'stop')
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
if tonumber(m[1] or '0') ~= tonumber(ARGV[2]) then
  return -2
end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then
  return -2
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[3], ARGV[4])
redis.call('PEXPIRE', KEYS[4], ARGV[4])
if m[2] == '1' then
  return 1
end
return 0
";

/// `KEYS`: meta.
///
/// Nil when `meta` does not exist; else records a stop when the stream is running and
/// returns its status.
const STOP_LUA: &str = r"
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return false
end
if status == 'running' then
  redis.call('HSET', KEYS[1], 'stop', '1')
end
return status
";

static CREATE: LazyLock<Script> = LazyLock::new(|| Script::new(CREATE_LUA));
static APPEND: LazyLock<Script> = LazyLock::new(|| Script::new(APPEND_LUA));
static READ: LazyLock<Script> = LazyLock::new(|| Script::new(READ_LUA));
static EXPIRE: LazyLock<Script> = LazyLock::new(|| Script::new(EXPIRE_LUA));
static CLAIM: LazyLock<Script> = LazyLock::new(|| Script::new(CLAIM_LUA));
static RENEW: LazyLock<Script> = LazyLock::new(|| Script::new(RENEW_LUA));
static STOP: LazyLock<Script> = LazyLock::new(|| Script::new(STOP_LUA));

/// History, metadata and leases in Redis (one server or a Redis Cluster: every script
/// touches one slot only). Cheap to clone.
#[derive(Clone, Debug)]
pub struct RedisStore {
    conn: RedisConn,
}

/// A Redis failure as a store error, counted.
fn backend(err: RedisError) -> StoreError {
    backend_msg(err.to_string())
}

/// The backend answered something this store does not understand (counted like a failure).
fn backend_msg(msg: impl Into<String>) -> StoreError {
    metrics::counter!("tokenfan_edge_backend_errors_total", "backend" => "redis").increment(1);
    StoreError::Backend(msg.into())
}

/// A duration as Redis milliseconds (bounded, so `now + ttl` cannot overflow in Redis).
fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis())
        .unwrap_or(i64::MAX)
        .min(i64::MAX / 4)
}

fn parse_status(s: &str) -> Option<StreamStatus> {
    Some(match s {
        "running" => StreamStatus::Running,
        "done" => StreamStatus::Done,
        "cancelled" => StreamStatus::Cancelled,
        "error" => StreamStatus::Error,
        _ => return None,
    })
}

impl RedisStore {
    /// Connects to `url` (`redis://[user:password@]host:port[/db]`, `rediss://…`, or a
    /// cluster's `redis+cluster://host:port,host:port`) with default options.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, &RedisArgs::default()).await
    }

    /// Connects to `url` with the TLS, credential and cluster options of `args` (see
    /// [`crate::redis_conn`]) and checks the server answers. Later outages are survived: the
    /// connection is re-established on the next call after a failure.
    pub async fn connect_with(url: &str, args: &RedisArgs) -> Result<Self, StoreError> {
        let conn = RedisConn::connect(url, args)
            .await
            .map_err(|err| backend_msg(format!("{err:#}")))?;
        Ok(Self { conn })
    }

    /// The store's connection, for sharing (the tenant limiter runs its script on it).
    pub fn connection(&self) -> RedisConn {
        self.conn.clone()
    }

    /// Runs `op` on a connection; a connection that turns out to be dead (Redis restarted
    /// since its last use) is replaced by the manager, and `op` runs once more on the new one.
    async fn run<T, F, Fut>(&self, mut op: F) -> Result<T, StoreError>
    where
        F: FnMut(RedisConn) -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        match op(self.conn.clone()).await {
            Err(e) if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() => {
                op(self.conn.clone()).await.map_err(backend)
            }
            other => other.map_err(backend),
        }
    }

    /// [`Store::append`] fenced at `epoch`, or a [`Store::heal`] (`None`).
    async fn append_as(
        &self,
        id: &StreamId,
        epoch: Option<u64>,
        events: &[Arc<Event>],
    ) -> Result<Appended, StoreError> {
        let mut invocation = APPEND.prepare_invoke();
        invocation
            .key(keys::meta(id))
            .key(keys::events(id))
            .key(keys::batches(id))
            .arg(epoch.map(|e| e.to_string()).unwrap_or_default());
        for event in events {
            let status = if event.is_terminal() {
                StreamStatus::of(event).as_str()
            } else {
                ""
            };
            invocation.arg(event.seq).arg(status).arg(event.json());
        }
        let invocation = &invocation;
        let (len, stop): (i64, i64) = self
            .run(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await?;
        match len {
            -1 => Err(StoreError::NotFound),
            -2 => Err(StoreError::Fenced),
            len => Ok(Appended {
                len: u64::try_from(len)
                    .map_err(|_| backend_msg(format!("stream {id}: length {len}")))?,
                stop_requested: stop == 1,
            }),
        }
    }

    /// Whether Redis answers `PING` (within two seconds), for readiness.
    pub async fn ping(&self) -> bool {
        let mut conn = self.conn.clone();
        let cmd = ::redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut conn);
        matches!(tokio::time::timeout(PING_TIMEOUT, ping).await, Ok(Ok(pong)) if pong == "PONG")
    }
}

/// Runs `script` with `keys` and `args` on the store's connection.
macro_rules! invoke {
    ($store:expr, $script:expr, keys: [$($key:expr),* $(,)?], args: [$($arg:expr),* $(,)?]) => {{
        let mut invocation = $script.prepare_invoke();
        $(invocation.key($key);)*
        $(invocation.arg($arg);)*
        let invocation = &invocation;
        $store
            .run(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await
    }};
}

#[async_trait::async_trait]
impl Store for RedisStore {
    async fn healthy(&self) -> bool {
        self.ping().await
    }

    /// One `EVALSHA`: the meta hash (with its epoch), the owner's lease and the keys'
    /// lifetime, only when the stream is not recorded yet.
    async fn create(
        &self,
        id: &StreamId,
        meta: StreamMeta,
        terms: LeaseTerms,
    ) -> Result<bool, StoreError> {
        let mut invocation = CREATE.prepare_invoke();
        invocation
            .key(keys::meta(id))
            .key(keys::events(id))
            .key(keys::lease(id))
            .key(keys::batches(id))
            .arg(&meta.owner)
            .arg(millis(terms.ttl).max(1))
            .arg(millis(terms.keep).max(1));
        let epoch = meta.epoch.to_string();
        let fields = [
            ("model", meta.model),
            ("owner", meta.owner.as_str()),
            ("status", meta.status.as_str()),
            ("spec_json", meta.spec_json.as_str()),
            ("tenant", meta.tenant.as_str()),
            ("epoch", epoch.as_str()),
            ("stop", if meta.stop_requested { "1" } else { "0" }),
        ];
        for (field, value) in fields {
            invocation.arg(field).arg(value);
        }
        let invocation = &invocation;
        let created: i64 = self
            .run(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await?;
        Ok(created == 1)
    }

    async fn meta(&self, id: &StreamId) -> Result<StreamMeta, StoreError> {
        let key = keys::meta(id);
        let key = &key;
        let mut fields: HashMap<String, String> = self
            .run(|mut c| async move { c.hgetall(key).await })
            .await?;
        if fields.is_empty() {
            return Err(StoreError::NotFound);
        }
        let mut take = |name: &str| {
            fields
                .remove(name)
                .ok_or_else(|| backend_msg(format!("stream {id}: meta has no {name}")))
        };
        let model = take("model")?;
        let owner = take("owner")?;
        let status = take("status")?;
        let spec_json = take("spec_json")?;
        // Streams recorded before tenants existed belong to the default tenant; before
        // epochs, to epoch 0.
        let tenant = fields
            .remove("tenant")
            .unwrap_or_else(|| crate::tenant::DEFAULT_TENANT.to_owned());
        let epoch = fields
            .remove("epoch")
            .map_or(Ok(0), |e| e.parse::<u64>())
            .map_err(|_| backend_msg(format!("stream {id}: unreadable epoch")))?;
        let stop_requested = fields.remove("stop").is_some_and(|s| s == "1");
        let model = crate::request::resolve_model(Some(&model))
            .map_err(|_| backend_msg(format!("stream {id}: unknown model {model:?}")))?
            .id;
        let status = parse_status(&status)
            .ok_or_else(|| backend_msg(format!("stream {id}: unknown status {status:?}")))?;
        Ok(StreamMeta {
            model,
            owner,
            status,
            spec_json,
            tenant,
            epoch,
            stop_requested,
        })
    }

    /// One `EVALSHA` per batch, whatever its size.
    async fn append(
        &self,
        id: &StreamId,
        epoch: u64,
        events: &[Arc<Event>],
    ) -> Result<Appended, StoreError> {
        self.append_as(id, Some(epoch), events).await
    }

    async fn heal(&self, id: &StreamId, events: &[Arc<Event>]) -> Result<Appended, StoreError> {
        self.append_as(id, None, events).await
    }

    /// The server's `run_id` (`INFO server`): new on every restart.
    async fn incarnation(&self) -> Option<String> {
        let mut conn = self.conn.clone();
        let mut cmd = ::redis::cmd("INFO");
        let info = cmd.arg("server").query_async::<String>(&mut conn);
        let info = tokio::time::timeout(PING_TIMEOUT, info).await.ok()?.ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .map(|id| id.trim().to_owned())
    }

    /// The events after `after`, in order.
    ///
    /// - Unknown stream (no meta, e.g. expired) → [`StoreError::NotFound`].
    /// - `after` at or past the last stored seq → an empty list: a client may legitimately be
    ///   ahead of this store (it saw live events another way); the hub decides whether such a
    ///   cursor is valid.
    /// - The events list holds fewer events than meta recorded (Redis lost or evicted the list
    ///   while meta survived) and `after` is before the recorded end →
    ///   [`StoreError::Expired`]: never a silent partial replay.
    /// - A stored element that does not parse, or whose seq is not its position →
    ///   [`StoreError::Backend`].
    async fn read(&self, id: &StreamId, after: u64) -> Result<Vec<Arc<Event>>, StoreError> {
        let start = i64::try_from(after).unwrap_or(i64::MAX);
        let found: Option<(u64, u64, Vec<Vec<u8>>)> = invoke!(self, READ,
            keys: [keys::meta(id), keys::events(id)], args: [start])?;
        let Some((recorded, len, items)) = found else {
            return Err(StoreError::NotFound);
        };
        if len < recorded && after < recorded {
            return Err(StoreError::Expired(after));
        }
        items
            .iter()
            .zip(after + 1..)
            .map(|(json, seq)| match Event::from_json(json) {
                Some(event) if event.seq == seq => Ok(Arc::new(event)),
                Some(event) => Err(backend_msg(format!(
                    "stream {id}: event {} stored at seq {seq}",
                    event.seq
                ))),
                None => Err(backend_msg(format!(
                    "stream {id}: unparsable event at seq {seq}"
                ))),
            })
            .collect()
    }

    /// Sets the TTL of the stream's keys (`Duration::ZERO` deletes them at once) and releases
    /// the lease: the owner calls this once the stream ended, when nobody needs to take over.
    async fn expire(&self, id: &StreamId, ttl: Duration) -> Result<(), StoreError> {
        let found: i64 = invoke!(self, EXPIRE,
            keys: [keys::meta(id), keys::events(id), keys::lease(id), keys::batches(id)],
            args: [millis(ttl)])?;
        if found == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn claim(
        &self,
        id: &StreamId,
        owner: &str,
        terms: LeaseTerms,
    ) -> Result<Claim, StoreError> {
        let (epoch, stop): (i64, i64) = invoke!(self, CLAIM,
            keys: [keys::meta(id), keys::lease(id), keys::events(id), keys::batches(id)],
            args: [owner, millis(terms.ttl).max(1), millis(terms.keep).max(1)])?;
        match epoch {
            -1 => Err(StoreError::NotFound),
            -2 => Ok(Claim::Held),
            -3 => Ok(Claim::Ended),
            epoch => Ok(Claim::Claimed {
                epoch: u64::try_from(epoch)
                    .map_err(|_| backend_msg(format!("stream {id}: epoch {epoch}")))?,
                stop_requested: stop == 1,
            }),
        }
    }

    async fn renew(
        &self,
        id: &StreamId,
        owner: &str,
        epoch: u64,
        terms: LeaseTerms,
    ) -> Result<bool, StoreError> {
        let renewed: i64 = invoke!(self, RENEW,
            keys: [keys::meta(id), keys::lease(id), keys::events(id), keys::batches(id)],
            args: [owner, epoch, millis(terms.ttl).max(1), millis(terms.keep).max(1)])?;
        match renewed {
            -1 => Err(StoreError::NotFound),
            -2 => Err(StoreError::Fenced),
            stop => Ok(stop == 1),
        }
    }

    async fn request_stop(&self, id: &StreamId) -> Result<StreamStatus, StoreError> {
        let status: Option<String> = invoke!(self, STOP, keys: [keys::meta(id)], args: [])?;
        let status = status.ok_or(StoreError::NotFound)?;
        parse_status(&status)
            .ok_or_else(|| backend_msg(format!("stream {id}: unknown status {status:?}")))
    }

    async fn lease_owner(&self, id: &StreamId) -> Result<Option<String>, StoreError> {
        let key = keys::lease(id);
        let key = &key;
        self.run(|mut c| async move { c.get(key).await }).await
    }

    async fn batches(&self, id: &StreamId) -> Result<Vec<StoredBatch>, StoreError> {
        let key = keys::batches(id);
        let key = &key;
        let items: Vec<String> = self
            .run(|mut c| async move { c.lrange(key, 0, -1).await })
            .await?;
        items
            .iter()
            .map(|item| {
                let mut parts = item.split(' ').map(str::parse::<u64>);
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(Ok(epoch)), Some(Ok(first)), Some(Ok(last))) => {
                        Ok(StoredBatch { epoch, first, last })
                    }
                    _ => Err(backend_msg(format!("stream {id}: batch {item:?}"))),
                }
            })
            .collect()
    }
}
