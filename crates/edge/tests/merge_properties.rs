//! Property tests of exactly-once delivery under random interleavings.
//!
//! - The shared history ([`StreamState`]): batches published (with re-sent and out-of-order
//!   events), subscribers joining at random cursors (behind, at, ahead of the stream) and
//!   reading at random paces with small queue and byte limits, polls in between. Every
//!   subscriber gets every event after its cursor exactly once, in order — coalesced events
//!   carry exactly the texts they replace — and ends with the terminal event once.
//! - A mirror (a replica following a stream owned elsewhere): the owner's batches reach the
//!   store (sometimes late) and the bus (lost, duplicated, reordered, re-sent, the feed
//!   dropped), the mirror starts at any point and local clients subscribe to it at any point.
//!   The mirrored history ends up exactly the owner's, and its clients get it exactly once.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use proptest::{prelude::*, test_runner::TestCaseError};
use tokenfan_edge::{
    bus::{Bus, BusBatch, BusError, EventFeed},
    config::EdgeConfig,
    event::{Event, EventKind, FinishReason, Usage},
    hub::Hub,
    ids::StreamId,
    request::StreamRequest,
    store::{Store, StreamMeta, memory::MemoryStore},
    stream::{Closed, StreamState, StreamStatus, SubscriberLimits, Subscription},
    tenant::Caller,
    upstream::GeneratorPool,
};
use tokio::sync::mpsc;

// ---------------------------------------------------------------------------------------------
// The source stream and the delivery check

/// A stream's events: tokens with these texts, then the terminal event.
fn source(texts: &[String], terminal: u8) -> Vec<Arc<Event>> {
    let mut events: Vec<Arc<Event>> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            Arc::new(Event::new(
                i as u64 + 1,
                EventKind::Token { text: t.clone() },
            ))
        })
        .collect();
    let seq = events.len() as u64 + 1;
    let kind = match terminal % 4 {
        0 => EventKind::Done {
            finish_reason: FinishReason::Stop,
            usage: Usage {
                prompt_tokens: 1,
                completion_tokens: seq as u32 - 1,
            },
        },
        1 => EventKind::Done {
            finish_reason: FinishReason::Length,
            usage: Usage::default(),
        },
        2 => EventKind::Done {
            finish_reason: FinishReason::Cancelled,
            usage: Usage::default(),
        },
        _ => EventKind::Error {
            code: "generator_unavailable",
            message: "gone".into(),
        },
    };
    events.push(Arc::new(Event::new(seq, kind)));
    events
}

/// Token texts: short, some multi-byte, some with characters JSON escapes.
fn texts(max: usize) -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec("[a-c é中🚀\"\\\\\n]{1,3}", 0..=max)
}

/// What one subscriber received, from `after` on, is every later event of `source` exactly
/// once and in order: each token event's text is the texts of the source tokens since the
/// previous event it got (one, or several coalesced), and it ends with the terminal event.
/// A cursor at or past the terminal event gets nothing.
fn check_delivery(
    source: &[Arc<Event>],
    after: u64,
    got: &[Arc<Event>],
) -> Result<(), TestCaseError> {
    let terminal = source.len() as u64;
    if after >= terminal {
        prop_assert!(got.is_empty(), "after {after} of {terminal}: got {got:?}");
        return Ok(());
    }
    let mut prev = after;
    for event in got {
        prop_assert!(
            prev < event.seq && event.seq <= terminal,
            "seq {} after {prev}",
            event.seq
        );
        let replaced = &source[prev as usize..event.seq as usize];
        match event.text() {
            Some(text) => {
                let mut joined = String::new();
                for e in replaced {
                    let t = e.text();
                    prop_assert!(t.is_some(), "a token event hides the terminal event");
                    joined.push_str(t.unwrap_or_default());
                }
                prop_assert_eq!(text, joined.as_str(), "text of seq {}", event.seq);
            }
            None => {
                prop_assert_eq!(replaced.len(), 1, "the terminal event is never merged");
                prop_assert_eq!(event.json(), replaced[0].json());
            }
        }
        prev = event.seq;
    }
    prop_assert_eq!(prev, terminal, "ends with the terminal event");
    Ok(())
}

/// One client following a stream: its subscription (renewed from its last seq after a
/// slow-consumer close) and what it received.
struct Reader {
    after: u64,
    sub: Subscription,
    got: Vec<Arc<Event>>,
    finished: bool,
}

