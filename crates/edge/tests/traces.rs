//! One trace shows a stream across replicas: a 2-replica cluster (edge processes, NATS,
//! Redis) and a generator export OTLP to an in-process collector; a stream started on replica
//! A with a caller's `traceparent` and read on replica B must give, in the caller's trace, A's
//! request span, A's stream span, the generator's span and B's mirror span, with exact parent
//! links. Resume, a cross-replica stop and a failover after the owner is killed join the
//! stream's trace too.
//!
//! The generator runs in this test process (its code path is the one the binary serves), so
//! this process's global subscriber exports its spans as `tokenfan-generator`; this file holds
//! a single test for that reason.

mod common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{EdgeOptions, TestCluster};
use futures::StreamExt as _;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value::Value as Any},
    trace::v1::Span,
};
use serde_json::{Value, json};
use tokenfan_testkit::{
    edge::{create, stream_id},
    sse::{SseParser, read_sse, stream_events},
    wait::wait_until,
};

/// A span as the collector received it, with its resource's identity.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    instance: Option<String>,
    span: Span,
}

impl Got {
    fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }
    fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }
    fn parent_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }
    fn attr(&self, key: &str) -> Option<Value> {
        attr(&self.span.attributes, key)
    }
    fn str_attr(&self, key: &str) -> String {
        match self.attr(key) {
            Some(Value::String(s)) => s,
            other => panic!("{}: attribute {key} is {other:?}", self.span.name),
        }
    }
    fn int_attr(&self, key: &str) -> i64 {
        match self.attr(key) {
            Some(Value::Number(n)) => n.as_i64().expect("integer"),
            other => panic!("{}: attribute {key} is {other:?}", self.span.name),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn value(v: &Option<AnyValue>) -> Option<Value> {
    Some(match v.as_ref()?.value.as_ref()? {
        Any::StringValue(s) => json!(s),
        Any::IntValue(i) => json!(i),
        Any::BoolValue(b) => json!(b),
        Any::DoubleValue(d) => json!(d),
        other => json!(format!("{other:?}")),
    })
}

fn attr(attrs: &[KeyValue], key: &str) -> Option<Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| value(&kv.value))
}

/// An OTLP/gRPC trace receiver that keeps every span.
#[derive(Debug, Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Got>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("collector lock");
        for rs in request.into_inner().resource_spans {
            let resource = rs.resource.map(|r| r.attributes).unwrap_or_default();
            let service = match attr(&resource, "service.name") {
                Some(Value::String(s)) => s,
                _ => String::new(),
            };
            let instance = match attr(&resource, "service.instance.id") {
                Some(Value::String(s)) => Some(s),
                _ => None,
            };
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                spans.push(Got {
                    service: service.clone(),
                    instance: instance.clone(),
                    span,
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    /// Starts the receiver on a free loopback port; returns its URL.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming),
        );
        format!("http://{addr}")
    }

    /// The one span named `name` in `trace` satisfying `pick`, once it has arrived.
    fn find(&self, trace: &str, name: &str, pick: impl Fn(&Got) -> bool) -> Option<Got> {
        let spans = self.spans.lock().expect("collector lock");
        let found: Vec<&Got> = spans
            .iter()
            .filter(|g| g.trace_id() == trace && g.span.name == name && pick(g))
            .collect();
        assert!(found.len() <= 1, "{name} exported twice: {found:#?}");
        found.first().map(|g| (*g).clone())
    }
}

const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const STOP_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const FAILOVER_TRACE: &str = "5b8efff798038103d269b633813fc60c";
const CALLER: &str = "b7ad6b7169203331";
const RESUMER: &str = "00f067aa0ba902b7";

fn traceparent(trace: &str, span: &str) -> String {
    format!("00-{trace}-{span}-01")
}

/// `POST /v1/streams` with `traceparent: parent`; the new stream's id.
async fn create_traced(http: &reqwest::Client, base: &str, parent: &str, body: Value) -> String {
    stream_id(&create(http, base, &[("traceparent", parent)], body).await)
}

