//! The cluster store: stream metadata, history and owner leases in Redis.
//!
//! # Key layout
//!
//! Every key of a stream carries the stream id as its hash tag, so all of them land on one
//! Redis Cluster slot and the Lua scripts below may touch them together (see [`keys`]):
//!
//! | key | type | what |
//! |---|---|---|
//! | `tokenfan:{<id>}:meta` | HASH | `model`, `owner`, `status`, `spec_json`, `tenant`, and `len` (events recorded so far; absent = 0) |
//! | `tokenfan:{<id>}:events` | LIST | event JSON ([`Event::json`]); element `i` is seq `i + 1` |
//! | `tokenfan:{<id>}:lease` | STRING | the owner's replica id, with a `PX` TTL |
//!
//! `meta` gets a safety TTL ([`SAFETY_TTL`]) when it is created, and `events` always gets the
//! TTL `meta` has left, so nothing leaks when an owner dies before calling
//! [`Store::expire`]; `expire` then shortens both to the history TTL (and drops the lease).
//!
//! # Round trips
//!
//! Each trait call is one round trip: `append` is one `EVALSHA` per batch whatever its size
//! (the scripts are loaded automatically on `NOSCRIPT`, i.e. once per server), `read` one
//! `EVALSHA`, `create` one `MULTI`…`EXEC` pipeline. The connection ([`RedisConn`]: one server,
//! plain or TLS, or a Redis Cluster) multiplexes every call and reconnects by itself after the
//! server went away; calls made while it is down fail with [`StoreError::Backend`].
//!
//! # Redis Cluster
//!
//! With a cluster connection every call is routed by the slot of its keys. Each call touches
//! the keys of one stream only, all with the stream's hash tag, so every script and the
//! `MULTI` of `create` run on one master; streams spread over the slots (and so the masters)
//! by their random ids. After a failover the client learns the new slot map from `MOVED` and
//! retries; calls made while a slot has no master are retried for up to
//! [`CLUSTER_RETRY_WINDOW`](crate::redis_conn::CLUSTER_RETRY_WINDOW), then fail with
//! [`StoreError::Backend`].

use std::{
    collections::HashMap,
    sync::{Arc, LazyLock},
    time::Duration,
};

use ::redis::{AsyncCommands as _, RedisError, Script};

use super::{Store, StoreError, StreamMeta};
use crate::{
    event::Event,
    ids::StreamId,
    redis_conn::{RedisArgs, RedisConn},
    stream::StreamStatus,
};

/// How long a stream's keys live when nobody calls [`Store::expire`] (an owner that died
/// mid-stream): long enough for any generation, short enough that nothing piles up.
pub const SAFETY_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// How long [`RedisStore::ping`] waits for `PONG`.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// The Redis keys of a stream. The only place that knows their names.
pub mod keys {
    use crate::ids::StreamId;

    /// `tokenfan:{<id>}:meta`, a HASH.
    pub fn meta(id: &StreamId) -> String {
        format!("tokenfan:{{{id}}}:meta")
    }

    /// `tokenfan:{<id>}:events`, a LIST of event JSON (element `i` is seq `i + 1`).
    pub fn events(id: &StreamId) -> String {
        format!("tokenfan:{{{id}}}:events")
    }

    /// `tokenfan:{<id>}:lease`, a STRING (the owner) with a TTL.
    pub fn lease(id: &StreamId) -> String {
        format!("tokenfan:{{{id}}}:lease")
    }
}