impl Reader {
    fn last(&self) -> u64 {
        self.got.last().map_or(self.after, |e| e.seq)
    }

    /// One read: checks the batch's shape, or resumes after a slow-consumer close.
    fn read(&mut self, source: &[Arc<Event>], queue: usize) -> Result<(), TestCaseError> {
        if self.finished {
            return Ok(());
        }
        let backlog_end = self.sub.backlog_end();
        match self.sub.try_batch() {
            Ok(batch) => {
                prop_assert!(batch.len() <= queue.max(2), "a batch of {}", batch.len());
                let mut prev = self.last();
                for event in &batch {
                    if event.seq <= backlog_end {
                        // History that existed at subscribe time is replayed as it is.
                        prop_assert_eq!(event.seq, prev + 1);
                        prop_assert_eq!(event.json(), source[prev as usize].json());
                    }
                    prev = event.seq;
                }
                self.got.extend(batch);
            }
            Err(Closed::Finished) => {
                let last = self.last();
                let terminal = source.len() as u64;
                prop_assert!(
                    last >= terminal,
                    "closed as finished at seq {last} of {terminal}"
                );
                self.finished = true;
            }
            Err(Closed::SlowConsumer { last_seq }) => {
                prop_assert_eq!(last_seq, self.last(), "resume from the last seq received");
                prop_assert!(
                    last_seq >= backlog_end,
                    "never closed while replaying history"
                );
                let resumed = self.sub.stream().subscribe(last_seq);
                prop_assert!(
                    resumed.is_ok(),
                    "resuming at {last_seq}: {:?}",
                    resumed.err()
                );
                if let Ok(sub) = resumed {
                    self.sub = sub;
                }
            }
        }
        Ok(())
    }

    /// Reads until the subscription ends (everything is published by then).
    fn drain(&mut self, source: &[Arc<Event>], queue: usize) -> Result<(), TestCaseError> {
        // Each read hands out at least one event or ends the subscription; a slow-consumer
        // resume turns the rest into history, which is never refused.
        for _ in 0..4 * source.len() + 8 {
            if self.finished {
                return check_delivery(source, self.after, &self.got);
            }
            self.read(source, queue)?;
        }
        Err(TestCaseError::fail(format!(
            "the subscription from {} never ended: got up to {}",
            self.after,
            self.last()
        )))
    }
}

// ---------------------------------------------------------------------------------------------
// The shared history

