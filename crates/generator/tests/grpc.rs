//! The generator over real gRPC on TCP: determinism, resume, UTF-8, cancellation, faults,
//! invalid arguments, health and reflection.

use std::{sync::Arc, time::Duration};

use futures::StreamExt as _;
use tokenfan_generator::{GeneratorConfig, Stats, serve_grpc};
use tokenfan_proto::v1::{
    ChatMessage, Fault, FinishReason, GenerateRequest, Timing, generate_response::Event,
    generator_client::GeneratorClient,
};
use tokenfan_testkit::wait::wait_until;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Code, transport::Channel};

struct TestGenerator {
    addr: std::net::SocketAddr,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
}

impl TestGenerator {
    async fn start(allow_faults: bool) -> Self {
        let mut config = <GeneratorConfig as clap::Parser>::parse_from(["tokenfan-generator"]);
        config.allow_faults = allow_faults;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stats = Arc::new(Stats::default());
        let shutdown = CancellationToken::new();
        tokio::spawn({
            let (stats, shutdown) = (stats.clone(), shutdown.clone());
            async move { serve_grpc(&config, listener, stats, shutdown).await }
        });
        Self {
            addr,
            stats,
            shutdown,
        }
    }

    async fn client(&self) -> GeneratorClient<Channel> {
        let url = format!("http://{}", self.addr);
        wait_until(Duration::from_secs(10), || async {
            GeneratorClient::connect(url.clone()).await.ok()
        })
        .await
    }

    async fn channel(&self) -> Channel {
        let url = format!("http://{}", self.addr);
        wait_until(Duration::from_secs(10), || async {
            Channel::from_shared(url.clone()).ok()?.connect().await.ok()
        })
        .await
    }
}

impl Drop for TestGenerator {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn request(prompt: &str, seed: u64) -> GenerateRequest {
    GenerateRequest {
        request_id: "test".into(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: prompt.into(),
        }],
        max_tokens: 4096,
        seed,
        timing: Some(Timing {
            ttft_ms: Some(0),
            inter_token_ms: Some(0),
            jitter_ms: Some(0),
        }),
        ..Default::default()
    }
}

#[derive(Debug, Default)]
struct Run {
    tokens: Vec<(u32, String, u32)>,
    finish: Option<(FinishReason, u32, u32)>,
    status: Option<tonic::Status>,
}

impl Run {
    fn text(&self) -> String {
        self.tokens.iter().map(|t| t.1.as_str()).collect()
    }
}

async fn run(client: &mut GeneratorClient<Channel>, req: GenerateRequest) -> Run {
    let mut out = Run::default();
    let mut stream = match client.generate(req).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            out.status = Some(status);
            return out;
        }
    };
    loop {
        match stream.message().await {
            Ok(Some(msg)) => match msg.event.expect("event set") {
                Event::Token(t) => out.tokens.push((t.index, t.text, t.token_id)),
                Event::Finished(f) => {
                    let usage = f.usage.expect("usage");
                    out.finish = Some((
                        FinishReason::try_from(f.reason).expect("known reason"),
                        usage.prompt_tokens,
                        usage.completion_tokens,
                    ));
                }
            },
            Ok(None) => return out,
            Err(status) => {
                out.status = Some(status);
                return out;
            }
        }
    }
}

#[tokio::test]
async fn same_seed_same_tokens_other_seed_other_answer() {
    let g = TestGenerator::start(false).await;
    let mut c = g.client().await;
    let a = run(&mut c, request("Tell me about streaming", 42)).await;
    let b = run(&mut c, request("Tell me about streaming", 42)).await;
    let other = run(&mut c, request("Tell me about streaming", 43)).await;
    let other_prompt = run(&mut c, request("Something else", 42)).await;
    assert!(a.tokens.len() > 20, "a real answer has many tokens");
    assert_eq!(a.tokens, b.tokens);
    assert_ne!(a.text(), other.text());
    assert_ne!(a.text(), other_prompt.text());
    let indexes: Vec<u32> = a.tokens.iter().map(|t| t.0).collect();
    assert_eq!(indexes, (0..a.tokens.len() as u32).collect::<Vec<_>>());
    let (reason, prompt, completion) = a.finish.expect("finished");
    assert_eq!(reason, FinishReason::Stop);
    assert!(prompt > 0);
    assert_eq!(completion as usize, a.tokens.len());
}

