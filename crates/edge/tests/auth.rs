//! Authentication, stream tickets, tenant isolation, limits and abuse guards against a real
//! edge over real sockets (and, where it matters, two replicas sharing NATS and Redis).
//!
//! Every test keeps a client with valid credentials streaming while the refused requests are
//! made, and checks at the end that its stream arrived exactly once, in order.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{EdgeOptions, TestCluster};
use serde_json::{Value, json};
use tokenfan_edge::{
    EdgeConfig,
    auth::{
        AuthMode,
        jwt::{self, Claims, SigningAlgorithm},
        ticket::TicketKey,
    },
    ids::StreamId,
};
use tokenfan_testkit::{
    edge::{TestEdge, create, fast, long_poll_all, slow},
    sse::{assert_contiguous, read_sse, stream_events},
    wait::wait_until,
    ws::TcpWs,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const ALICE: &str = "sk-alice-0123456789abcdef";
const BOB: &str = "sk-bob-0123456789abcdef00";
const TICKET_SECRET: &str = "ticket-secret-for-tests-0123456789abcdef";
const HS_SECRET: &str = "hs256-secret-for-tests-0123456789abcdef";
const AUDIENCE: &str = "tokenfan";
const ISSUER: &str = "https://issuer.test";

/// Longest wait for anything a test waits on; generous so a loaded machine cannot flake.
const WAIT: Duration = Duration::from_secs(30);

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// `--auth api-keys` with ALICE → tenant `alice`, BOB → tenant `bob`.
fn api_keys(c: &mut EdgeConfig) {
    c.auth.mode = AuthMode::ApiKeys;
    c.auth.api_keys = vec![format!("{ALICE}:alice"), format!("{BOB}:bob")];
    c.auth.ticket_secret = Some(TICKET_SECRET.parse().expect("secret"));
}

/// `--auth jwt` with the HS256 secret, audience and issuer.
fn jwt_hs256(c: &mut EdgeConfig) {
    c.auth.mode = AuthMode::Jwt;
    c.auth.jwt_hs256_secret = Some(HS_SECRET.parse().expect("secret"));
    c.auth.jwt_audience = vec![AUDIENCE.into()];
    c.auth.jwt_issuer = Some(ISSUER.into());
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// Claims accepted by [`jwt_hs256`] for `tenant`, expiring in ten minutes.
fn claims(tenant: &str) -> Claims {
    [
        ("tenant", json!(tenant)),
        ("sub", json!("user-1")),
        ("aud", json!(AUDIENCE)),
        ("iss", json!(ISSUER)),
        ("exp", json!(now() + 600)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

fn hs256(claims: &Claims) -> String {
    jwt::sign(SigningAlgorithm::HS256, HS_SECRET.as_bytes(), None, claims).expect("sign")
}

fn rs256(claims: &Claims, kid: Option<&str>) -> String {
    let pem = std::fs::read(fixture("rs256-test-private.pem")).expect("test key");
    jwt::sign(SigningAlgorithm::RS256, &pem, kid, claims).expect("sign")
}

/// A client that sends `Authorization: Bearer <credential>` on every request.
fn client(credential: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {credential}").parse().expect("header"),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("client")
}

/// Asserts status and native error code; returns the body.
async fn refused(r: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(r.status(), status, "{:?}", r.headers());
    let body: Value = r.json().await.expect("JSON error body");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    body
}

/// Asserts the OpenAI error shape `{"error":{"message","type","param","code"}}`.
fn assert_openai_error(body: &Value, kind: &str, code: &str) {
    let e = body["error"].as_object().expect("error object");
    for key in ["message", "type", "param", "code"] {
        assert!(e.contains_key(key), "{key} in {body}");
    }
    assert_eq!(e["type"], kind, "{body}");
    assert_eq!(e["code"], code, "{body}");
}

/// A client with valid credentials that streams the whole time (POST-SSE).
struct Bystander {
    task: tokio::task::JoinHandle<Vec<Value>>,
}

impl Bystander {
    /// Starts streaming from `base` (with `credential`, if any); returns once the response
    /// headers arrived, so the stream runs while the test goes on.
    async fn start(base: &str, credential: Option<&str>) -> Self {
        let http = match credential {
            Some(c) => client(c),
            None => reqwest::Client::new(),
        };
        let r = http
            .post(format!("{base}/v1/streams"))
            .header("accept", "text/event-stream")
            .json(&slow("bystander", 120, 20))
            .send()
            .await
            .expect("bystander POST");
        assert_eq!(r.status(), 200, "bystander: {:?}", r.text().await);
        let task = tokio::spawn(async move { stream_events(&read_sse(r).await.0) });
        Self { task }
    }

    /// Its stream arrived whole: every seq once, in order, one terminal event, last.
    async fn finish(self) {
        let events = tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the bystander's stream ends in time")
            .expect("bystander task");
        assert_contiguous(&events, 1);
        assert_eq!(events.len(), 121, "120 tokens and the terminal event");
        let terminals: Vec<&Value> = events.iter().filter(|e| e["type"] != "token").collect();
        assert_eq!(terminals.len(), 1);
        assert_eq!(terminals[0]["type"], "done", "{}", terminals[0]);
        assert_eq!(terminals[0]["finish_reason"], "length");
    }
}

/// Sends raw bytes on a fresh connection and reads until the server closes it; panics if it
/// is still open after `WAIT`.
async fn raw_exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let read = tokio::time::timeout(WAIT, tcp.read_to_end(&mut out)).await;
    assert!(
        read.is_ok(),
        "the server closed the connection within {WAIT:?}"
    );
    String::from_utf8_lossy(&out).into_owned()
}

fn unknown_id() -> String {
    StreamId::random().to_string()
}

#[tokio::test]
async fn missing_or_wrong_credentials_are_401_in_each_routes_shape() {
    let edge = TestEdge::with(api_keys).await;
    let base = edge.url("");
    let bystander = Bystander::start(&base, Some(ALICE)).await;
    let http = reqwest::Client::new();

    let r = http
        .post(edge.url("/v1/streams"))
        .json(&fast("x", 4, 1))
        .send()
        .await
        .expect("send");
    assert_eq!(
        r.headers()["www-authenticate"],
        r#"Bearer realm="tokenfan""#
    );
    refused(r, 401, "missing_credentials").await;

    for credential in [
        "Bearer sk-wrong-0123456789abcdef",
        "Bearer ",
        "Basic YWxpY2U6eA==",
    ] {
        let r = http
            .post(edge.url("/v1/streams"))
            .header("authorization", credential)
            .json(&fast("x", 4, 1))
            .send()
            .await
            .expect("send");
        let challenge = r.headers()["www-authenticate"].to_str().expect("ascii");
        assert!(
            challenge.contains(r#"error="invalid_token""#),
            "{challenge}"
        );
        refused(r, 401, "invalid_credentials").await;
    }

    // The OpenAI routes answer in OpenAI's shape (the SDKs raise AuthenticationError).
    let r = client("sk-wrong-0123456789abcdef")
        .post(edge.url("/v1/chat/completions"))
        .json(&json!({"model": "tokenfan-mock", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    let body: Value = r.json().await.expect("json");
    assert_openai_error(&body, "invalid_request_error", "invalid_api_key");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.contains("invalid_credentials"), "{body}");
    let r = http.get(edge.url("/v1/models")).send().await.expect("send");
    assert_eq!(r.status(), 401);
    assert_openai_error(
        &r.json().await.expect("json"),
        "invalid_request_error",
        "invalid_api_key",
    );

    // Every stream endpoint checks credentials before looking the stream up.
    let id = unknown_id();
    for (method, path) in [
        (reqwest::Method::GET, format!("/v1/streams/{id}")),
        (reqwest::Method::GET, format!("/v1/streams/{id}/events")),
        (reqwest::Method::GET, format!("/v1/streams/{id}/poll")),
        (reqwest::Method::DELETE, format!("/v1/streams/{id}")),
        (reqwest::Method::POST, format!("/v1/streams/{id}/ticket")),
    ] {
        let r = http
            .request(method.clone(), edge.url(&path))
            .send()
            .await
            .expect("send");
        refused(r, 401, "missing_credentials").await;
    }
    assert_eq!(TcpWs::open(&base, "", &[]).await.err(), Some(401));
    let wrong = [("authorization", "Bearer sk-wrong-0123456789abcdef")];
    assert_eq!(TcpWs::open(&base, "", &wrong).await.err(), Some(401));

    // An unauthenticated client cannot make the edge wait for its body: 401 at once.
    let answer = raw_exchange(
        edge.addr,
        b"POST /v1/streams HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
          content-length: 1000000\r\n\r\n{",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");

    // The demo page and health need nothing (metrics are on the admin listener).
    for path in ["/", "/healthz"] {
        let r = http.get(edge.url(path)).send().await.expect("send");
        assert_eq!(r.status(), 200, "{path}");
    }

    // A valid key works, and the new stream comes with a ticket.
    let r = client(ALICE)
        .post(edge.url("/v1/streams"))
        .json(&fast("hello", 4, 1))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 201);
    let header = r.headers()["x-stream-ticket"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(
        !r.headers().contains_key("set-cookie"),
        "no cookie configured"
    );
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["ticket"], header);
    assert!(header.starts_with("tft1."), "{header}");
    assert!(
        body["ticket_expires_at"]
            .as_u64()
            .is_some_and(|t| t as i64 > now())
    );
    bystander.finish().await;
}

#[tokio::test]
async fn jwts_are_checked_for_signature_expiry_audience_and_issuer() {
    let edge = TestEdge::with(jwt_hs256).await;
    let base = edge.url("");
    let bystander = Bystander::start(&base, Some(&hs256(&claims("acme")))).await;

    let post = |token: String| {
        let url = edge.url("/v1/streams");
        async move {
            client(&token)
                .post(url)
                .json(&fast("jwt", 4, 1))
                .send()
                .await
                .expect("send")
        }
    };
    let mut c = claims("acme");
    c.insert("exp".into(), json!(now() - 3600));
    refused(post(hs256(&c)).await, 401, "expired_credentials").await;

    let mut c = claims("acme");
    c.insert("aud".into(), json!("someone-else"));
    let body = refused(post(hs256(&c)).await, 401, "invalid_credentials").await;
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("audience")
    );

    let mut c = claims("acme");
    c.insert("iss".into(), json!("https://evil.test"));
    let body = refused(post(hs256(&c)).await, 401, "invalid_credentials").await;
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("issuer")
    );

    for claim in ["exp", "aud", "iss"] {
        let mut c = claims("acme");
        c.remove(claim);
        refused(post(hs256(&c)).await, 401, "invalid_credentials").await;
    }
    // A claim of the wrong type is not skipped.
    let mut c = claims("acme");
    c.insert("exp".into(), json!("never"));
    refused(post(hs256(&c)).await, 401, "invalid_credentials").await;
    let mut c = claims("acme");
    c.insert("nbf".into(), json!("99999999999"));
    refused(post(hs256(&c)).await, 401, "invalid_credentials").await;
    let mut c = claims("acme");
    c.insert("nbf".into(), json!(now() + 3600));
    refused(post(hs256(&c)).await, 401, "invalid_credentials").await;

    // Another secret, a tampered payload, `alg: none`, garbage.
    let forged = jwt::sign(
        SigningAlgorithm::HS256,
        b"not-the-secret-0123456789abcdefgh",
        None,
        &claims("acme"),
    )
    .expect("sign");
    refused(post(forged).await, 401, "invalid_credentials").await;
    let good = hs256(&claims("acme"));
    let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
    let mut other = claims("globex");
    other.insert("exp".into(), json!(now() + 600));
    parts[1] = jwt::sign(SigningAlgorithm::HS256, b"x", None, &other)
        .expect("sign")
        .split('.')
        .nth(1)
        .expect("payload")
        .to_owned();
    refused(post(parts.join(".")).await, 401, "invalid_credentials").await;
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let none = format!(
        "{}.{}.",
        b64.encode(r#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(serde_json::to_vec(&claims("acme")).expect("json"))
    );
    refused(post(none).await, 401, "invalid_credentials").await;
    refused(post("not.a.jwt".into()).await, 401, "invalid_credentials").await;

    // Valid: the `tenant` claim names the tenant; without it, `sub` does.
    let acme = client(&hs256(&claims("acme")));
    let id = create(&acme, &base, &[], fast("acme", 4, 2)).await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let mut c = claims("ignored");
    c.remove("tenant");
    c.insert("sub".into(), json!("carol"));
    let carol = client(&hs256(&c));
    let r = carol
        .get(edge.url(&format!("/v1/streams/{id}")))
        .send()
        .await
        .expect("send");
    refused(r, 404, "stream_not_found").await;
    let mut other_user = claims("acme");
    other_user.insert("sub".into(), json!("user-2"));
    let events = long_poll_all(&client(&hs256(&other_user)), &base, &id, 0).await;
    assert_contiguous(&events, 1);
    let carols = create(&carol, &base, &[], fast("carol", 4, 3)).await;
    assert!(carols["ticket"].as_str().is_some());
    bystander.finish().await;
}

#[tokio::test]
async fn rs256_tokens_verify_against_a_pem_key_or_a_jwks_file() {
    let pem_edge = TestEdge::with(|c| {
        c.auth.mode = AuthMode::Jwt;
        c.auth.jwt_rs256_public_key = Some(fixture("rs256-test-public.pem"));
        c.auth.jwt_allow_any_audience = true;
    })
    .await;
    let base = pem_edge.url("");
    let mut c = claims("acme");
    c.remove("aud");
    c.remove("iss");
    let bystander = Bystander::start(&base, Some(&rs256(&c, None))).await;
    create(&client(&rs256(&c, None)), &base, &[], fast("rs", 4, 1)).await;

    // The public key used as an HMAC secret (algorithm confusion) is refused.
    let public = std::fs::read(fixture("rs256-test-public.pem")).expect("key");
    let confused = jwt::sign(SigningAlgorithm::HS256, &public, None, &c).expect("sign");
    let r = client(&confused)
        .post(pem_edge.url("/v1/streams"))
        .json(&fast("x", 4, 1))
        .send()
        .await
        .expect("send");
    refused(r, 401, "invalid_credentials").await;
    // A flipped signature byte.
    let mut token = rs256(&c, None).into_bytes();
    let last = token.len() - 2;
    token[last] = if token[last] == b'A' { b'B' } else { b'A' };
    let r = client(&String::from_utf8(token).expect("ascii"))
        .post(pem_edge.url("/v1/streams"))
        .json(&fast("x", 4, 1))
        .send()
        .await
        .expect("send");
    refused(r, 401, "invalid_credentials").await;
    let mut expired = c.clone();
    expired.insert("exp".into(), json!(now() - 3600));
    let r = client(&rs256(&expired, None))
        .post(pem_edge.url("/v1/streams"))
        .json(&fast("x", 4, 1))
        .send()
        .await
        .expect("send");
    refused(r, 401, "expired_credentials").await;

    let jwks_edge = TestEdge::with(|c| {
        c.auth.mode = AuthMode::Jwt;
        c.auth.jwt_jwks_file = Some(fixture("rs256-test-jwks.json"));
        c.auth.jwt_audience = vec![AUDIENCE.into()];
        c.auth.jwt_issuer = Some(ISSUER.into());
    })
    .await;
    let with_aud = claims("acme");
    create(
        &client(&rs256(&with_aud, Some("test-key-1"))),
        &jwks_edge.url(""),
        &[],
        fast("jwks", 4, 1),
    )
    .await;
    let r = client(&rs256(&c, Some("test-key-1")))
        .post(jwks_edge.url("/v1/streams"))
        .json(&fast("x", 4, 1))
        .send()
        .await
        .expect("send");
    refused(r, 401, "invalid_credentials").await;
    // A token of the same identity provider meant for another application.
    let mut other_app = claims("acme");
    other_app.insert("aud".into(), json!("another-app"));
    let r = client(&rs256(&other_app, Some("test-key-1")))
        .post(jwks_edge.url("/v1/streams"))
        .json(&fast("x", 4, 1))
        .send()
        .await
        .expect("send");
    refused(r, 401, "invalid_credentials").await;
    bystander.finish().await;
}

#[test]
fn rs256_without_audience_and_issuer_is_refused_at_start_unless_allowed() {
    let mut config = EdgeConfig::defaults();
    config.auth.mode = AuthMode::Jwt;
    config.auth.jwt_jwks_file = Some(fixture("rs256-test-jwks.json"));
    for (audience, issuer) in [(false, false), (true, false), (false, true)] {
        config.auth.jwt_audience = if audience {
            vec![AUDIENCE.into()]
        } else {
            vec![]
        };
        config.auth.jwt_issuer = issuer.then(|| ISSUER.into());
        let err = config.validate().expect_err("needs aud and iss");
        assert!(err.to_string().contains("--jwt-audience"), "{err}");
    }
    config.auth.jwt_allow_any_audience = true;
    config.validate().expect("explicitly allowed");
    config.auth.jwt_allow_any_audience = false;
    config.auth.jwt_audience = vec![AUDIENCE.into()];
    config.auth.jwt_issuer = Some(ISSUER.into());
    config.validate().expect("both given");
}

#[tokio::test]
async fn other_tenants_get_the_unknown_stream_404_on_every_transport_and_on_stop() {
    let edge = TestEdge::with(api_keys).await;
    let base = edge.url("");
    let (alice, bob) = (client(ALICE), client(BOB));
    let bystander = Bystander::start(&base, Some(BOB)).await;
    let id = create(&alice, &base, &[], slow("alice's", 60, 20)).await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    // Alice follows her stream over SSE while Bob probes it.
    let reader = {
        let alice = alice.clone();
        let url = edge.url(&format!("/v1/streams/{id}/events"));
        tokio::spawn(async move {
            let r = alice.get(url).send().await.expect("SSE");
            assert_eq!(r.status(), 200);
            stream_events(&read_sse(r).await.0)
        })
    };

    let unknown = unknown_id();
    let body_of = |r: reqwest::Response| async move {
        assert_eq!(r.status(), 404);
        r.json::<Value>().await.expect("json")
    };
    let expected = body_of(
        bob.get(edge.url(&format!("/v1/streams/{unknown}")))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(expected["error"]["code"], "stream_not_found");
    for (method, path) in [
        ("GET", format!("/v1/streams/{id}")),
        ("GET", format!("/v1/streams/{id}?after=1")),
        ("GET", format!("/v1/streams/{id}/events")),
        ("GET", format!("/v1/streams/{id}/events?format=openai")),
        ("GET", format!("/v1/streams/{id}/poll?timeout_ms=0")),
        ("DELETE", format!("/v1/streams/{id}")),
        ("POST", format!("/v1/streams/{id}/ticket")),
    ] {
        let method: reqwest::Method = method.parse().expect("method");
        let mut request = bob.request(method, edge.url(&path));
        if path.ends_with("/events") {
            request = request.header("last-event-id", "3");
        }
        let got = body_of(request.send().await.expect("send")).await;
        assert_eq!(got, expected, "{path}: same body as an unknown stream");
    }
    // WebSocket: subscribe, cancel and unsubscribe answer like an unknown id.
    let mut ws = TcpWs::open(&base, "", &[("authorization", &format!("Bearer {BOB}"))])
        .await
        .expect("upgrade");
    let mut errors = Vec::new();
    for target in [&unknown, &id] {
        for kind in ["subscribe", "cancel", "unsubscribe"] {
            ws.send_json(json!({"type": kind, "stream_id": target}))
                .await;
        }
        // `unsubscribe` of a stream the socket does not know answers with the same error.
        for _ in 0..3 {
            let mut e = ws.next_json().await;
            e.as_object_mut().expect("object").remove("stream_id");
            errors.push(e);
        }
    }
    assert_eq!(
        errors[..3],
        errors[3..],
        "foreign = unknown on the socket too"
    );
    assert!(
        errors.iter().all(|e| e["code"] == "stream_not_found"),
        "{errors:?}"
    );

    // Bob's stop did nothing: Alice's stream ran to its end, exactly once.
    let events = tokio::time::timeout(WAIT, reader)
        .await
        .expect("in time")
        .expect("reader");
    assert_contiguous(&events, 1);
    assert_eq!(events.len(), 61);
    assert_eq!(
        events[60]["finish_reason"], "length",
        "not cancelled by Bob"
    );
    bystander.finish().await;
}

#[tokio::test]
async fn an_expired_stream_is_410_for_its_tenant_and_404_for_others() {
    let edge = TestEdge::with(|c| {
        api_keys(c);
        c.streams.history_ttl_secs = 1;
    })
    .await;
    let base = edge.url("");
    let (alice, bob) = (client(ALICE), client(BOB));
    let id = create(&alice, &base, &[], fast("short", 3, 1)).await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    wait_until(WAIT, || async {
        let r = alice
            .get(edge.url(&format!("/v1/streams/{id}")))
            .send()
            .await
            .ok()?;
        (r.status() == 410).then_some(())
    })
    .await;
    let unknown = bob
        .get(edge.url(&format!("/v1/streams/{}", unknown_id())))
        .send()
        .await
        .expect("send");
    let unknown: Value = unknown.json().await.expect("json");
    let r = bob
        .get(edge.url(&format!("/v1/streams/{id}")))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.expect("json"), unknown);
}

#[tokio::test]
async fn a_ticket_reads_its_own_stream_only() {
    let edge = TestEdge::with(|c| {
        api_keys(c);
        c.auth.auth_cookie = Some("tf_auth".into());
    })
    .await;
    let base = edge.url("");
    let alice = client(ALICE);
    let bystander = Bystander::start(&base, Some(BOB)).await;
    let r = alice
        .post(edge.url("/v1/streams"))
        .json(&slow("ticketed", 30, 10))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 201);
    let cookie = r.headers()["set-cookie"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let a: Value = r.json().await.expect("json");
    let (a_id, ticket) = (
        a["id"].as_str().expect("id").to_owned(),
        a["ticket"].as_str().expect("ticket").to_owned(),
    );
    for part in [
        format!("tf_auth={ticket}"),
        format!("Path=/v1/streams/{a_id}"),
        "Max-Age=300".into(),
        "HttpOnly".into(),
        "SameSite=Strict".into(),
    ] {
        assert!(cookie.contains(&part), "{part} in {cookie}");
    }
    assert!(!cookie.contains("Secure"), "plain HTTP: {cookie}");
    let b_id = create(&alice, &base, &[], fast("other", 4, 2)).await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let anon = reqwest::Client::new();

    // `?ticket=` on SSE (EventSource), long-poll and short-poll of its stream.
    let r = anon
        .get(edge.url(&format!("/v1/streams/{a_id}/events?ticket={ticket}")))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let events = stream_events(&read_sse(r).await.0);
    assert_contiguous(&events, 1);
    assert_eq!(events.len(), 31);
    let r = anon
        .get(edge.url(&format!("/v1/streams/{a_id}/poll?after=0&ticket={ticket}")))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let r = anon
        .get(edge.url(&format!("/v1/streams/{a_id}?ticket={ticket}")))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.expect("json")["status"], "done");

    // Another stream, or anything but reading: 403.
    for path in [
        format!("/v1/streams/{b_id}/events?ticket={ticket}"),
        format!("/v1/streams/{b_id}/poll?ticket={ticket}"),
        format!("/v1/streams/{b_id}?ticket={ticket}"),
        format!("/v1/streams/{}?ticket={ticket}", unknown_id()),
    ] {
        let r = anon.get(edge.url(&path)).send().await.expect("send");
        refused(r, 403, "ticket_scope").await;
    }
    let r = anon
        .delete(edge.url(&format!("/v1/streams/{a_id}?ticket={ticket}")))
        .send()
        .await
        .expect("send");
    refused(r, 403, "ticket_scope").await;
    let r = anon
        .post(edge.url(&format!("/v1/streams?ticket={ticket}")))
        .json(&fast("x", 4, 1))
        .send()
        .await
        .expect("send");
    refused(r, 403, "ticket_scope").await;

    // Expired, tampered, signed with another secret, repeated: 401.
    let key = TicketKey::new(TICKET_SECRET.as_bytes());
    let a_stream = StreamId::parse(&a_id).expect("id");
    let expired = key.sign(&a_stream, "alice", now() as u64 - 5);
    let r = anon
        .get(edge.url(&format!("/v1/streams/{a_id}?ticket={expired}")))
        .send()
        .await
        .expect("send");
    refused(r, 401, "expired_ticket").await;
    let mut tampered = ticket.clone().into_bytes();
    let last = tampered.len() - 2;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).expect("ascii");
    let foreign = TicketKey::new(b"some-other-replica-secret-0123456789").sign(
        &a_stream,
        "alice",
        now() as u64 + 60,
    );
    let other_tenant = key.sign(&a_stream, "bob", now() as u64 + 60);
    for bad in [&tampered, &foreign] {
        let r = anon
            .get(edge.url(&format!("/v1/streams/{a_id}?ticket={bad}")))
            .send()
            .await
            .expect("send");
        refused(r, 401, "invalid_ticket").await;
    }
    let r = anon
        .get(edge.url(&format!(
            "/v1/streams/{a_id}?ticket={ticket}&ticket={ticket}"
        )))
        .send()
        .await
        .expect("send");
    refused(r, 401, "invalid_ticket").await;
    // A genuine ticket naming another tenant for the stream still finds nothing.
    let r = anon
        .get(edge.url(&format!("/v1/streams/{a_id}?ticket={other_tenant}")))
        .send()
        .await
        .expect("send");
    refused(r, 404, "stream_not_found").await;

    // The cookie carries a ticket or a credential.
    let r = anon
        .get(edge.url(&format!("/v1/streams/{a_id}/poll?after=0")))
        .header("cookie", format!("theme=dark; tf_auth={ticket}"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let r = anon
        .get(edge.url(&format!("/v1/streams/{b_id}/poll")))
        .header("cookie", format!("tf_auth={ticket}"))
        .send()
        .await
        .expect("send");
    refused(r, 403, "ticket_scope").await;
    let r = anon
        .get(edge.url(&format!("/v1/streams/{b_id}")))
        .header("cookie", format!("tf_auth={ALICE}"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let r = anon
        .get(edge.url(&format!("/v1/streams/{a_id}")))
        .header("cookie", format!("tf_auth={expired}"))
        .send()
        .await
        .expect("send");
    refused(r, 401, "expired_ticket").await;

    // WebSocket with a ticket: subscribe to its stream; nothing else.
    let mut ws = TcpWs::open(&base, &format!("?ticket={ticket}"), &[])
        .await
        .expect("upgrade with a ticket");
    ws.send_json(json!({"type": "subscribe", "stream_id": a_id, "after": 0}))
        .await;
    let events = ws.events_until_terminal(&a_id).await;
    assert_eq!(events.len(), 31);
    for msg in [
        json!({"type": "subscribe", "stream_id": b_id}),
        json!({"type": "cancel", "stream_id": a_id}),
        json!({"type": "start", "request_id": "r1", "request": fast("x", 4, 1)}),
    ] {
        ws.send_json(msg.clone()).await;
        let e = ws.next_json().await;
        assert_eq!(e["code"], "ticket_scope", "{msg} → {e}");
    }
    let upgrade = TcpWs::open(&base, &format!("?ticket={expired}"), &[]).await;
    assert_eq!(upgrade.err(), Some(401));

    // A fresh ticket for a stream of one's own.
    let r = alice
        .post(edge.url(&format!("/v1/streams/{b_id}/ticket")))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let fresh: Value = r.json().await.expect("json");
    let fresh = fresh["ticket"].as_str().expect("ticket");
    let r = anon
        .get(edge.url(&format!("/v1/streams/{b_id}?ticket={fresh}")))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let r = client(BOB)
        .post(edge.url(&format!("/v1/streams/{b_id}/ticket")))
        .send()
        .await
        .expect("send");
    refused(r, 404, "stream_not_found").await;
    bystander.finish().await;
}

#[tokio::test]
async fn tenant_rate_limits_answer_429_with_retry_after() {
    // One stream per 20 s after a burst of 2: the third creation in a row is refused.
    let edge = TestEdge::with(|c| {
        api_keys(c);
        c.limits.tenant_streams_per_sec = 0.05;
        c.limits.tenant_streams_burst = Some(2);
    })
    .await;
    let base = edge.url("");
    let bystander = Bystander::start(&base, Some(BOB)).await;
    let alice = client(ALICE);
    create(&alice, &base, &[], fast("one", 4, 1)).await;
    create(&alice, &base, &[], fast("two", 4, 2)).await;
    let r = alice
        .post(edge.url("/v1/streams"))
        .json(&fast("three", 4, 3))
        .send()
        .await
        .expect("send");
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=20).contains(&retry), "Retry-After {retry}");
    refused(r, 429, "rate_limited").await;
    let r = alice
        .post(edge.url("/v1/chat/completions"))
        .json(&json!({"model": "tokenfan-mock", "stream": true,
            "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    assert_openai_error(
        &r.json().await.expect("json"),
        "requests",
        "rate_limit_exceeded",
    );
    let mut ws = TcpWs::open(&base, "", &[("authorization", &format!("Bearer {ALICE}"))])
        .await
        .expect("upgrade");
    ws.send_json(json!({"type": "start", "request_id": "r", "request": fast("x", 4, 1)}))
        .await;
    let e = ws.next_json().await;
    assert_eq!(
        (e["code"].clone(), e["request_id"].clone()),
        (json!("rate_limited"), json!("r"))
    );
    // Another tenant has its own bucket.
    create(&client(BOB), &base, &[], fast("bob", 4, 1)).await;
    bystander.finish().await;
}

#[tokio::test]
async fn concurrent_streams_per_tenant_are_capped_and_freed_when_streams_end() {
    let edge = TestEdge::with(|c| {
        api_keys(c);
        c.limits.tenant_max_concurrent_streams = 2;
    })
    .await;
    let base = edge.url("");
    let bystander = Bystander::start(&base, Some(BOB)).await;
    let alice = client(ALICE);
    let first = create(&alice, &base, &[], slow("a", 500, 50)).await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let second = create(&alice, &base, &[], fast("b", 6, 2)).await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    // The second one finishes by itself and frees its slot; until it does, a third waits.
    let events = long_poll_all(&alice, &base, &second, 0).await;
    assert_eq!(events.last().expect("terminal")["type"], "done");
    let third = wait_until(WAIT, || async {
        let r = alice
            .post(edge.url("/v1/streams"))
            .json(&slow("c", 500, 50))
            .send()
            .await
            .ok()?;
        (r.status() == 201).then_some(())?;
        Some(r.json::<Value>().await.ok()?["id"].as_str()?.to_owned())
    })
    .await;
    let r = alice
        .post(edge.url("/v1/streams"))
        .json(&fast("d", 4, 4))
        .send()
        .await
        .expect("send");
    assert_eq!(r.headers()["retry-after"], "1");
    refused(r, 429, "concurrency_limited").await;
    // Bob is not held back by Alice.
    create(&client(BOB), &base, &[], fast("bob", 4, 1)).await;
    // Stopping a stream frees its slot at once.
    let r = alice
        .delete(edge.url(&format!("/v1/streams/{first}")))
        .send()
        .await
        .expect("stop");
    assert_eq!(r.status(), 202);
    let fourth = wait_until(WAIT, || async {
        let r = alice
            .post(edge.url("/v1/streams"))
            .json(&fast("e", 4, 5))
            .send()
            .await
            .ok()?;
        (r.status() == 201).then_some(())
    })
    .await;
    let () = fourth;
    let r = alice
        .delete(edge.url(&format!("/v1/streams/{third}")))
        .send()
        .await
        .expect("stop");
    assert_eq!(r.status(), 202);
    bystander.finish().await;
}

#[tokio::test]
async fn connections_per_address_are_capped_when_configured() {
    let edge = TestEdge::with(|c| c.limits.max_connections_per_ip = 3).await;
    let base = edge.url("");
    let bystander = Bystander::start(&base, None).await;
    // The bystander holds one connection; two idle ones make three.
    let idle_one = TcpStream::connect(edge.addr).await.expect("connect");
    let _idle_two = TcpStream::connect(edge.addr).await.expect("connect");
    let r = reqwest::Client::new()
        .get(edge.url("/v1/models"))
        .send()
        .await
        .expect("the refusal is an HTTP answer");
    assert_eq!(r.headers()["retry-after"], "1");
    refused(r, 429, "too_many_connections").await;
    // One closes: a new connection gets through again.
    drop(idle_one);
    wait_until(WAIT, || async {
        let r = reqwest::Client::new()
            .get(edge.url("/v1/models"))
            .send()
            .await
            .ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    bystander.finish().await;
}

#[tokio::test]
async fn websocket_origins_are_checked_with_credentials_too() {
    let edge = TestEdge::with(|c| {
        api_keys(c);
        c.cors_origins = vec!["https://app.example".into()];
    })
    .await;
    let base = edge.url("");
    let bystander = Bystander::start(&base, Some(ALICE)).await;
    let auth = format!("Bearer {ALICE}");
    let foreign = TcpWs::open(
        &base,
        "",
        &[("authorization", &auth), ("origin", "https://evil.example")],
    )
    .await;
    assert_eq!(foreign.err(), Some(403));
    let anonymous = TcpWs::open(&base, "", &[("origin", "https://app.example")]).await;
    assert_eq!(anonymous.err(), Some(401));
    let mut ws = TcpWs::open(
        &base,
        "",
        &[("authorization", &auth), ("origin", "https://app.example")],
    )
    .await
    .expect("allowed origin with a key");
    ws.send_json(json!({"type": "start", "request_id": "r", "request": fast("ws", 6, 1)}))
        .await;
    let started = ws.next_json().await;
    assert_eq!(started["type"], "started");
    assert!(
        started["ticket"]
            .as_str()
            .is_some_and(|t| t.starts_with("tft1."))
    );
    let id = started["stream_id"].as_str().expect("id").to_owned();
    let events = ws.events_until_terminal(&id).await;
    assert_eq!(events.len(), 7);

    // CORS: the preflight needs no credentials; a refusal is readable by the page; the
    // ticket header is exposed.
    let http = reqwest::Client::new();
    let preflight = http
        .request(reqwest::Method::OPTIONS, edge.url("/v1/streams"))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type",
        )
        .send()
        .await
        .expect("preflight");
    assert!(preflight.status().is_success());
    let r = http
        .post(edge.url("/v1/streams"))
        .header("origin", "https://app.example")
        .json(&fast("x", 4, 1))
        .send()
        .await
        .expect("send");
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    refused(r, 401, "missing_credentials").await;
    let r = client(ALICE)
        .post(edge.url("/v1/streams"))
        .header("origin", "https://app.example")
        .json(&fast("x", 4, 1))
        .send()
        .await
        .expect("send");
    let exposed = r.headers()["access-control-expose-headers"]
        .to_str()
        .expect("ascii")
        .to_ascii_lowercase();
    assert!(exposed.contains("x-stream-ticket"), "{exposed}");
    bystander.finish().await;
}

#[tokio::test]
async fn oversized_bodies_and_slow_requests_are_cut_off() {
    let edge = TestEdge::with(|c| {
        c.limits.body_read_timeout_secs = 1;
        c.limits.header_read_timeout_secs = 1;
    })
    .await;
    let base = edge.url("");
    let bystander = Bystander::start(&base, None).await;
    let http = reqwest::Client::new();

    let huge = json!({"prompt": "x".repeat(300 * 1024)});
    let r = http
        .post(edge.url("/v1/streams"))
        .json(&huge)
        .send()
        .await
        .expect("send");
    refused(r, 413, "body_too_large").await;
    let r = http
        .post(edge.url("/v1/chat/completions"))
        .json(&json!({"model": "tokenfan-mock",
            "messages": [{"role": "user", "content": "x".repeat(300 * 1024)}]}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 413);
    assert_openai_error(
        &r.json().await.expect("json"),
        "invalid_request_error",
        "body_too_large",
    );

    // A body that stops arriving: 408 and the connection is closed.
    let answer = raw_exchange(
        edge.addr,
        b"POST /v1/streams HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
          content-length: 100\r\n\r\n{\"prompt\":",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");

    // A body trickled a byte at a time is cut off long before it is complete.
    let mut tcp = TcpStream::connect(edge.addr).await.expect("connect");
    tcp.write_all(
        b"POST /v1/streams HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
          content-length: 1000\r\n\r\n",
    )
    .await
    .expect("headers");
    let (mut rd, mut wr) = tcp.into_split();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let trickle = {
        let sent = sent.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            while sent.load(std::sync::atomic::Ordering::SeqCst) < 1000 {
                tick.tick().await;
                if wr.write_all(b" ").await.is_err() {
                    break;
                }
                sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        })
    };
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(WAIT, rd.read_to_end(&mut answer)).await;
    let sent = sent.load(std::sync::atomic::Ordering::SeqCst);
    trickle.abort();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(closed.is_ok(), "the connection is closed after the 408");
    assert!(
        sent < 1000,
        "cut off before the body was complete ({sent} bytes sent)"
    );

    // Headers that never end: the connection is closed (raw_exchange checks) without an
    // answer to the request.
    let answer = raw_exchange(edge.addr, b"GET /v1/models HTTP/1.1\r\nhost: x\r\n").await;
    assert!(!answer.starts_with("HTTP/1.1 200"), "{answer}");

    // The edge still serves everyone else.
    let r = http.get(edge.url("/v1/models")).send().await.expect("send");
    assert_eq!(r.status(), 200);
    bystander.finish().await;
}

#[tokio::test]
async fn the_demo_page_sends_security_headers() {
    let edge = TestEdge::start().await;
    let r = edge.get("/").await;
    assert_eq!(r.status(), 200);
    let h = r.headers();
    let csp = h["content-security-policy"].to_str().expect("ascii");
    for directive in [
        "default-src 'self'",
        "frame-ancestors 'none'",
        "object-src 'none'",
    ] {
        assert!(csp.contains(directive), "{directive} in {csp}");
    }
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["referrer-policy"], "no-referrer");
    assert!(
        h["permissions-policy"]
            .to_str()
            .expect("ascii")
            .contains("camera=()")
    );
    assert!(
        !h.contains_key("strict-transport-security"),
        "plain HTTP: no HSTS"
    );
}

/// One HTTP/1.1 request over TLS (trusting `root`); the whole answer as text.
async fn tls_exchange(
    addr: std::net::SocketAddr,
    root: rustls_pki_types::CertificateDer<'static>,
    request: &[u8],
) -> String {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).expect("root");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = TcpStream::connect(addr).await.expect("tcp");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = connector.connect(name, tcp).await.expect("handshake");
    tls.write_all(request).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn under_tls_the_page_gets_hsts_and_ticket_cookies_are_secure() {
    let dir = std::env::temp_dir().join(format!("tokenfan-auth-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).expect("write");
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).expect("write");
    let root = cert.cert.der().clone();
    let edge = TestEdge::with(|c| {
        api_keys(c);
        c.auth.auth_cookie = Some("tf_auth".into());
        c.tls_cert = Some(cert_path);
        c.tls_key = Some(key_path);
    })
    .await;
    let page = tls_exchange(
        edge.addr,
        root.clone(),
        b"GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
    )
    .await
    .to_ascii_lowercase();
    assert!(page.starts_with("http/1.1 200"), "{page}");
    assert!(
        page.contains("strict-transport-security: max-age="),
        "HSTS under TLS"
    );
    let body = serde_json::to_string(&fast("tls", 4, 1)).expect("json");
    let request = format!(
        "POST /v1/streams HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {ALICE}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = tls_exchange(edge.addr, root, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    let cookie = answer
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .expect("set-cookie");
    assert!(cookie.contains("; Secure"), "{cookie}");
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

const CLUSTER_AUTH: &[&str] = &[
    "--auth",
    "api-keys",
    "--api-keys",
    "sk-alice-0123456789abcdef:alice,sk-bob-0123456789abcdef00:bob",
    "--ticket-secret",
    "ticket-secret-for-tests-0123456789abcdef",
];

fn options(args: &[&str]) -> EdgeOptions {
    EdgeOptions {
        args: args.iter().map(|a| a.to_string()).collect(),
        ..EdgeOptions::default()
    }
}

#[tokio::test]
async fn tenant_isolation_and_tickets_hold_across_replicas() {
    let cluster = TestCluster::start_with(2, 1, &options(CLUSTER_AUTH)).await;
    let (a, b) = (cluster.edge(0).url(""), cluster.edge(1).url(""));
    let (alice, bob) = (client(ALICE), client(BOB));
    let bystander = Bystander::start(&b, Some(BOB)).await;
    let created = create(&alice, &a, &[], slow("replicated", 60, 20)).await;
    let id = created["id"].as_str().expect("id").to_owned();
    let ticket = created["ticket"].as_str().expect("ticket").to_owned();

    // Replica B has never seen the stream: it reads the tenant from Redis.
    let unknown: Value = bob
        .get(format!("{b}/v1/streams/{}", unknown_id()))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    for (method, path) in [
        ("GET", format!("/v1/streams/{id}")),
        ("GET", format!("/v1/streams/{id}/events")),
        ("GET", format!("/v1/streams/{id}/poll?timeout_ms=0")),
        ("DELETE", format!("/v1/streams/{id}")),
    ] {
        let r = bob
            .request(method.parse().expect("method"), format!("{b}{path}"))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 404, "{path} on replica B");
        assert_eq!(r.json::<Value>().await.expect("json"), unknown, "{path}");
    }
    let mut ws = TcpWs::open(&b, "", &[("authorization", &format!("Bearer {BOB}"))])
        .await
        .expect("upgrade");
    ws.send_json(json!({"type": "subscribe", "stream_id": id}))
        .await;
    assert_eq!(ws.next_json().await["code"], "stream_not_found");

    // The ticket minted by replica A works on replica B (shared secret), for that stream only.
    let r = reqwest::Client::new()
        .get(format!("{b}/v1/streams/{id}/events?ticket={ticket}"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let events = stream_events(&read_sse(r).await.0);
    assert_contiguous(&events, 1);
    assert_eq!(events.len(), 61);
    assert_eq!(
        events[60]["finish_reason"], "length",
        "Bob's stop did nothing"
    );
    let r = reqwest::Client::new()
        .get(format!("{b}/v1/streams/{}?ticket={ticket}", unknown_id()))
        .send()
        .await
        .expect("send");
    refused(r, 403, "ticket_scope").await;
    bystander.finish().await;
}

#[tokio::test]
async fn tenant_limits_are_shared_by_the_replicas() {
    let mut args = CLUSTER_AUTH.to_vec();
    args.extend([
        "--tenant-max-concurrent-streams",
        "2",
        "--tenant-streams-per-sec",
        "0.02",
        "--tenant-streams-burst",
        "4",
    ]);
    let cluster = TestCluster::start_with(2, 1, &options(&args)).await;
    let (a, b) = (cluster.edge(0).url(""), cluster.edge(1).url(""));
    let alice = client(ALICE);
    let bystander = Bystander::start(&a, Some(BOB)).await;
    let id = |v: Value| v["id"].as_str().expect("id").to_owned();
    let one = id(create(&alice, &a, &[], slow("1", 500, 50)).await);
    let two = id(create(&alice, &b, &[], slow("2", 500, 50)).await);
    // Two running, one on each replica: the third is refused on either.
    for base in [&a, &b] {
        let r = alice
            .post(format!("{base}/v1/streams"))
            .json(&fast("3", 4, 3))
            .send()
            .await
            .expect("send");
        assert_eq!(r.headers()["retry-after"], "1");
        refused(r, 429, "concurrency_limited").await;
    }
    // Stopping one (through the other replica) frees a slot for everyone.
    let r = alice
        .delete(format!("{b}/v1/streams/{one}"))
        .send()
        .await
        .expect("stop");
    assert_eq!(r.status(), 202);
    let three = wait_until(WAIT, || async {
        let r = alice
            .post(format!("{a}/v1/streams"))
            .json(&slow("3", 500, 50))
            .send()
            .await
            .ok()?;
        (r.status() == 201).then_some(())?;
        Some(r.json::<Value>().await.ok()?["id"].as_str()?.to_owned())
    })
    .await;
    for stream in [&two, &three] {
        let r = alice
            .delete(format!("{a}/v1/streams/{stream}"))
            .send()
            .await
            .expect("stop");
        assert_eq!(r.status(), 202);
    }
    // The bucket (4 at 0.02/s) is shared too: one more creation empties it, whichever
    // replica counted the earlier ones.
    let four = wait_until(WAIT, || async {
        let r = alice
            .post(format!("{b}/v1/streams"))
            .json(&fast("4", 4, 4))
            .send()
            .await
            .ok()?;
        (r.status() == 201).then_some(())
    })
    .await;
    let () = four;
    let r = alice
        .post(format!("{a}/v1/streams"))
        .json(&fast("5", 4, 5))
        .send()
        .await
        .expect("send");
    refused(r, 429, "rate_limited").await;
    // Bob's limits are his own.
    create(&client(BOB), &b, &[], fast("bob", 4, 1)).await;
    bystander.finish().await;
}

#[tokio::test]
async fn sockets_and_sse_opened_with_a_jwt_end_when_it_expires() {
    let edge = TestEdge::with(|c| {
        jwt_hs256(c);
        c.auth.jwt_leeway_secs = 0;
    })
    .await;
    let base = edge.url("");
    let mut short = claims("acme");
    short.insert("exp".into(), json!(now() + 3));
    let token = hs256(&short);

    // WebSocket: an error message, then close 1008.
    let mut ws = TcpWs::open(&base, "", &[("authorization", &format!("Bearer {token}"))])
        .await
        .expect("upgrade");
    let error = ws.next_json().await;
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["code"], "credentials_expired", "{error}");
    assert_eq!(ws.close_code().await, CloseCode::Policy);

    // POST-SSE: the stream outlives the token; the response ends with `credentials_expired`.
    let mut short = claims("acme");
    short.insert("exp".into(), json!(now() + 3));
    let r = client(&hs256(&short))
        .post(edge.url("/v1/streams"))
        .header("accept", "text/event-stream")
        .json(&json!({"prompt": "long", "max_tokens": 500, "timing": {"inter_token_ms": 100}}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let text = tokio::time::timeout(WAIT, r.text())
        .await
        .expect("the response ends")
        .expect("body");
    let last = text
        .split("\n\n")
        .filter(|f| !f.trim().is_empty())
        .last()
        .expect("a frame");
    assert!(last.starts_with("event: error"), "{last}");
    assert!(last.contains("credentials_expired"), "{last}");
    assert!(!text.contains("event: done"), "cut before the end: {text}");
}
