//! One stream's shared state on this replica, and subscriptions to it.
//!
//! The stream's events live in one append-only vector shared by every subscriber: the history
//! *is* the queue. A subscription is a cursor into it; one that found nothing pending leaves its
//! waker in the stream's wait list under the same lock, and the next append wakes the list, so
//! subscribing at `after = N` takes the history and the live tail under one lock, with no seam
//! where an event could be missed or doubled, and a slow subscriber costs no memory of its own. A subscriber more than `queue` events behind gets its pending
//! tokens coalesced into one event (texts joined, seq of the last); more than `max_bytes`
//! behind, it is closed with `slow_consumer` and may resume by seq.

use std::{
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll, Waker},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    error::ApiError,
    event::{Event, EventKind, FinishReason},
    ids::StreamId,
};

/// Where a stream stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamStatus {
    /// Still generating.
    Running,
    /// Finished with `stop` or `length`.
    Done,
    /// Stopped by a client or the detach grace.
    Cancelled,
    /// Failed; the terminal event is an `error`.
    Error,
}

impl StreamStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamStatus::Running => "running",
            StreamStatus::Done => "done",
            StreamStatus::Cancelled => "cancelled",
            StreamStatus::Error => "error",
        }
    }

    /// The status a stream has once `event` is its last.
    pub fn of(event: &Event) -> Self {
        match &event.kind {
            EventKind::Token { .. } => StreamStatus::Running,
            EventKind::Done {
                finish_reason: FinishReason::Cancelled,
                ..
            } => StreamStatus::Cancelled,
            EventKind::Done { .. } => StreamStatus::Done,
            EventKind::Error { .. } => StreamStatus::Error,
        }
    }
}

/// Limits applied to each subscriber.
#[derive(Debug, Clone, Copy)]
pub struct SubscriberLimits {
    /// Pending events past which tokens are coalesced.
    pub queue: usize,
    /// Pending bytes past which the subscriber is closed with `slow_consumer`.
    pub max_bytes: usize,
}

struct Inner {
    events: Vec<Arc<Event>>,
    status: StreamStatus,
    ended_at: Option<Instant>,
    /// Wakers of the tasks waiting for the next append: at most one per subscription per
    /// round (a subscription remembers its slot), emptied by every append.
    waiting: Vec<Waker>,
    /// Appends so far: a slot in `waiting` belongs to the round it was taken in.
    round: u64,
}

impl Inner {
    /// Leaves `waker` to be woken by the next append, in the slot `slot` names when it was
    /// taken this round (a subscription polled again before anything came), else in a new one.
    fn wait(&mut self, slot: &mut Option<(u64, usize)>, waker: &Waker) {
        if let Some((round, i)) = *slot
            && round == self.round
            && let Some(w) = self.waiting.get_mut(i)
        {
            if !w.will_wake(waker) {
                w.clone_from(waker);
            }
            return;
        }
        *slot = Some((self.round, self.waiting.len()));
        self.waiting.push(waker.clone());
    }
}

/// A stream as this replica knows it.
pub struct StreamState {
    /// The stream's id.
    pub id: StreamId,
    /// The model it runs.
    pub model: &'static str,
    /// Creation time, Unix seconds (OpenAI's `created`).
    pub created_unix: u64,
    inner: Mutex<Inner>,
    /// Subscribers attached now (plus touches from polls); the owner's detach-grace timer
    /// watches it.
    attached: watch::Sender<usize>,
    /// Cancelled by an explicit stop or by the detach grace; the owner task watches it.
    pub cancel: CancellationToken,
    limits: SubscriberLimits,
    /// The highest seq the stream can reach (`max_tokens` + 1): cursors past it are refused.
    max_seq: u64,
    /// Whether this replica runs the stream's owner task (else it mirrors another replica's).
    owned: AtomicBool,
    /// The highest ownership epoch this replica owned the stream at (0: never owned here).
    epoch: AtomicU64,
    /// When a poll last showed interest without attaching (a mirror relays it to the owner).
    touched_at: Mutex<Option<Instant>>,
    /// The tenant that created the stream; every other tenant is told it does not exist.
    tenant: Arc<str>,
    /// The stream's request as stored ([`crate::request::StreamSpec::to_json`]), so this
    /// replica can record the stream again in a store that lost it.
    spec_json: Arc<str>,
    /// The W3C `traceparent` of the owner's stream span, when the stream is traced: set by the
    /// owner here, or learnt from the bus by a mirror. Resume, cancel and failover spans on
    /// this replica join the stream's trace through it.
    traceparent: Mutex<Option<Arc<str>>>,
}