#[derive(Debug, Clone)]
enum Op {
    /// The owner publishes its next batch (`.0` events, re-sending `.1` it already sent).
    Publish(usize, usize),
    /// A batch that skips ahead of the history: ignored.
    PublishAhead(usize),
    /// A client subscribes at a cursor drawn from this number.
    Subscribe(u16),
    /// A client reads what is pending.
    Read(u8),
    /// A poll at a cursor drawn from this number.
    Poll(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1usize..=5, 0usize..=2).prop_map(|(n, back)| Op::Publish(n, back)),
        1 => (1usize..=3).prop_map(Op::PublishAhead),
        2 => any::<u16>().prop_map(Op::Subscribe),
        5 => any::<u8>().prop_map(Op::Read),
        1 => any::<u16>().prop_map(Op::Poll),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        // PROPTEST_CASES raises it for a longer search.
        cases: ProptestConfig::default().cases.max(512),
        // Failures are kept as explicit regression tests, not in a seed file.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_subscriber_gets_every_event_once(
        texts in texts(24),
        terminal in any::<u8>(),
        slack in 0u64..3,
        queue in 2usize..=5,
        tight in any::<bool>(),
        max_bytes in 40usize..400,
        ops in prop::collection::vec(op(), 0..80),
    ) {
        let source = source(&texts, terminal);
        let total = source.len();
        // The highest seq the stream could reach (max_tokens + 1) may lie past its end.
        let max_seq = total as u64 + slack;
        let max_bytes = if tight { max_bytes } else { 1 << 20 };
        let state = Arc::new(StreamState::new(
            StreamId::random(),
            "tokenfan-mock",
            SubscriberLimits { queue, max_bytes },
            max_seq,
        ));
        let mut published = 0usize;
        let mut readers: Vec<Reader> = Vec::new();
        for op in ops {
            let running = published < total;
            match op {
                Op::Publish(n, back) => {
                    let from = published.saturating_sub(back);
                    let to = (published + n).min(total);
                    state.publish(&source[from..to]);
                    published = to;
                }
                Op::PublishAhead(n) => {
                    let from = (published + 1).min(total);
                    let to = (from + n).min(total);
                    state.publish(&source[from..to]);
                }
                Op::Subscribe(pick) => {
                    let after = u64::from(pick) % (max_seq + 2);
                    let limit = if running { max_seq } else { published as u64 };
                    match state.subscribe(after) {
                        Ok(sub) => {
                            prop_assert!(after <= limit, "accepted {after} past {limit}");
                            prop_assert_eq!(sub.backlog_end(), published as u64);
                            readers.push(Reader { after, sub, got: Vec::new(), finished: false });
                        }
                        Err(e) => {
                            prop_assert!(after > limit, "refused {after} within {limit}");
                            prop_assert_eq!(e.code(), "cursor_out_of_range");
                        }
                    }
                }
                Op::Read(k) => {
                    if !readers.is_empty() {
                        let i = usize::from(k) % readers.len();
                        readers[i].read(&source, queue)?;
                    }
                }
                Op::Poll(pick) => {
                    let after = u64::from(pick) % (max_seq + 2);
                    let limit = if running { max_seq } else { published as u64 };
                    match state.events_after(after) {
                        Ok((status, events)) => {
                            prop_assert!(after <= limit);
                            let want = source.get(after as usize..published).unwrap_or_default();
                            prop_assert_eq!(events.len(), want.len());
                            for (e, w) in events.iter().zip(want) {
                                prop_assert_eq!(e.json(), w.json(), "polls are never coalesced");
                            }
                            prop_assert_eq!(status == StreamStatus::Running, running);
                        }
                        Err(e) => {
                            prop_assert!(after > limit);
                            prop_assert_eq!(e.code(), "cursor_out_of_range");
                        }
                    }
                }
            }
            prop_assert_eq!(state.last_seq(), published as u64, "history is the source prefix");
        }
        state.publish(&source[published..]);
        prop_assert_eq!(state.last_seq(), total as u64);
        prop_assert!(state.status() != StreamStatus::Running);
        prop_assert_eq!(state.attached_count(), readers.len());
        for reader in &mut readers {
            reader.drain(&source, queue)?;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A mirror

/// A bus whose deliveries the test makes by hand: what it sends to the current feeds is what
/// the mirror receives; nothing else arrives.
#[derive(Default)]
struct ScriptedBus {
    feeds: Mutex<Vec<mpsc::Sender<BusBatch>>>,
}

impl ScriptedBus {
    fn deliver(&self, events: &[Arc<Event>]) {
        let batch = BusBatch {
            events: events.iter().cloned().collect(),
            traceparent: None,
        };
        let mut feeds = self.feeds.lock().unwrap_or_else(|e| e.into_inner());
        feeds.retain(|tx| !tx.is_closed());
        for tx in feeds.iter() {
            let _ = tx.try_send(batch.clone());
        }
    }

    /// The connection drops: every feed ends.
    fn drop_feeds(&self) {
        self.feeds.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    fn subscribed(&self) -> bool {
        let feeds = self.feeds.lock().unwrap_or_else(|e| e.into_inner());
        feeds.iter().any(|tx| !tx.is_closed())
    }
}

#[async_trait::async_trait]
impl Bus for ScriptedBus {
    async fn publish(
        &self,
        _: &StreamId,
        _: Arc<[Arc<Event>]>,
        _: Option<String>,
    ) -> Result<(), BusError> {
        Ok(())
    }

    async fn subscribe(&self, _: &StreamId) -> Result<EventFeed, BusError> {
        let (tx, rx) = mpsc::channel(1024);
        self.feeds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tx);
        Ok(rx)
    }

    async fn request_cancel(&self, _: &StreamId) -> Result<(), BusError> {
        Ok(())
    }

    async fn cancel_requests(&self) -> Result<mpsc::Receiver<StreamId>, BusError> {
        Ok(mpsc::channel(1).1)
    }
}

#[derive(Debug, Clone)]
enum Step {
    /// The owner publishes its next batch of `.0` events; it reaches the store when `.1`.
    Produce(usize, bool),
    /// The owner writes everything it has to the store (it catches up after store errors).
    StoreCatchUp,
    /// The bus delivers the oldest undelivered batch (twice when true).
    Deliver(bool),
    /// The bus loses the oldest undelivered batch.
    Lose,
    /// The oldest undelivered batch is overtaken by the others.
    Defer,
    /// An already-produced batch arrives again.
    Redeliver(u8),
    /// The bus connection drops the mirror's feed.
    DropFeed,
    /// A request reaches this replica: it starts following the stream (once) and a client
    /// subscribes at a cursor drawn from this number.
    Subscribe(u16),
    /// A client reads what is pending.
    Read(u8),
    /// Time passes (ms).
    Wait(u16),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (1usize..=4, prop::bool::weighted(0.8)).prop_map(|(n, s)| Step::Produce(n, s)),
        1 => Just(Step::StoreCatchUp),
        4 => any::<bool>().prop_map(Step::Deliver),
        1 => Just(Step::Lose),
        1 => Just(Step::Defer),
        1 => any::<u8>().prop_map(Step::Redeliver),
        1 => Just(Step::DropFeed),
        1 => any::<u16>().prop_map(Step::Subscribe),
        3 => any::<u8>().prop_map(Step::Read),
        1 => (0u16..800).prop_map(Step::Wait),
    ]
}

const OWNER: &str = "edge-owner";
const LEASE_TTL_MS: u64 = 300;

/// Lets the mirror handle everything sent to it (time is paused: the sleep ends only once
/// every other task is idle).
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

async fn mirror_case(
    texts: Vec<String>,
    terminal: u8,
    queue: usize,
    steps: Vec<Step>,
) -> Result<(), TestCaseError> {
    let source = source(&texts, terminal);
    let total = source.len();
    let mut config = EdgeConfig::defaults();
    config.streams.lease_ttl_ms = LEASE_TTL_MS;
    config.streams.subscriber_queue = queue;
    let config = Arc::new(config);
    let store = Arc::new(MemoryStore::default());
    let bus = Arc::new(ScriptedBus::default());
    let generators = Arc::new(
        GeneratorPool::new(&["http://127.0.0.1:9".to_owned()], 1)
            .map_err(|e| TestCaseError::fail(e.to_string()))?,
    );
    let hub = Hub::new(
        config.clone(),
        "edge-mirror".into(),
        generators,
        store.clone(),
        bus.clone(),
        true,
        &tokenfan_edge::Lifecycle::default(),
    );
    // The owner created the stream and holds its lease for the whole case: no takeover.
    let id = StreamId::random();
    let spec = StreamRequest {
        prompt: Some("p".into()),
        max_tokens: Some(texts.len() as u32 + 1),
        seed: Some(1),
        ..StreamRequest::default()
    }
    .validate(&config.streams)
    .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let ok = |r: Result<tokenfan_edge::store::Appended, tokenfan_edge::store::StoreError>| {
        r.map(drop).map_err(|e| TestCaseError::fail(e.to_string()))
    };
    let terms = tokenfan_edge::store::LeaseTerms {
        ttl: Duration::from_secs(24 * 3600),
        keep: Duration::from_secs(24 * 3600),
    };
    let created = store
        .create(&id, StreamMeta::running(&spec, OWNER), terms)
        .await;
    prop_assert!(matches!(created, Ok(true)));

    let mut produced = 0usize;
    let mut batches: Vec<std::ops::Range<usize>> = Vec::new();
    let mut undelivered: VecDeque<std::ops::Range<usize>> = VecDeque::new();
    let mut state: Option<Arc<StreamState>> = None;
    let mut readers: Vec<Reader> = Vec::new();

    async fn subscribe(
        hub: &Arc<Hub>,
        id: &StreamId,
        total: usize,
        state: &mut Option<Arc<StreamState>>,
        readers: &mut Vec<Reader>,
        pick: u16,
    ) -> Result<(), TestCaseError> {
        let found = hub
            .get_for(id.as_str(), Some(Caller::anonymous().tenant()))
            .await;
        prop_assert!(found.is_ok(), "{:?}", found.err());
        let Ok(found) = found else { return Ok(()) };
        if let Some(known) = state {
            prop_assert!(Arc::ptr_eq(known, &found), "one mirror per stream");
        }
        // Up to one past the terminal event: a client may come from a replica that is ahead
        // (fine while the stream runs, up to `max_tokens` + 1), or with a bogus cursor.
        let terminal = total as u64;
        let after = u64::from(pick) % (terminal + 2);
        let running = found.status() == StreamStatus::Running;
        let last = found.last_seq();
        match found.subscribe(after) {
            Ok(sub) => {
                prop_assert!(running || after <= last, "accepted {after} past {last}");
                readers.push(Reader {
                    after,
                    sub,
                    got: Vec::new(),
                    finished: false,
                });
            }
            Err(e) => {
                prop_assert!(!running && after > last, "refused {after}: {e}");
                prop_assert_eq!(e.code(), "cursor_out_of_range");
            }
        }
        *state = Some(found);
        Ok(())
    }

    for step in steps {
        match step {
            Step::Produce(n, stored) => {
                if produced < total {
                    let batch = produced..(produced + n).min(total);
                    produced = batch.end;
                    if stored {
                        ok(store.append(&id, 1, &source[batch.clone()]).await)?;
                    }
                    batches.push(batch.clone());
                    undelivered.push_back(batch);
                }
            }
            Step::StoreCatchUp => ok(store.append(&id, 1, &source[..produced]).await)?,
            Step::Deliver(twice) => {
                if let Some(batch) = undelivered.pop_front() {
                    bus.deliver(&source[batch.clone()]);
                    if twice {
                        bus.deliver(&source[batch]);
                    }
                }
            }
            Step::Lose => {
                undelivered.pop_front();
            }
            Step::Defer => undelivered.rotate_left(1.min(undelivered.len())),
            Step::Redeliver(k) => {
                if !batches.is_empty() {
                    let batch = batches[usize::from(k) % batches.len()].clone();
                    bus.deliver(&source[batch]);
                }
            }
            Step::DropFeed => bus.drop_feeds(),
            Step::Subscribe(pick) => {
                subscribe(&hub, &id, total, &mut state, &mut readers, pick).await?;
            }
            Step::Read(k) => {
                if !readers.is_empty() {
                    let i = usize::from(k) % readers.len();
                    readers[i].read(&source, queue)?;
                }
            }
            Step::Wait(ms) => tokio::time::sleep(Duration::from_millis(u64::from(ms))).await,
        }
        settle().await;
        if let Some(state) = &state {
            // The mirror's history is always a prefix of the owner's.
            let (_, events) = state
                .events_after(0)
                .map_err(|e| TestCaseError::fail(e.message()))?;
            prop_assert!(events.len() <= produced);
            for (e, s) in events.iter().zip(&source) {
                prop_assert_eq!(e.json(), s.json());
            }
        }
    }

    // The owner finishes: every event stored, the rest of the batches published and delivered.
    if state.is_none() {
        subscribe(&hub, &id, total, &mut state, &mut readers, 0).await?;
    }
    if produced < total {
        bus.deliver(&source[produced..]);
    }
    ok(store.append(&id, 1, &source).await)?;
    let Some(state) = state else {
        return Err(TestCaseError::fail("no mirror"));
    };
    // Lost batches come back from the store once the stream has been quiet for a lease TTL.
    for _ in 0..20 {
        if state.status() != StreamStatus::Running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(LEASE_TTL_MS + 300)).await;
    }
    prop_assert!(
        state.status() != StreamStatus::Running,
        "the mirror never completed: {} of {total} events, bus subscribed: {}",
        state.last_seq(),
        bus.subscribed()
    );
    let (_, events) = state
        .events_after(0)
        .map_err(|e| TestCaseError::fail(e.message()))?;
    prop_assert_eq!(events.len(), total, "the whole history, once");
    for (e, s) in events.iter().zip(&source) {
        prop_assert_eq!(e.seq, s.seq);
        prop_assert_eq!(e.json(), s.json());
    }
    prop_assert!(
        !state.is_owned(),
        "no takeover while the owner holds the lease"
    );
    for reader in &mut readers {
        reader.drain(&source, queue)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        // PROPTEST_CASES raises it for a longer search.
        cases: ProptestConfig::default().cases.max(256),
        // Failures are kept as explicit regression tests, not in a seed file.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn a_mirror_converges_to_the_owners_history_exactly_once(
        texts in texts(16),
        terminal in any::<u8>(),
        queue in 2usize..=4,
        steps in prop::collection::vec(step(), 0..60),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        runtime.block_on(mirror_case(texts, terminal, queue, steps))?;
    }
}
