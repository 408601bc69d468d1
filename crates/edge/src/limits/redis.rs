//! The tenant limits of every replica, in Redis.
//!
//! Both limits are checked and updated atomically by one Lua script ([`LIMIT_LUA`], run with
//! `EVALSHA`, loaded on `NOSCRIPT`) using Redis's clock, so every replica enforces the same
//! totals. Keys carry the tenant as their hash tag (one slot per tenant; names in
//! [`crate::redis_keys`]): `tokenfan:{tenant:<base64url tenant>}:bucket` (HASH `tokens`, `at`)
//! and `tokenfan:{tenant:<base64url tenant>}:active` (ZSET stream id → lease expiry, ms), so on
//! a Redis Cluster the script runs on the one master that holds the tenant's slot. The
//! connection is the store's ([`RedisConn`], shared).

use std::{
    sync::{Arc, LazyLock},
    time::Duration,
};

use ::redis::Script;

use super::{Limiter, Limits, Policy, Unreachable, Verdict};
use crate::{
    ids::StreamId,
    redis_conn::{RedisArgs, RedisConn},
    redis_keys as keys,
};

/// `KEYS`: the tenant's bucket, its active set. `ARGV`: op (`admit`, `renew`, `release`),
/// stream id, lease ms, rate per second, burst, max concurrent.
///
/// `admit`: drops lapsed entries; refuses `{0, retry_ms}` when the tenant has `max` running
/// streams (max > 0), `{-1, retry_ms}` when its bucket holds less than one token (rate > 0);
/// else takes a token, adds the stream with a lease, and returns `{1, 0}`. `renew` pushes the
/// lease of a stream still counted; `release` removes it. Time is Redis's (`TIME`), so
/// replicas with skewed clocks agree.
pub(crate) const LIMIT_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local op, id, lease = ARGV[1], ARGV[2], tonumber(ARGV[3])
if op == 'release' then
  redis.call('ZREM', KEYS[2], id)
  return {1, 0}
end
if op == 'renew' then
  if redis.call('ZADD', KEYS[2], 'XX', 'CH', now + lease, id) == 1 then
    redis.call('PEXPIRE', KEYS[2], lease)
  end
  return {1, 0}
end
local rate, burst, max = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if max > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= max then
    return {0, 1000}
  end
end
if rate > 0 then
  local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
  local tokens = tonumber(state[1]) or burst
  local at = tonumber(state[2]) or now
  if now > at then
    tokens = math.min(burst, tokens + (now - at) * rate / 1000)
  end
  if tokens < 1 then
    return {-1, math.ceil((1 - tokens) * 1000 / rate)}
  end
  redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens - 1), 'at', string.format('%d', now))
  redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
end
if max > 0 then
  redis.call('ZADD', KEYS[2], string.format('%d', now + lease), id)
  redis.call('PEXPIRE', KEYS[2], lease)
end
return {1, 0}
";

static LIMIT: LazyLock<Script> = LazyLock::new(|| Script::new(LIMIT_LUA));

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Buckets and counted streams per tenant, in Redis (one server or a cluster).
#[derive(Debug)]
pub(crate) struct RedisLimits {
    conn: RedisConn,
    policy: Policy,
}

impl RedisLimits {
    /// Limits on `conn` (a clone of the store's connection, or one of their own).
    pub(crate) fn new(conn: RedisConn, policy: Policy) -> Self {
        Self { conn, policy }
    }

    /// Runs the script's `op` for stream `id` of `tenant`: its verdict and retry delay (ms).
    async fn script(
        &self,
        op: &str,
        tenant: &str,
        id: &StreamId,
    ) -> Result<(i64, i64), Unreachable> {
        let mut invocation = LIMIT.prepare_invoke();
        invocation
            .key(keys::tenant_bucket(tenant))
            .key(keys::tenant_active(tenant))
            .arg(op)
            .arg(id.as_str())
            .arg(millis(self.policy.lease))
            .arg(self.policy.rate.to_string())
            .arg(self.policy.burst)
            .arg(self.policy.max_concurrent);
        let mut conn = self.conn.clone();
        invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|err: ::redis::RedisError| {
                // Counted once, here, like the store's own Redis calls.
                metrics::counter!("tokenfan_edge_backend_errors_total", "backend" => "redis")
                    .increment(1);
                Unreachable(err.to_string())
            })
    }
}

impl Limiter {
    /// Limits shared through the Redis at `url`, on a connection of their own.
    pub async fn redis(
        url: &str,
        rate: f64,
        burst: u32,
        max_concurrent: u32,
        lease: Duration,
    ) -> anyhow::Result<Self> {
        Self::redis_with(
            url,
            &RedisArgs::default(),
            rate,
            burst,
            max_concurrent,
            lease,
        )
        .await
    }

    /// Limits shared through the Redis (one server or a cluster) at `url`, on a connection of
    /// their own made with the options of `args` (TLS, credentials; see
    /// [`crate::redis_conn`]). The edge itself shares the store's connection instead.
    pub async fn redis_with(
        url: &str,
        args: &RedisArgs,
        rate: f64,
        burst: u32,
        max_concurrent: u32,
        lease: Duration,
    ) -> anyhow::Result<Self> {
        let conn = RedisConn::connect(url, args).await?;
        let policy = Policy {
            rate,
            burst,
            max_concurrent,
            lease,
        };
        Ok(Self::new(policy, Arc::new(RedisLimits::new(conn, policy))))
    }
}

#[async_trait::async_trait]
impl Limits for RedisLimits {
    async fn admit(&self, tenant: &str, id: &StreamId) -> Result<Verdict, Unreachable> {
        let (verdict, retry_ms) = self.script("admit", tenant, id).await?;
        let retry_ms = u64::try_from(retry_ms).unwrap_or(0);
        Ok(match verdict {
            1 => Verdict::Admitted,
            0 => Verdict::TooManyRunning(retry_ms),
            _ => Verdict::TooFast(retry_ms),
        })
    }

    async fn renew(&self, tenant: &str, id: &StreamId) -> Result<(), Unreachable> {
        self.script("renew", tenant, id).await.map(drop)
    }

    async fn release(&self, tenant: &str, id: &StreamId) -> Result<(), Unreachable> {
        self.script("release", tenant, id).await.map(drop)
    }
}
