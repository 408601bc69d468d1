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
pub struct MemoryLimits {
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
    pub fn new(policy: Policy) -> Self {
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
    pub fn counted(&self, tenant: &str) -> usize {
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
