//! Open connections per client address (`--max-connections-per-ip`), counted by the listener
//! ([`crate::server`]) for the life of each connection.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Open connections per client address (see `--max-connections-per-ip`).
#[derive(Clone, Debug, Default)]
pub(crate) struct PerIp {
    max: usize,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One connection counted against its address; uncounted on drop.
#[derive(Debug)]
pub(crate) struct IpPermit {
    ip: IpAddr,
    counts: Option<Arc<Mutex<HashMap<IpAddr, usize>>>>,
}

impl PerIp {
    /// A cap of `max` connections per address (0 = none).
    pub(crate) fn new(max: usize) -> Self {
        Self {
            max,
            counts: Arc::default(),
        }
    }

    /// Counts a connection from `ip`; `None` when the address is at its cap.
    pub(crate) fn try_acquire(&self, ip: IpAddr) -> Option<IpPermit> {
        if self.max == 0 {
            return Some(IpPermit { ip, counts: None });
        }
        let mut counts = lock(&self.counts);
        let n = counts.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(IpPermit {
            ip,
            counts: Some(self.counts.clone()),
        })
    }
}

impl Drop for IpPermit {
    fn drop(&mut self) {
        if let Some(counts) = &self.counts {
            let mut counts = lock(counts);
            if let Some(n) = counts.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&self.ip);
                }
            }
        }
    }
}