impl std::fmt::Debug for StreamState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamState")
            .field("id", &self.id)
            .field("status", &self.status())
            .finish()
    }
}

impl StreamState {
    /// A new, running stream with no events that ends by seq `max_seq` at the latest.
    pub fn new(id: StreamId, model: &'static str, limits: SubscriberLimits, max_seq: u64) -> Self {
        Self {
            id,
            model,
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            inner: Mutex::new(Inner {
                events: Vec::new(),
                status: StreamStatus::Running,
                ended_at: None,
                waiting: Vec::new(),
                round: 0,
            }),
            attached: watch::channel(0).0,
            cancel: CancellationToken::new(),
            limits,
            max_seq,
            owned: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            touched_at: Mutex::new(None),
            tenant: Arc::from(crate::tenant::DEFAULT_TENANT),
            spec_json: Arc::from(""),
            traceparent: Mutex::new(None),
        }
    }

    /// The owner's stream span as a W3C `traceparent`, if known here.
    pub fn traceparent(&self) -> Option<Arc<str>> {
        self.traceparent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records the owner's stream span (the owner's own, or one learnt from the bus).
    pub(crate) fn set_traceparent(&self, traceparent: Option<Arc<str>>) {
        if traceparent.is_some() {
            *self.traceparent.lock().unwrap_or_else(|e| e.into_inner()) = traceparent;
        }
    }

    /// The same stream, owned by `tenant`.
    pub(crate) fn with_tenant(mut self, tenant: &str) -> Self {
        self.tenant = Arc::from(tenant);
        self
    }

    /// The same stream, with its stored request.
    pub(crate) fn with_spec_json(mut self, spec_json: String) -> Self {
        self.spec_json = Arc::from(spec_json);
        self
    }

    /// The stream's request as stored.
    pub fn spec_json(&self) -> &str {
        &self.spec_json
    }

    /// The tenant that created the stream.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// Whether this replica owns the stream (runs its generator call).
    pub fn is_owned(&self) -> bool {
        self.owned.load(Ordering::Acquire)
    }

    /// Marks this replica as the stream's owner, or not.
    pub(crate) fn set_owned(&self, owned: bool) {
        self.owned.store(owned, Ordering::Release);
    }

    /// The highest ownership epoch this replica owned the stream at (0: never).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Records that this replica owns the stream at `epoch`.
    pub(crate) fn set_epoch(&self, epoch: u64) {
        self.epoch.fetch_max(epoch, Ordering::AcqRel);
    }