/// `KEYS`: meta, events. `ARGV`: triples (seq, status after it or `''`, json).
///
/// Appends, in the order given, each event whose seq is the one after the last stored (so
/// already-stored seqs are skipped and nothing is stored past a gap), records the new length
/// in `meta.len`, the status of the last appended terminal event in `meta.status`, and gives
/// `events` the TTL `meta` has left. Returns the list's length afterwards, or -1 when `meta`
/// does not exist (nothing is written then).
const APPEND_LUA: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
local len = redis.call('LLEN', KEYS[2])
local batch = {}
local status = false
for i = 1, #ARGV, 3 do
  if tonumber(ARGV[i]) == len + #batch + 1 then
    batch[#batch + 1] = ARGV[i + 2]
    if ARGV[i + 1] ~= '' then
      status = ARGV[i + 1]
    end
  end
end
if #batch == 0 then
  return len
end
for i = 1, #batch, 1000 do
  redis.call('RPUSH', KEYS[2], unpack(batch, i, math.min(i + 999, #batch)))
end
len = len + #batch
if status then
  redis.call('HSET', KEYS[1], 'len', len, 'status', status)
else
  redis.call('HSET', KEYS[1], 'len', len)
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return len
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

/// `KEYS`: meta, events, lease. `ARGV`: ttl in ms (0 = now).
///
/// 0 when `meta` does not exist; else sets the TTL of meta and events, deletes the lease and
/// returns 1.
const EXPIRE_LUA: &str = r"
if redis.call('PEXPIRE', KEYS[1], ARGV[1]) == 0 then
  return 0
end
redis.call('PEXPIRE', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
return 1
";

/// `KEYS`: lease. `ARGV`: owner, ttl in ms (> 0).
///
/// Takes the lease when it is free, renews it when `owner` holds it; 1 when `owner` holds it
/// afterwards, else 0.
const LEASE_LUA: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

static APPEND: LazyLock<Script> = LazyLock::new(|| Script::new(APPEND_LUA));
static READ: LazyLock<Script> = LazyLock::new(|| Script::new(READ_LUA));
static EXPIRE: LazyLock<Script> = LazyLock::new(|| Script::new(EXPIRE_LUA));
static LEASE: LazyLock<Script> = LazyLock::new(|| Script::new(LEASE_LUA));

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

    /// Whether Redis answers `PING` (within two seconds), for readiness.
    pub async fn ping(&self) -> bool {
        let mut conn = self.conn.clone();
        let cmd = ::redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut conn);
        matches!(tokio::time::timeout(PING_TIMEOUT, ping).await, Ok(Ok(pong)) if pong == "PONG")
    }
}

#[async_trait::async_trait]
impl Store for RedisStore {
    async fn healthy(&self) -> bool {
        self.ping().await
    }

    /// Replaces whatever was stored under `id` by a new stream without events (atomically),
    /// with the [`SAFETY_TTL`].
    async fn create(&self, id: &StreamId, meta: StreamMeta) -> Result<(), StoreError> {
        let (meta_key, events_key) = (keys::meta(id), keys::events(id));
        let fields = [
            ("model", meta.model),
            ("owner", meta.owner.as_str()),
            ("status", meta.status.as_str()),
            ("spec_json", meta.spec_json.as_str()),
            ("tenant", meta.tenant.as_str()),
        ];
        let mut pipe = ::redis::pipe();
        pipe.atomic()
            .del(&[&meta_key, &events_key])
            .ignore()
            .hset_multiple(&meta_key, &fields)
            .ignore()
            .pexpire(&meta_key, millis(SAFETY_TTL))
            .ignore();
        let pipe = &pipe;
        self.run(|mut c| async move { pipe.exec_async(&mut c).await })
            .await
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
        // Streams recorded before tenants existed belong to the default tenant.
        let tenant = fields
            .remove("tenant")
            .unwrap_or_else(|| crate::auth::DEFAULT_TENANT.to_owned());
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
        })
    }

    /// One `EVALSHA` per batch. Events whose seq is already stored are skipped (`Ok`); an event
    /// past a gap is not stored (`Ok` as well, with a warning: the owner never leaves gaps).
    async fn append(&self, id: &StreamId, events: &[Arc<Event>]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut invocation = APPEND.prepare_invoke();
        invocation.key(keys::meta(id)).key(keys::events(id));
        for event in events {
            let status = if event.is_terminal() {
                StreamStatus::of(event).as_str()
            } else {
                ""
            };
            invocation.arg(event.seq).arg(status).arg(&event.json()[..]);
        }
        let invocation = &invocation;
        let len: i64 = self
            .run(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await?;
        let Ok(len) = u64::try_from(len) else {
            return Err(StoreError::NotFound);
        };
        if let Some(skipped) = events.iter().find(|e| e.seq > len) {
            tracing::warn!(stream = %id, seq = skipped.seq, stored = len,
                "store: events past a gap were not stored");
        }
        Ok(())
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
        let mut invocation = READ.prepare_invoke();
        invocation
            .key(keys::meta(id))
            .key(keys::events(id))
            .arg(start);
        let invocation = &invocation;
        let found: Option<(u64, u64, Vec<Vec<u8>>)> = self
            .run(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await?;
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

    /// Sets the TTL of meta and events (`Duration::ZERO` deletes them at once) and releases the
    /// lease: the owner calls this once the stream ended, when nobody needs to take over.
    async fn expire(&self, id: &StreamId, ttl: Duration) -> Result<(), StoreError> {
        let mut invocation = EXPIRE.prepare_invoke();
        invocation
            .key(keys::meta(id))
            .key(keys::events(id))
            .key(keys::lease(id))
            .arg(millis(ttl));
        let invocation = &invocation;
        let found: i64 = self
            .run(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await?;
        if found == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    /// Atomic take-or-renew; a `ttl` under a millisecond counts as one millisecond.
    async fn acquire_lease(
        &self,
        id: &StreamId,
        owner: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut invocation = LEASE.prepare_invoke();
        invocation
            .key(keys::lease(id))
            .arg(owner)
            .arg(millis(ttl).max(1));
        let invocation = &invocation;
        let held: i64 = self
            .run(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await?;
        Ok(held == 1)
    }

    async fn lease_owner(&self, id: &StreamId) -> Result<Option<String>, StoreError> {
        let key = keys::lease(id);
        let key = &key;
        self.run(|mut c| async move { c.get(key).await }).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::{
        event::{EventKind, FinishReason, Usage},
        testkit::RedisServer,
    };

    fn meta() -> StreamMeta {
        StreamMeta {
            model: "tokenfan-mock",
            owner: "edge-a".into(),
            status: StreamStatus::Running,
            spec_json: "{}".into(),
            tenant: "tenant-a".into(),
        }
    }

    fn token(seq: u64) -> Arc<Event> {
        Arc::new(Event::new(
            seq,
            EventKind::Token {
                text: format!("t{seq}"),
            },
        ))
    }

    async fn raw(server: &RedisServer) -> ::redis::aio::MultiplexedConnection {
        ::redis::Client::open(server.url())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("raw connection")
    }

    #[tokio::test]
    async fn conforms() {
        let server = RedisServer::start();
        let store = RedisStore::connect(&server.url()).await.expect("connect");
        assert!(store.ping().await);
        crate::store::conformance::run(&store).await;
    }

    #[tokio::test]
    async fn keys_share_one_slot_and_always_expire() {
        let server = RedisServer::start();
        let store = RedisStore::connect(&server.url()).await.expect("connect");
        let id = StreamId::random();
        let tag = format!("{{{id}}}");
        for key in [keys::meta(&id), keys::events(&id), keys::lease(&id)] {
            assert!(key.starts_with("tokenfan:"), "{key}");
            assert_eq!(key.find('{'), key.find(&tag), "{key}: one hash tag");
        }

        store.create(&id, meta()).await.expect("create");
        store
            .append(&id, &[token(1), token(2)])
            .await
            .expect("append");
        assert!(
            store
                .acquire_lease(&id, "edge-a", SAFETY_TTL)
                .await
                .expect("lease")
        );
        let mut conn = raw(&server).await;
        for key in [keys::meta(&id), keys::events(&id), keys::lease(&id)] {
            let ttl: i64 = conn.pttl(&key).await.expect("pttl");
            assert!(ttl > 0 && ttl <= millis(SAFETY_TTL), "{key}: ttl {ttl}");
        }

        store
            .expire(&id, Duration::from_secs(60))
            .await
            .expect("expire");
        for key in [keys::meta(&id), keys::events(&id)] {
            let ttl: i64 = conn.pttl(&key).await.expect("pttl");
            assert!(ttl > 0 && ttl <= 60_000, "{key}: ttl {ttl}");
        }
        assert_eq!(store.lease_owner(&id).await.expect("owner"), None);
        assert!(matches!(
            store.expire(&StreamId::random(), Duration::ZERO).await,
            Err(StoreError::NotFound)
        ));
    }

    #[tokio::test]
    async fn append_skips_duplicates_and_gaps_and_records_terminal_status() {
        let server = RedisServer::start();
        let store = RedisStore::connect(&server.url()).await.expect("connect");
        let id = StreamId::random();
        assert!(matches!(
            store.append(&id, &[token(1)]).await,
            Err(StoreError::NotFound)
        ));
        store.create(&id, meta()).await.expect("create");
        store.append(&id, &[token(1), token(3)]).await.expect("gap");
        store
            .append(&id, &[token(1), token(2), token(3)])
            .await
            .expect("dup");
        let cancelled = Arc::new(Event::new(
            4,
            EventKind::Done {
                finish_reason: FinishReason::Cancelled,
                usage: Usage::default(),
            },
        ));
        store
            .append(&id, std::slice::from_ref(&cancelled))
            .await
            .expect("end");
        let got = store.read(&id, 0).await.expect("read");
        assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert_eq!(got[3].json(), cancelled.json());
        assert_eq!(
            store.meta(&id).await.expect("meta").status,
            StreamStatus::Cancelled
        );
        assert!(store.read(&id, 10).await.expect("ahead").is_empty());
    }

    #[tokio::test]
    async fn lost_history_is_expired_not_a_partial_replay() {
        let server = RedisServer::start();
        let store = RedisStore::connect(&server.url()).await.expect("connect");
        let id = StreamId::random();
        store.create(&id, meta()).await.expect("create");
        store
            .append(&id, &[token(1), token(2), token(3)])
            .await
            .expect("append");
        // Redis evicting (or losing) the list while the meta hash survives.
        let mut conn = raw(&server).await;
        let _: () = conn.del(keys::events(&id)).await.expect("del");
        assert!(matches!(
            store.read(&id, 1).await,
            Err(StoreError::Expired(1))
        ));
        assert!(store.read(&id, 3).await.expect("at the end").is_empty());

        let _: () = conn
            .rpush(keys::events(&id), "not json")
            .await
            .expect("rpush");
        let _: () = conn.hset(keys::meta(&id), "len", 1).await.expect("hset");
        assert!(matches!(
            store.read(&id, 0).await,
            Err(StoreError::Backend(_))
        ));
        let _: () = conn
            .hset(keys::meta(&id), "model", "gpt-nope")
            .await
            .expect("hset");
        assert!(matches!(store.meta(&id).await, Err(StoreError::Backend(_))));
    }

    #[tokio::test]
    async fn survives_a_redis_restart() {
        let mut server = RedisServer::start();
        let store = RedisStore::connect(&server.url()).await.expect("connect");
        let old = StreamId::random();
        store.create(&old, meta()).await.expect("create");
        store.append(&old, &[token(1)]).await.expect("append");

        server.process.kill();
        assert!(matches!(
            store.meta(&old).await,
            Err(StoreError::Backend(_))
        ));
        assert!(!store.ping().await);

        server.restart();
        // The first call after the outage may still fail while the manager reconnects.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match store.meta(&old).await {
                Err(StoreError::NotFound) => break,
                Err(StoreError::Backend(_)) => {}
                other => panic!("the restarted Redis is empty, got {other:?}"),
            }
            assert!(Instant::now() < deadline, "the store reconnects");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(store.ping().await);

        let new = StreamId::random();
        store
            .create(&new, meta())
            .await
            .expect("create after restart");
        store
            .append(&new, &[token(1), token(2)])
            .await
            .expect("append after restart");
        assert_eq!(store.read(&new, 1).await.expect("read")[0].seq, 2);
    }
}