#[tokio::test]
async fn every_start_index_gives_exactly_the_suffix() {
    let g = TestGenerator::start(false).await;
    let mut c = g.client().await;
    let full = run(&mut c, request("resume me", 7)).await;
    let n = full.tokens.len() as u32;
    let full_finish = full.finish.expect("finished");
    for k in 0..=n {
        let mut req = request("resume me", 7);
        req.start_index = k;
        let part = run(&mut c, req).await;
        assert_eq!(part.tokens, full.tokens[k as usize..], "start_index {k}");
        // Usage reports the whole answer, as if uninterrupted.
        assert_eq!(part.finish, Some(full_finish), "start_index {k}");
    }
    let mut past = request("resume me", 7);
    past.start_index = n + 1;
    let err = run(&mut c, past).await.status.expect("rejected");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("start_index"), "{}", err.message());
}

#[tokio::test]
async fn max_tokens_cuts_with_length_and_resume_keeps_the_cut() {
    let g = TestGenerator::start(false).await;
    let mut c = g.client().await;
    let mut req = request("short please", 3);
    req.max_tokens = 5;
    let cut = run(&mut c, req.clone()).await;
    assert_eq!(cut.tokens.len(), 5);
    assert_eq!(
        cut.finish.map(|f| (f.0, f.2)),
        Some((FinishReason::Length, 5))
    );
    req.start_index = 3;
    let rest = run(&mut c, req).await;
    assert_eq!(rest.tokens, cut.tokens[3..]);
    assert_eq!(rest.finish.map(|f| f.0), Some(FinishReason::Length));

    let full = run(&mut c, request("short please", 3)).await;
    assert_eq!(full.tokens[..5], cut.tokens[..]);
}

#[tokio::test]
async fn tokens_are_valid_utf8_across_chinese_and_emoji() {
    let g = TestGenerator::start(false).await;
    let mut c = g.client().await;
    let mut saw_cjk = false;
    let mut saw_emoji = false;
    for seed in 0..40 {
        let r = run(&mut c, request("多语言 test", seed)).await;
        // prost already refuses invalid UTF-8 in a `string`; check no token is empty and none
        // starts with a continuation (a character split across tokens would show up as such).
        for (_, text, _) in &r.tokens {
            assert!(!text.is_empty());
            assert!(text.is_char_boundary(0));
        }
        let text = r.text();
        saw_cjk |= text.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c));
        saw_emoji |= text
            .chars()
            .any(|c| ('\u{1f300}'..='\u{1faff}').contains(&c));
        // Multi-token characters: the merged token holds the whole character.
        let expected = tokenfan_generator::corpus::Corpus::get()
            .answer(&request("多语言 test", seed).messages, seed)
            .text();
        assert_eq!(text, expected, "seed {seed}");
    }
    assert!(
        saw_cjk && saw_emoji,
        "the corpus answers include Chinese and emoji"
    );
}

#[tokio::test]
async fn dropping_the_stream_stops_generation() {
    let g = TestGenerator::start(false).await;
    let mut c = g.client().await;
    let mut req = request("cancel me", 1);
    req.timing = Some(Timing {
        ttft_ms: Some(0),
        inter_token_ms: Some(50),
        jitter_ms: Some(0),
    });
    let mut stream = c.generate(req).await.expect("call").into_inner();
    for _ in 0..2 {
        stream.message().await.expect("ok").expect("token");
    }
    assert_eq!(g.stats.active(), 1);
    let tokens_at_drop = g.stats.tokens();
    drop(stream);
    wait_until(Duration::from_secs(5), || async {
        (g.stats.active() == 0).then_some(())
    })
    .await;
    // Nothing was generated after the gauge dropped.
    let after = g.stats.tokens();
    assert!(after <= tokens_at_drop + 1, "{after} vs {tokens_at_drop}");
}