    /// Subscribers attached on this replica now.
    pub fn attached_count(&self) -> usize {
        *self.attached.borrow()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock would be a bug; keep serving the other streams.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Current status.
    pub fn status(&self) -> StreamStatus {
        self.lock().status
    }

    /// Seq of the last event (0 before the first).
    pub fn last_seq(&self) -> u64 {
        self.lock().events.len() as u64
    }

    /// When the stream ended, if it did.
    pub fn ended_at(&self) -> Option<Instant> {
        self.lock().ended_at
    }

    /// Appends a batch of consecutive events and wakes the subscribers. Events whose seq is
    /// already present are skipped; nothing is accepted after the terminal event.
    pub fn publish(&self, batch: &[Arc<Event>]) {
        let mut woken = {
            let mut inner = self.lock();
            let before = inner.events.len();
            for event in batch {
                if inner.status != StreamStatus::Running {
                    break;
                }
                if event.seq != inner.events.len() as u64 + 1 {
                    continue;
                }
                inner.status = StreamStatus::of(event);
                if event.is_terminal() {
                    inner.ended_at = Some(Instant::now());
                }
                inner.events.push(event.clone());
            }
            if inner.events.len() == before {
                return;
            }
            inner.round += 1;
            std::mem::take(&mut inner.waiting)
        };
        // Woken outside the lock: a woken subscriber may run at once on another thread.
        for waker in woken.drain(..) {
            waker.wake();
        }
        // Hand the list's capacity back unless a subscriber already started the next round.
        let mut inner = self.lock();
        if inner.waiting.is_empty() {
            inner.waiting = woken;
        }
    }

    /// Refuses a cursor past the terminal event (or, while running, past the highest seq the
    /// stream can reach). A cursor ahead of what this replica has is fine while running: a
    /// client may have read further on another replica; it waits for the events after it.
    fn check_cursor(&self, inner: &Inner, after: u64) -> Result<(), ApiError> {
        let last = inner.events.len() as u64;
        let limit = if inner.status == StreamStatus::Running {
            self.max_seq
        } else {
            last
        };
        if after > limit {
            return Err(ApiError::CursorOutOfRange { after, last });
        }
        Ok(())
    }

    /// Events after `after` (for polls), checking the cursor.
    pub fn events_after(&self, after: u64) -> Result<(StreamStatus, Vec<Arc<Event>>), ApiError> {
        let inner = self.lock();
        self.check_cursor(&inner, after)?;
        let events = inner.events.get(after as usize..).unwrap_or_default();
        Ok((inner.status, events.to_vec()))
    }

    /// Subscribes from `after`: every later event, exactly once, in order.
    pub fn subscribe(self: &Arc<Self>, after: u64) -> Result<Subscription, ApiError> {
        let backlog_end = {
            let inner = self.lock();
            self.check_cursor(&inner, after)?;
            inner.events.len() as u64
        };
        self.attached.send_modify(|n| *n += 1);
        Ok(Subscription {
            state: self.clone(),
            cursor: after,
            backlog_end,
            finished: false,
            slot: None,
        })
    }

    /// Restarts the detach-grace clock without attaching (polls).
    pub fn touch(&self) {
        *self.touched_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        self.attached.send_modify(|_| {});
    }

    /// Whether anyone attached here or polled within `window` (a mirror relays this interest
    /// to the owner).
    pub(crate) fn has_interest(&self, window: std::time::Duration) -> bool {
        self.attached_count() > 0
            || self
                .touched_at
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some_and(|t| t.elapsed() < window)
    }

    /// Watches the attached count (the owner's detach grace).
    pub fn attached(&self) -> watch::Receiver<usize> {
        self.attached.subscribe()
    }

    /// Waits until the stream has its terminal event.
    pub async fn wait_finished(&self) {
        let mut slot = None;
        std::future::poll_fn(|cx| {
            let mut inner = self.lock();
            if inner.status != StreamStatus::Running {
                return Poll::Ready(());
            }
            inner.wait(&mut slot, cx.waker());
            Poll::Pending
        })
        .await;
    }
}

/// Why a subscription ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The terminal event was delivered.
    Finished,
    /// The subscriber fell more than the byte cap behind; it may resume from its last seq.
    SlowConsumer {
        /// The last seq it received.
        last_seq: u64,
    },
}

/// A cursor into a stream; counts as attached until dropped.
pub struct Subscription {
    state: Arc<StreamState>,
    cursor: u64,
    /// The history that existed when it subscribed ends here: replaying it is not lagging, so
    /// it is handed out in plain batches, outside the coalescing and byte-cap rules.
    backlog_end: u64,
    finished: bool,
    /// Its slot in the stream's wait list, and the round it was taken in.
    slot: Option<(u64, usize)>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("stream", &self.state.id)
            .field("cursor", &self.cursor)
            .finish()
    }
}

impl Subscription {
    /// The stream.
    pub fn stream(&self) -> &Arc<StreamState> {
        &self.state
    }

    /// Seq of the last event handed out.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Seq of the last event that existed when it subscribed: batches up to it are history
    /// being replayed, later ones are live.
    pub fn backlog_end(&self) -> u64 {
        self.backlog_end
    }

    /// The events available now, without waiting (may be empty).
    pub fn try_batch(&mut self) -> Result<Vec<Arc<Event>>, Closed> {
        self.take(None)
    }

