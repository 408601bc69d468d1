//! The tenant limits of one replica, in memory.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::time::Instant;

use super::{Limiter, Limits, Policy, Unreachable, Verdict};
use crate::ids::StreamId;

struct TenantState {
    tokens: f64,
    refilled: Instant,
    /// Counted streams and their lease expiry.
    active: HashMap<StreamId, Instant>,
}

/// Buckets and counted streams per tenant, in this process.
pub(crate) struct MemoryLimits {
    policy: Policy,
    tenants: Mutex<HashMap<Arc<str>, TenantState>>,
}

impl std::fmt::Debug for MemoryLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemoryLimits")
    }
}

impl MemoryLimits {
    /// Nothing counted yet.
    pub(crate) fn new(policy: Policy) -> Self {
        Self {
            policy,
            tenants: Mutex::new(HashMap::new()),
        }
    }

    fn tenants(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, TenantState>> {
        self.tenants.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn admit_now(&self, tenant: &str, id: &StreamId) -> Verdict {
        let Policy {
            rate,
            burst,
            max_concurrent,
            lease,
        } = self.policy;
        let now = Instant::now();
        let burst = f64::from(burst);
        let mut tenants = self.tenants();
        let state = match tenants.get_mut(tenant) {
            Some(s) => s,
            None => tenants.entry(Arc::from(tenant)).or_insert(TenantState {
                tokens: burst,
                refilled: now,
                active: HashMap::new(),
            }),
        };
        if max_concurrent > 0 {
            state.active.retain(|_, until| *until > now);
            if state.active.len() >= max_concurrent as usize {
                return Verdict::TooManyRunning(1000);
            }
        }
        if rate > 0.0 {
            let elapsed = now.duration_since(state.refilled).as_secs_f64();
            state.tokens = (state.tokens + elapsed * rate).min(burst);
            state.refilled = now;
            if state.tokens < 1.0 {
                return Verdict::TooFast(((1.0 - state.tokens) * 1000.0 / rate).ceil() as u64);
            }
            state.tokens -= 1.0;
        }
        if max_concurrent > 0 {
            state.active.insert(id.clone(), now + lease);
        }
        Verdict::Admitted
    }

    /// How many streams of `tenant` are counted now.
    #[cfg(test)]
    pub(crate) fn counted(&self, tenant: &str) -> usize {
        let now = Instant::now();
        self.tenants()
            .get(tenant)
            .map_or(0, |s| s.active.values().filter(|t| **t > now).count())
    }
}

impl Limiter {
    /// In-memory limits.
    pub fn memory(rate: f64, burst: u32, max_concurrent: u32, lease: std::time::Duration) -> Self {
        let policy = Policy {
            rate,
            burst,
            max_concurrent,
            lease,
        };
        Self::new(policy, Arc::new(MemoryLimits::new(policy)))
    }
}

#[async_trait::async_trait]
impl Limits for MemoryLimits {
    async fn admit(&self, tenant: &str, id: &StreamId) -> Result<Verdict, Unreachable> {
        Ok(self.admit_now(tenant, id))
    }

    async fn renew(&self, tenant: &str, id: &StreamId) -> Result<(), Unreachable> {
        if let Some(until) = self
            .tenants()
            .get_mut(tenant)
            .and_then(|s| s.active.get_mut(id))
        {
            *until = Instant::now() + self.policy.lease;
        }
        Ok(())
    }

    async fn release(&self, tenant: &str, id: &StreamId) -> Result<(), Unreachable> {
        if let Some(state) = self.tenants().get_mut(tenant) {
            state.active.remove(id);
        }
        Ok(())
    }

    fn forget_idle(&self) {
        let now = Instant::now();
        let full = f64::from(self.policy.burst);
        let rate = self.policy.rate;
        self.tenants().retain(|_, s| {
            s.active.retain(|_, until| *until > now);
            let tokens = s.tokens + now.duration_since(s.refilled).as_secs_f64() * rate;
            !s.active.is_empty() || (rate > 0.0 && tokens < full)
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::limits::LEASE;

    #[tokio::test(start_paused = true)]
    async fn memory_bucket_refills_at_the_rate_and_concurrency_lapses() {
        let limiter = Limiter::memory(2.0, 3, 0, LEASE);
        for _ in 0..3 {
            limiter
                .admit("a", &StreamId::random())
                .await
                .expect("burst");
        }
        let refused = limiter
            .admit("a", &StreamId::random())
            .await
            .expect_err("empty");
        assert_eq!(
            (refused.status().as_u16(), refused.code()),
            (429, "rate_limited")
        );
        assert_eq!(refused.retry_after(), Some(1));
        limiter
            .admit("b", &StreamId::random())
            .await
            .expect("other tenant");
        tokio::time::advance(Duration::from_millis(500)).await;
        limiter
            .admit("a", &StreamId::random())
            .await
            .expect("one token back");
        assert!(limiter.admit("a", &StreamId::random()).await.is_err());

        let policy = Policy {
            rate: 0.0,
            burst: 1,
            max_concurrent: 2,
            lease: Duration::from_secs(5),
        };
        let memory = Arc::new(MemoryLimits::new(policy));
        let limiter = Arc::new(Limiter::new(policy, memory.clone()));
        let (one, two) = (StreamId::random(), StreamId::random());
        limiter.admit("a", &one).await.expect("1");
        limiter.admit("a", &two).await.expect("2");
        let refused = limiter
            .admit("a", &StreamId::random())
            .await
            .expect_err("full");
        assert_eq!(refused.code(), "concurrency_limited");
        limiter.release("a", &one).await;
        assert_eq!(memory.counted("a"), 1);
        limiter
            .admit("a", &StreamId::random())
            .await
            .expect("released");
        // Entries nobody renews lapse.
        tokio::time::advance(Duration::from_secs(4)).await;
        limiter.renew("a", &two).await;
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(memory.counted("a"), 1, "only the renewed one is left");
    }
}