fn slow(max_tokens: u32, inter_token_ms: u32) -> Value {
    json!({
        "prompt": "trace this stream",
        "max_tokens": max_tokens,
        "seed": 5,
        "timing": {"ttft_ms": 20, "inter_token_ms": inter_token_ms, "jitter_ms": 0},
    })
}

/// An SSE response read incrementally.
struct Reader {
    body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    parser: SseParser,
    seqs: Vec<u64>,
    done: bool,
}

impl Reader {
    fn new(r: reqwest::Response) -> Self {
        assert_eq!(r.status(), 200);
        Self {
            body: Box::pin(r.bytes_stream()),
            parser: SseParser::default(),
            seqs: Vec::new(),
            done: false,
        }
    }

    /// Reads one chunk; false at the end of the body.
    async fn chunk(&mut self) -> bool {
        let Some(chunk) = self.body.next().await else {
            return false;
        };
        let chunk = chunk.expect("chunk");
        for event in self
            .parser
            .feed(std::str::from_utf8(&chunk).expect("utf-8"))
        {
            if let Some(id) = event.id {
                self.seqs.push(id.parse().expect("seq"));
                self.done |= event.event.as_deref() == Some("done");
            }
        }
        true
    }

    /// Reads past the history the first chunk carried, until `n` more events arrived: those
    /// came over NATS, so the replica knows the stream's trace from the batches' headers.
    async fn past_backlog(&mut self, n: u64) {
        assert!(self.chunk().await, "a first chunk");
        let backlog = self.seqs.last().copied().unwrap_or(0);
        while self.seqs.last().copied().unwrap_or(0) < backlog + n {
            assert!(self.chunk().await, "the stream goes on");
        }
    }