    /// The events available now; when there are none, `waker` is woken by the next append.
    fn take(&mut self, waker: Option<&Waker>) -> Result<Vec<Arc<Event>>, Closed> {
        if self.finished {
            return Err(Closed::Finished);
        }
        let mut inner = self.state.lock();
        let limits = self.state.limits;
        let pending = inner.events.get(self.cursor as usize..).unwrap_or_default();
        let batch = if pending.is_empty() {
            if inner.status != StreamStatus::Running {
                // At or past the end of a finished stream (a cursor that was ahead of the
                // stream while it ran): nothing will ever come, so the subscription ends
                // instead of waiting forever.
                self.finished = true;
                return Err(Closed::Finished);
            }
            if let Some(waker) = waker {
                inner.wait(&mut self.slot, waker);
            }
            return Ok(Vec::new());
        } else if self.cursor < self.backlog_end {
            // Replaying history that existed at subscribe time, a queue's worth at a time.
            let n = ((self.backlog_end - self.cursor) as usize).min(limits.queue);
            pending[..n].to_vec()
        } else {
            let bytes: usize = pending.iter().map(|e| e.size()).sum();
            if bytes > limits.max_bytes {
                self.finished = true;
                metrics::counter!("tokenfan_edge_slow_consumer_closes_total").increment(1);
                return Err(Closed::SlowConsumer {
                    last_seq: self.cursor,
                });
            }
            if pending.len() > limits.queue {
                coalesce(pending)
            } else {
                pending.to_vec()
            }
        };
        drop(inner);
        if let Some(last) = batch.last() {
            self.cursor = last.seq;
            self.finished = last.is_terminal();
        }
        Ok(batch)
    }

    /// The next events, at least one and all that are available; when there are none, the
    /// task is woken by the next append.
    pub fn poll_batch(&mut self, cx: &mut Context<'_>) -> Poll<Result<Vec<Arc<Event>>, Closed>> {
        match self.take(Some(cx.waker())) {
            Ok(batch) if batch.is_empty() => Poll::Pending,
            other => Poll::Ready(other),
        }
    }

