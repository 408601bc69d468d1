//! What the hub and the tasks it spawns share: the configuration, this replica's id, the
//! generators, the backends and the lifecycle.
//!
//! The hub holds a [`Context`] and hands it to each [`crate::owner::Owner`] and
//! [`crate::mirror::Mirror`]; those tasks never hold the hub: they tell it what comes next
//! through their return value (follow a released stream, forget a mirror, own a stream taken
//! over), so the hub is the only module that knows both.

use std::sync::Arc;

use crate::{
    bus::Bus,
    config::EdgeConfig,
    lifecycle::Lifecycle,
    request::StreamSpec,
    store::{LeaseTerms, Store, StoreError, StreamMeta},
    stream::StreamState,
    upstream::Generators,
};

/// See the module docs.
pub(crate) struct Context {
    pub(crate) config: Arc<EdgeConfig>,
    /// This replica's id (in leases, logs and traces).
    pub(crate) replica: String,
    pub(crate) generators: Arc<dyn Generators>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) bus: Arc<dyn Bus>,
    /// The edge's shutdown phases and task tracker: every task of the hub goes on it; its
    /// `handover` phase hands the streams over.
    pub(crate) lifecycle: Lifecycle,
}

impl Context {
    /// The owner lease's terms: renewed every third of the TTL; a running stream's keys outlive
    /// its owner's last renewal by the history TTL.
    pub(crate) fn lease_terms(&self) -> LeaseTerms {
        LeaseTerms {
            ttl: self.config.lease_ttl(),
            keep: self.config.history_ttl() + self.config.lease_ttl(),
        }
    }

    /// Records a running stream again in a store that forgot it (a Redis restart without
    /// persistence), owned here at `epoch`; true when this call recorded it (false: someone
    /// else did first). The caller writes the history.
    pub(crate) async fn restore(
        &self,
        state: &StreamState,
        spec: &StreamSpec,
        epoch: u64,
    ) -> Result<bool, StoreError> {
        let mut meta = StreamMeta::running(spec, &self.replica);
        meta.epoch = epoch;
        meta.stop_requested = state.cancel.is_cancelled();
        self.store.create(&state.id, meta, self.lease_terms()).await
    }
}
