//! One port, every HTTP flavour: HTTP/1.1, h2c with prior knowledge, and TLS with ALPN h2 and
//! http/1.1.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use serde_json::Value;
use tokenfan_testkit::{
    edge::{TestEdge, fast},
    sse::{SseEvent, read_sse},
    tls::TlsDir,
};

#[tokio::test]
async fn h2c_prior_knowledge_and_http1_on_the_same_port() {
    let edge = TestEdge::start().await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let r = h2.get(edge.url("/v1/models")).send().await.expect("h2c");
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);

    let r = h2
        .post(edge.url("/v1/streams"))
        .header("accept", "text/event-stream")
        .json(&fast("over h2", 30, 4))
        .send()
        .await
        .expect("POST over h2c");
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let (h2_events, _) = read_sse(r).await;

    let r = edge
        .http
        .post(edge.url("/v1/streams"))
        .header("accept", "text/event-stream")
        .json(&fast("over h2", 30, 4))
        .send()
        .await
        .expect("POST over HTTP/1.1");
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    let (h1_events, _) = read_sse(r).await;
    let data = |v: &[SseEvent]| v.iter().map(|e| e.data.clone()).collect::<Vec<_>>();
    assert_eq!(data(&h2_events), data(&h1_events), "same answer on both");
    assert!(h2_events.len() > 30);
}

async fn tls_get(
    addr: std::net::SocketAddr,
    root: CertificateDer<'static>,
    alpn: &[u8],
) -> (Vec<u8>, http::Version, Value) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).expect("root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    let tls = connector
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("TLS handshake");
    let negotiated = tls
        .get_ref()
        .1
        .alpn_protocol()
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    let io = TokioIo::new(tls);
    let request = http::Request::get(format!("https://localhost:{}/v1/models", addr.port()))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = if negotiated == b"h2" {
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .expect("h2 handshake");
        tokio::spawn(conn);
        sender.send_request(request).await.expect("h2 request")
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .expect("h1 handshake");
        tokio::spawn(conn);
        sender.send_request(request).await.expect("h1 request")
    };
    let version = response.version();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (
        negotiated,
        version,
        serde_json::from_slice(&body).expect("json"),
    )
}

#[tokio::test]
async fn tls_negotiates_h2_and_http1_with_alpn() {
    let tls = TlsDir::new();
    let ca = std::fs::read(&tls.files.ca).expect("the CA file");
    let root = CertificateDer::from_pem_slice(&ca).expect("a PEM certificate");
    let edge = TestEdge::with(|c| {
        c.tls_cert = Some(tls.files.cert.clone());
        c.tls_key = Some(tls.files.key.clone());
    })
    .await;
    let (alpn, version, body) = tls_get(edge.addr, root.clone(), b"h2").await;
    assert_eq!(alpn, b"h2");
    assert_eq!(version, http::Version::HTTP_2);
    assert_eq!(body["object"], "list");
    let (alpn, version, body) = tls_get(edge.addr, root, b"http/1.1").await;
    assert_eq!(alpn, b"http/1.1");
    assert_eq!(version, http::Version::HTTP_11);
    assert_eq!(body["object"], "list");
    // Plain HTTP on the TLS port is not served.
    assert!(edge.http.get(edge.url("/v1/models")).send().await.is_err());
}

#[tokio::test]
async fn cors_follows_the_configured_origins() {
    let edge = TestEdge::with(|c| c.cors_origins = vec!["http://app.example".into()]).await;
    let preflight = edge
        .http
        .request(reqwest::Method::OPTIONS, edge.url("/v1/streams"))
        .header("origin", "http://app.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type,last-event-id,authorization,traceparent",
        )
        .send()
        .await
        .expect("preflight");
    assert!(preflight.status().is_success());
    let h = preflight.headers();
    assert_eq!(h["access-control-allow-origin"], "http://app.example");
    let allowed = h["access-control-allow-headers"]
        .to_str()
        .expect("headers")
        .to_lowercase();
    for name in [
        "content-type",
        "last-event-id",
        "authorization",
        "traceparent",
    ] {
        assert!(allowed.contains(name), "{name} in {allowed}");
    }
    let r = edge
        .http
        .post(edge.url("/v1/streams"))
        .header("origin", "http://app.example")
        .json(&fast("cors", 3, 1))
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 201);
    let exposed = r.headers()["access-control-expose-headers"]
        .to_str()
        .expect("h")
        .to_lowercase();
    assert!(exposed.contains("x-stream-id"));

    let foreign = edge
        .http
        .get(edge.url("/v1/models"))
        .header("origin", "http://evil.example")
        .send()
        .await
        .expect("GET");
    assert!(
        foreign
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );

    // Without configured origins no CORS headers are sent at all.
    let plain = TestEdge::start().await;
    let r = plain
        .http
        .get(plain.url("/v1/models"))
        .header("origin", "http://app.example")
        .send()
        .await
        .expect("GET");
    assert!(r.headers().get("access-control-allow-origin").is_none());
}