    /// Waits for the next events: at least one, all that are available.
    pub(crate) async fn next_batch(&mut self) -> Result<Vec<Arc<Event>>, Closed> {
        std::future::poll_fn(|cx| self.poll_batch(cx)).await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some((round, i)) = self.slot {
            // Let go of the waiting task now rather than at the next append.
            let mut inner = self.state.lock();
            if round == inner.round {
                if i + 1 == inner.waiting.len() {
                    inner.waiting.pop();
                } else if let Some(w) = inner.waiting.get_mut(i) {
                    w.clone_from(Waker::noop());
                }
            }
        }
        self.state
            .attached
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Joins the pending token events into one (seq of the last), keeping the terminal event.
fn coalesce(pending: &[Arc<Event>]) -> Vec<Arc<Event>> {
    let mut text = String::new();
    let mut last_token = None;
    let mut terminal = None;
    for event in pending {
        match event.text() {
            Some(t) => {
                text.push_str(t);
                last_token = Some((event.seq, event.emitted_at));
            }
            None => terminal = Some(event.clone()),
        }
    }
    metrics::counter!("tokenfan_edge_coalesced_events_total").increment(pending.len() as u64);
    let mut out = Vec::with_capacity(2);
    if let Some((seq, emitted_at)) = last_token {
        let kind = EventKind::Token { text };
        out.push(Arc::new(Event::with_emit_time(seq, kind, emitted_at)));
    }
    out.extend(terminal);
    out
}

/// A future polled again only once it has woken its task: in between, polling it costs an
/// atomic swap and a waker check. For waits that seldom end (a stop, a handover, a shutdown, the
/// detach grace) on loops that run once per batch of tokens, where polling the wait itself
/// would take its locks every time.
pub(crate) struct Quiet<F> {
    future: std::pin::Pin<Box<F>>,
    flag: Arc<WakeFlag>,
}

/// Set by the inner future's wake-up; wakes the task that polled the [`Quiet`] last.
struct WakeFlag {
    woken: AtomicBool,
    task: futures::task::AtomicWaker,
}

impl std::task::Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: std::future::Future> Quiet<F> {
    /// Wraps `future`; the first poll polls it.
    pub(crate) fn new(future: F) -> Self {
        Self {
            future: Box::pin(future),
            flag: Arc::new(WakeFlag {
                woken: AtomicBool::new(true),
                task: futures::task::AtomicWaker::new(),
            }),
        }
    }
}

impl<F: std::future::Future> std::future::Future for Quiet<F> {
    type Output = F::Output;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // Registered before the flag is read: a wake-up after the read wakes this task.
        self.flag.task.register(cx.waker());
        if !self.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let waker = Waker::from(self.flag.clone());
        self.future.as_mut().poll(&mut Context::from_waker(&waker))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use std::future::Future as _;

    use super::*;
    use crate::event::Usage;

    fn state(queue: usize, max_bytes: usize) -> Arc<StreamState> {
        Arc::new(StreamState::new(
            StreamId::random(),
            "tokenfan-mock",
            SubscriberLimits { queue, max_bytes },
            1000,
        ))
    }

    fn token(seq: u64, text: &str) -> Arc<Event> {
        Arc::new(Event::new(seq, EventKind::Token { text: text.into() }))
    }

    fn done(seq: u64) -> Arc<Event> {
        Arc::new(Event::new(
            seq,
            EventKind::Done {
                finish_reason: FinishReason::Stop,
                usage: Usage::default(),
            },
        ))
    }

    async fn drain(sub: &mut Subscription) -> Vec<Arc<Event>> {
        let mut out = Vec::new();
        while let Ok(batch) = tokio::time::timeout(Duration::from_secs(5), sub.next_batch())
            .await
            .expect("no hang")
        {
            out.extend(batch);
        }
        out
    }

    #[tokio::test]
    async fn subscribers_at_any_cursor_get_every_later_event_once() {
        let s = state(1000, 1 << 20);
        s.publish(&[token(1, "a"), token(2, "b")]);
        let mut from0 = s.subscribe(0).expect("ok");
        let mut from2 = s.subscribe(2).expect("ok");
        assert!(
            s.subscribe(1001).is_err(),
            "beyond the highest possible seq"
        );
        // A publish racing the subscription lands exactly once.
        let publisher = {
            let s = s.clone();
            tokio::spawn(async move {
                for seq in 3..=50 {
                    s.publish(&[token(seq, "x")]);
                    tokio::task::yield_now().await;
                }
                s.publish(&[done(51)]);
            })
        };
        let mut mid = s.subscribe(1).expect("ok");
        let (a, b, c) = tokio::join!(drain(&mut from0), drain(&mut from2), drain(&mut mid));
        publisher.await.expect("publisher");
        let seqs = |v: &[Arc<Event>]| v.iter().map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(seqs(&a), (1..=51).collect::<Vec<_>>());
        assert_eq!(seqs(&b), (3..=51).collect::<Vec<_>>());
        assert_eq!(seqs(&c), (2..=51).collect::<Vec<_>>());
        assert_eq!(s.status(), StreamStatus::Done);
    }

    #[tokio::test]
    async fn duplicates_and_late_events_are_ignored() {
        let s = state(1000, 1 << 20);
        s.publish(&[token(1, "a"), token(2, "b")]);
        s.publish(&[token(2, "B"), token(4, "gap"), token(3, "c")]);
        s.publish(&[done(4), token(5, "after end")]);
        let (_, events) = s.events_after(0).expect("ok");
        let texts: Vec<_> = events.iter().filter_map(|e| e.text()).collect();
        assert_eq!(texts, ["a", "b", "c"]);
        assert_eq!(events.len(), 4);
    }

    #[tokio::test]
    async fn a_lagging_subscriber_gets_coalesced_text_then_slow_consumer() {
        let s = state(4, 1 << 20);
        let mut sub = s.subscribe(0).expect("ok");
        let tokens: Vec<_> = (1..=10).map(|i| token(i, &i.to_string())).collect();
        s.publish(&tokens);
        let batch = sub.next_batch().await.expect("batch");
        assert_eq!(batch.len(), 1);
        assert_eq!((batch[0].seq, batch[0].text()), (10, Some("12345678910")));

        let tight = state(4, 60);
        let mut slow = tight.subscribe(0).expect("ok");
        tight.publish(&tokens);
        assert_eq!(
            slow.next_batch().await.expect_err("closed"),
            Closed::SlowConsumer { last_seq: 0 }
        );
        // It may resume by seq: history that existed at subscribe time is replayed in plain
        // batches, never refused as lag.
        let mut resumed = tight.subscribe(0).expect("ok");
        let first = resumed.next_batch().await.expect("replay");
        assert_eq!(
            first.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        let rest = resumed.next_batch().await.expect("replay");
        assert_eq!(rest[0].seq, 5);
    }

    #[tokio::test]
    async fn cursors_ahead_wait_while_running_and_past_the_end_are_refused() {
        let s = state(8, 1 << 20);
        s.publish(&[token(1, "a")]);
        let mut ahead = s
            .subscribe(3)
            .expect("a cursor another replica may have reached");
        assert!(s.events_after(3).expect("ok").1.is_empty());
        s.publish(&[token(2, "b"), token(3, "c"), token(4, "d"), done(5)]);
        let got = ahead.next_batch().await.expect("events after 3");
        assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 5]);
        assert!(s.subscribe(6).is_err(), "past the terminal event");
        assert!(s.events_after(6).is_err());
        assert!(s.subscribe(5).is_ok(), "at the terminal event");
    }

    #[tokio::test]
    async fn a_cursor_at_or_past_the_end_ends_once_the_stream_has_ended() {
        let s = state(8, 1 << 20);
        s.publish(&[token(1, "a")]);
        let mut ahead = s.subscribe(4).expect("ahead while running");
        s.publish(&[token(2, "b"), done(3)]);
        let ended = tokio::time::timeout(Duration::from_secs(5), ahead.next_batch()).await;
        assert_eq!(ended.expect("no hang").err(), Some(Closed::Finished));
        let mut at_end = s.subscribe(3).expect("at the terminal event");
        assert_eq!(at_end.try_batch().err(), Some(Closed::Finished));
        let mut running = state(8, 1 << 20).subscribe(1).expect("ahead");
        let pending = running
            .try_batch()
            .expect("a running stream may still get there");
        assert!(pending.is_empty());
    }

    /// Counts its wakes.
    struct Counting(AtomicU64);

    impl std::task::Wake for Counting {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_waiting_subscriber_holds_one_slot_and_is_woken_once_per_append() {
        let s = state(8, 1 << 20);
        let counter = Arc::new(Counting(AtomicU64::new(0)));
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        let mut sub = s.subscribe(0).expect("ok");
        for _ in 0..5 {
            assert!(sub.poll_batch(&mut cx).is_pending());
        }
        assert_eq!(s.lock().waiting.len(), 1, "polled again: the same slot");
        s.publish(&[token(1, "a")]);
        assert_eq!(counter.0.load(Ordering::SeqCst), 1);
        assert!(s.lock().waiting.is_empty());
        let Poll::Ready(Ok(batch)) = sub.poll_batch(&mut cx) else {
            panic!("the appended event is ready");
        };
        assert_eq!(batch.len(), 1);

        // A subscription dropped while waiting lets go of its waker.
        let mut other = s.subscribe(1).expect("ok");
        assert!(sub.poll_batch(&mut cx).is_pending());
        assert!(other.poll_batch(&mut cx).is_pending());
        drop(other);
        assert_eq!(s.lock().waiting.len(), 1, "the last slot is given back");
        drop(sub);
        assert!(s.lock().waiting.is_empty());
        s.publish(&[token(2, "b")]);
        assert_eq!(counter.0.load(Ordering::SeqCst), 1, "nobody was waiting");
    }

    #[tokio::test]
    async fn a_quiet_wait_ends_when_its_future_wakes_it() {
        let token = CancellationToken::new();
        let mut quiet = Quiet::new(token.clone().cancelled_owned());
        let counter = Arc::new(Counting(AtomicU64::new(0)));
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        let mut pinned = std::pin::Pin::new(&mut quiet);
        for _ in 0..3 {
            assert!(pinned.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(counter.0.load(Ordering::SeqCst), 0);
        token.cancel();
        assert_eq!(counter.0.load(Ordering::SeqCst), 1, "the task is woken");
        assert!(pinned.as_mut().poll(&mut cx).is_ready());
        let done = Quiet::new(std::future::ready(7));
        assert_eq!(done.await, 7, "the first poll polls the future");
    }

    #[tokio::test]
    async fn attached_counts_follow_subscriptions() {
        let s = state(8, 1 << 20);
        let rx = s.attached();
        let a = s.subscribe(0).expect("ok");
        let b = s.subscribe(0).expect("ok");
        assert_eq!(*rx.borrow(), 2);
        drop(a);
        drop(b);
        assert_eq!(*rx.borrow(), 0);
    }
}
