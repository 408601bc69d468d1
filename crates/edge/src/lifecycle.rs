//! The edge's cancellation tree and the tracker of every task it spawns. `crate::start`
//! cancels the phases in order; cancelling the root stops everything at once.

use std::future::Future;

use tokio::task::JoinHandle;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// One root token, a child token per shutdown phase, one tracker for every task.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    pub(crate) root: CancellationToken,
    /// Phase 1, stop accepting: the listener stops, streaming responses and sockets end
    /// (clients reconnect elsewhere), `/readyz` answers 503.
    pub(crate) accepting: CancellationToken,
    /// Phase 2, in a cluster: owners stop without a terminal event and the other replicas take
    /// their streams over.
    pub(crate) handover: CancellationToken,
    /// Phase 3: the background loops (sweep, control requests, store watch, tenant limits,
    /// readiness checks, the admin listener).
    pub(crate) background: CancellationToken,
    /// Every task the edge spawns; all of them are waited for last.
    pub(crate) tasks: TaskTracker,
}

impl Default for Lifecycle {
    fn default() -> Self {
        let root = CancellationToken::new();
        Self {
            accepting: root.child_token(),
            handover: root.child_token(),
            background: root.child_token(),
            root,
            tasks: TaskTracker::new(),
        }
    }
}

impl Lifecycle {
    /// Spawns `task` on the tracker (waited for at shutdown).
    pub(crate) fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tasks.spawn(task)
    }
}