    /// Reads to the end of the body.
    async fn read_to_end(&mut self) {
        while self.chunk().await {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_follows_a_stream_across_replicas() {
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let telemetry = tokenfan_telemetry::init(
        "tokenfan-generator",
        &tokenfan_telemetry::TelemetryArgs {
            log_format: tokenfan_telemetry::LogFormat::Text,
            log_filter: "warn,tokenfan_generator=info".into(),
            otlp_endpoint: Some(endpoint.clone()),
            otlp_protocol: tokenfan_telemetry::OtlpProtocol::Grpc,
        },
    )
    .expect("telemetry");
    let options = EdgeOptions {
        args: vec!["--otlp-endpoint".into(), endpoint],
        // Export every 100 ms instead of every 5 s.
        env: vec![("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into())],
        ..EdgeOptions::default()
    };
    let mut cluster = TestCluster::start_with(2, 1, &options).await;
    let http = cluster.http.clone();
    let (a, b) = (cluster.edge(0).url(""), cluster.edge(1).url(""));
    let (a_id, b_id) = (
        cluster.edge(0).replica.clone(),
        cluster.edge(1).replica.clone(),
    );
    let on = |g: &Got, replica: &str| {
        g.service == "tokenfan-edge" && g.instance.as_deref() == Some(replica)
    };
    let of_stream = |g: &Got, stream: &str| g.attr("stream_id") == Some(json!(stream));

    // Stream 1: started on A by a traced caller, read whole on B (B mirrors it), then resumed
    // on B from seq 5 by a request with its own span in the same trace.
    let id = create_traced(&http, &a, &traceparent(TRACE, CALLER), slow(30, 25)).await;
    let r = http
        .get(format!("{b}/v1/streams/{id}/events"))
        .send()
        .await
        .expect("GET on B");
    assert_eq!(r.status(), 200);
    let (events, _) = read_sse(r).await;
    let events = stream_events(&events);
    assert_eq!(events.len(), 31, "30 tokens and the terminal event");
    let r = http
        .get(format!("{b}/v1/streams/{id}/events"))
        .header("last-event-id", "5")
        .header("traceparent", traceparent(TRACE, RESUMER))
        .send()
        .await
        .expect("resume on B");
    let (resumed, _) = read_sse(r).await;
    assert_eq!(stream_events(&resumed).len(), 26);

    // Stream 2: another trace, followed on B and stopped from B (relayed to A over NATS).
    let stop_id = create_traced(&http, &a, &traceparent(STOP_TRACE, CALLER), slow(400, 25)).await;
    let r = http
        .get(format!("{b}/v1/streams/{stop_id}/events"))
        .send()
        .await
        .expect("GET on B");
    let mut following = Reader::new(r);
    following.past_backlog(5).await;
    let r = http
        .delete(format!("{b}/v1/streams/{stop_id}"))
        .send()
        .await
        .expect("DELETE on B");
    assert_eq!(r.status(), 202);
    assert_eq!(
        r.json::<Value>().await.expect("json")["status"],
        "cancelled"
    );
    following.read_to_end().await;
    assert!(following.done, "B delivered the terminal event");

    // Everything A has to say, before A is killed below.
    let (request, stream, mirror, resume, stopped, cancel) =
        wait_until(Duration::from_secs(20), || async {
            let request = collector.find(TRACE, "POST /v1/streams", |g| on(g, &a_id))?;
            let stream = collector.find(TRACE, "tokenfan.stream", |g| on(g, &a_id))?;
            let mirror = collector.find(TRACE, "tokenfan.stream.mirror", |g| on(g, &b_id))?;
            let resume = collector.find(TRACE, "tokenfan.stream.resume", |g| on(g, &b_id))?;
            let stopped = collector.find(STOP_TRACE, "tokenfan.stream", |g| on(g, &a_id))?;
            let cancel = collector.find(STOP_TRACE, "tokenfan.stream.cancel", |g| on(g, &b_id))?;
            Some((request, stream, mirror, resume, stopped, cancel))
        })
        .await;

    // Stream 3: followed on B; A is killed mid-stream and B takes it over.
    let failover_id = create_traced(
        &http,
        &a,
        &traceparent(FAILOVER_TRACE, CALLER),
        slow(60, 25),
    )
    .await;
    let r = http
        .get(format!("{b}/v1/streams/{failover_id}/events"))
        .send()
        .await
        .expect("GET on B");
    let mut following = Reader::new(r);
    following.past_backlog(5).await;
    cluster.edges[0].kill();
    following.read_to_end().await;
    assert!(following.done, "B finished the stream");
    assert_eq!(following.seqs, (1..=61).collect::<Vec<u64>>());

    // The generator's spans close when its calls end; flush them.
    wait_until(Duration::from_secs(10), || async {
        (cluster.generator_active() == 0).then_some(())
    })
    .await;
    telemetry.shutdown().await;
    let generator = |trace: &'static str, first: bool| {
        let collector = &collector;
        move || async move {
            collector.find(trace, "tokenfan.v1.Generator/Generate", |g| {
                g.service == "tokenfan-generator" && (g.int_attr("start_index") == 0) == first
            })
        }
    };
    let generate = wait_until(Duration::from_secs(20), generator(TRACE, true)).await;
    let generate_stopped = wait_until(Duration::from_secs(20), generator(STOP_TRACE, true)).await;
    let generate_first = wait_until(Duration::from_secs(20), generator(FAILOVER_TRACE, true)).await;
    let generate_resumed =
        wait_until(Duration::from_secs(20), generator(FAILOVER_TRACE, false)).await;
    let (failover, taken, followed) = wait_until(Duration::from_secs(20), || async {
        let failover =
            collector.find(FAILOVER_TRACE, "tokenfan.stream.failover", |g| on(g, &b_id))?;
        let taken = collector.find(FAILOVER_TRACE, "tokenfan.stream", |g| on(g, &b_id))?;
        let followed =
            collector.find(FAILOVER_TRACE, "tokenfan.stream.mirror", |g| on(g, &b_id))?;
        Some((failover, taken, followed))
    })
    .await;

    // A: the request continues the caller; the stream span is the request's child.
    assert_eq!(request.parent_id(), CALLER);
    assert_eq!(stream.parent_id(), request.span_id());
    assert!(of_stream(&stream, &id));
    assert_eq!(stream.str_attr("replica"), a_id);
    assert_eq!(stream.str_attr("transport"), "native");
    assert_eq!(stream.int_attr("tokens"), 30);
    assert!(stream.int_attr("ttft_ms") >= 20, "ttft_ms is on the span");
    let finish = stream.str_attr("finish_reason");
    assert!(finish == "length" || finish == "stop", "{finish}");
    // The generator continues A's stream span from the gRPC metadata.
    assert_eq!(generate.parent_id(), stream.span_id());
    assert_eq!(generate.str_attr("request_id"), id);
    assert_eq!(generate.int_attr("tokens"), 30);
    // B: the mirror's parent is A's stream span, from the NATS batch headers.
    assert_eq!(mirror.parent_id(), stream.span_id());
    assert!(of_stream(&mirror, &id));
    assert_eq!(mirror.str_attr("replica"), b_id);
    assert!(mirror.int_attr("events_received") > 0);
    assert_eq!(mirror.str_attr("outcome"), "finished");
    // B: the resume continues its own request and links to the stream.
    assert_eq!(resume.parent_id(), RESUMER);
    assert_eq!(resume.int_attr("after"), 5);
    assert_eq!(resume.int_attr("replayed"), 26);
    assert_eq!(resume.str_attr("result"), "replayed");
    assert_eq!(resume.str_attr("transport"), "sse");
    let linked: Vec<String> = resume.span.links.iter().map(|l| hex(&l.span_id)).collect();
    assert_eq!(linked, [stream.span_id()]);

    // The stop: B's cancel span is a child of A's stream span, A's stream span says a stop
    // request ended it, and the generator saw its caller leave.
    assert!(of_stream(&stopped, &stop_id));
    assert_eq!(stopped.str_attr("finish_reason"), "cancelled");
    assert_eq!(stopped.str_attr("cancel_cause"), "stop");
    assert_eq!(cancel.parent_id(), stopped.span_id());
    assert_eq!(cancel.attr("relayed"), Some(json!(true)));
    assert_eq!(cancel.str_attr("status"), "cancelled");
    assert_eq!(generate_stopped.parent_id(), stopped.span_id());
    assert_eq!(generate_stopped.str_attr("finish_reason"), "cancelled");

    // The failover: A died with its stream span open (never exported); its id is the parent
    // of the first generator call, of B's mirror span and of B's failover span. B's new stream
    // span is the failover's child and the resumed generator call continues it.
    let dead_owner = generate_first.parent_id();
    assert_eq!(followed.parent_id(), dead_owner);
    assert_eq!(followed.str_attr("outcome"), "took_over");
    assert_eq!(failover.parent_id(), dead_owner);
    assert!(of_stream(&failover, &failover_id));
    let resumed_after = failover.int_attr("resumed_after");
    assert!(resumed_after > 0, "B had tokens when it took over");
    assert_eq!(taken.parent_id(), failover.span_id());
    assert_eq!(taken.str_attr("transport"), "failover");
    assert_eq!(taken.int_attr("resumed_after"), resumed_after);
    assert_eq!(taken.int_attr("tokens"), 60);
    assert_eq!(generate_resumed.parent_id(), taken.span_id());
    assert_eq!(generate_resumed.int_attr("start_index"), resumed_after);

    // No span per token: one stream span per stream on its owner.
    let spans = collector.spans.lock().expect("lock");
    let per_name: HashMap<&str, usize> = spans
        .iter()
        .filter(|g| g.trace_id() == TRACE && on(g, &a_id))
        .fold(HashMap::new(), |mut m, g| {
            *m.entry(g.span.name.as_str()).or_default() += 1;
            m
        });
    assert_eq!(per_name.get("tokenfan.stream"), Some(&1), "{per_name:?}");
}