#[tokio::test]
async fn fail_after_n_tokens_with_the_given_code() {
    let g = TestGenerator::start(true).await;
    let mut c = g.client().await;
    for (code, expected) in [
        (0, Code::Unavailable),
        (8, Code::ResourceExhausted),
        (13, Code::Internal),
    ] {
        let mut req = request("fail", 5);
        req.fault = Some(Fault {
            fail_after_tokens: Some(3),
            stall_after_tokens: None,
            grpc_code: code,
        });
        let r = run(&mut c, req).await;
        assert_eq!(r.tokens.len(), 3);
        assert!(r.finish.is_none());
        assert_eq!(r.status.expect("failed").code(), expected);
    }
    // Counted per call: a resumed call fails three tokens after its start.
    let mut req = request("fail", 5);
    req.start_index = 10;
    req.fault = Some(Fault {
        fail_after_tokens: Some(3),
        stall_after_tokens: None,
        grpc_code: 0,
    });
    let r = run(&mut c, req).await;
    assert_eq!(
        r.tokens.iter().map(|t| t.0).collect::<Vec<_>>(),
        [10, 11, 12]
    );
    wait_until(Duration::from_secs(5), || async {
        (g.stats.active() == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn stall_keeps_the_stream_open_until_the_caller_leaves() {
    let g = TestGenerator::start(true).await;
    let mut c = g.client().await;
    let mut req = request("stall", 5);
    req.fault = Some(Fault {
        fail_after_tokens: None,
        stall_after_tokens: Some(2),
        grpc_code: 0,
    });
    let mut stream = c.generate(req).await.expect("call").into_inner();
    for _ in 0..2 {
        stream.message().await.expect("ok").expect("token");
    }
    // The call stays open and counted (the in-process test checks no message ever comes).
    assert_eq!(g.stats.active(), 1);
    drop(stream);
    wait_until(Duration::from_secs(5), || async {
        (g.stats.active() == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn invalid_arguments_name_the_field() {
    let g = TestGenerator::start(false).await;
    let mut c = g.client().await;
    let mut cases: Vec<(GenerateRequest, &str)> = Vec::new();

    let mut r = request("x", 1);
    r.messages.clear();
    cases.push((r, "messages"));

    let mut r = request("x", 1);
    r.max_tokens = 1_000_000;
    cases.push((r, "max_tokens"));

    for (field, timing) in [
        (
            "timing.ttft_ms",
            Timing {
                ttft_ms: Some(999_999),
                ..Default::default()
            },
        ),
        (
            "timing.inter_token_ms",
            Timing {
                inter_token_ms: Some(999_999),
                ..Default::default()
            },
        ),
        (
            "timing.jitter_ms",
            Timing {
                jitter_ms: Some(999_999),
                ..Default::default()
            },
        ),
    ] {
        let mut r = request("x", 1);
        r.timing = Some(timing);
        cases.push((r, field));
    }

    let mut r = request("x", 1);
    r.fault = Some(Fault {
        fail_after_tokens: Some(1),
        ..Default::default()
    });
    cases.push((r, "fault"));

    let mut r = request("x", 1);
    r.messages[0].role = "wizard".into();
    cases.push((r, "messages[0].role"));

    for (req, field) in cases {
        let status = run(&mut c, req).await.status.expect("rejected");
        assert_eq!(status.code(), Code::InvalidArgument, "{field}");
        assert!(
            status.message().starts_with(field),
            "{field}: {}",
            status.message()
        );
    }
    assert_eq!(g.stats.active(), 0);
}

#[tokio::test]
async fn health_reports_serving() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let g = TestGenerator::start(false).await;
    let mut health = HealthClient::new(g.channel().await);
    for service in ["", "tokenfan.v1.Generator"] {
        let resp = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check")
            .into_inner();
        assert_eq!(resp.status(), ServingStatus::Serving, "{service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "nope.Nope".into(),
        })
        .await
        .expect_err("unknown service");
    assert_eq!(unknown.code(), Code::NotFound);
}

#[tokio::test]
async fn reflection_lists_and_describes_the_service() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let g = TestGenerator::start(false).await;
    let mut client = ServerReflectionClient::new(g.channel().await);
    let requests = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol("tokenfan.v1.Generator".into()),
    ];
    let outbound = futures::stream::iter(requests.map(|m| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    }));
    let mut responses = client
        .server_reflection_info(outbound)
        .await
        .expect("reflection")
        .into_inner();

    let first = responses.next().await.expect("one").expect("ok");
    let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
        panic!("expected a service list, got {first:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"tokenfan.v1.Generator".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );

    let second = responses.next().await.expect("two").expect("ok");
    let Some(MessageResponse::FileDescriptorResponse(fds)) = second.message_response else {
        panic!("expected a file descriptor, got {second:?}");
    };
    let file = <prost_types::FileDescriptorProto as prost::Message>::decode(
        fds.file_descriptor_proto[0].as_slice(),
    )
    .expect("descriptor");
    assert_eq!(file.package(), "tokenfan.v1");
    assert_eq!(file.service[0].method[0].name(), "Generate");
}

#[tokio::test]
async fn shutdown_marks_not_serving_and_lets_running_calls_finish() {
    let g = TestGenerator::start(false).await;
    let mut c = g.client().await;
    let mut req = request("drain", 11);
    req.max_tokens = 20;
    req.timing = Some(Timing {
        ttft_ms: Some(0),
        inter_token_ms: Some(20),
        jitter_ms: Some(0),
    });
    let mut stream = c.generate(req).await.expect("call").into_inner();
    stream.message().await.expect("ok").expect("first token");
    g.shutdown.cancel();
    let mut tokens = 1;
    let mut finished = false;
    while let Some(msg) = stream.message().await.expect("no error while draining") {
        match msg.event.expect("event") {
            Event::Token(_) => tokens += 1,
            Event::Finished(_) => finished = true,
        }
    }
    assert!(finished);
    assert_eq!(tokens, 20);
}
