//! Production-shaped backends: a 3-node NATS cluster with TLS (client certificates verified)
//! and password authentication, a TLS-only Redis with an ACL user, and NATS token, NKey and
//! `.creds` (operator mode) authentication. The bus and store conformance suites run against each; edges started
//! against a seed list whose first node is down deliver a stream exactly once while the NATS
//! node their owner publishes through is killed.

mod common;

use std::{path::PathBuf, time::Duration};

use common::{EdgeOptions, Generator};
use serde_json::Value;
use tokenfan_edge::{
    bus::{Bus as _, nats::NatsArgs, nats::NatsBus},
    ids::StreamId,
    limits::Limiter,
    redis_conn::RedisArgs,
    secret::Secret,
    store::{Store as _, redis::RedisStore},
};
use tokenfan_testkit::{
    edge::{expected_text, get_json, slow, try_get_json},
    servers::{NatsCluster, NatsServer, RedisServer},
    sse::{assert_contiguous, read_sse, stream_events, text_of},
    tls::TlsDir,
    wait::wait_until,
};

const PASSWORD: &str = "n4ts-s3cret";
const REDIS_PASSWORD: &str = "r3dis-s3cret";

/// The `tls` and `authorization` blocks of every node: client certificates required, one user.
fn secure_nats(tls: &TlsDir) -> String {
    let f = &tls.files;
    format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n  timeout: 2\n}}\n\
         authorization {{\n  users = [ {{ user: tokenfan, password: \"{PASSWORD}\" }} ]\n}}\n",
        f.cert.display(),
        f.key.display(),
        f.ca.display()
    )
}

fn nats_args(tls: &TlsDir, password_file: PathBuf) -> NatsArgs {
    NatsArgs {
        nats_user: Some("tokenfan".into()),
        nats_password_file: Some(password_file),
        nats_ca_file: Some(tls.files.ca.clone()),
        nats_client_cert: Some(tls.files.cert.clone()),
        nats_client_key: Some(tls.files.key.clone()),
        ..NatsArgs::default()
    }
}

/// A TLS-only Redis that verifies client certificates, with the default user disabled and
/// one ACL user limited to tokenfan's keys and to commands outside `@dangerous` (the ACL
/// that deploy/ and docs/operations.md recommend).
fn secure_redis(tls: &TlsDir) -> RedisServer {
    let password = format!(">{REDIS_PASSWORD}");
    RedisServer::start_tls(
        &tls.files,
        true,
        &[
            "--user",
            "default",
            "off",
            "--user",
            "tokenfan",
            "on",
            &password,
            "~tokenfan:*",
            "+@all",
            "-@dangerous",
        ],
    )
}

fn redis_args(tls: &TlsDir) -> RedisArgs {
    RedisArgs {
        redis_username: Some("tokenfan".into()),
        redis_password: Some(Secret::new(REDIS_PASSWORD)),
        redis_ca_file: Some(tls.files.ca.clone()),
        redis_client_cert: Some(tls.files.cert.clone()),
        redis_client_key: Some(tls.files.key.clone()),
        ..RedisArgs::default()
    }
}

#[tokio::test]
async fn nats_cluster_with_tls_and_passwords_conforms_and_refuses_bad_credentials() {
    let tls = TlsDir::new();
    let mut cluster = NatsCluster::start(3, &secure_nats(&tls));
    let password = tls.write("nats-password", &format!("{PASSWORD}\n"));
    let args = nats_args(&tls, password.clone());

    // The first seed is down: the connect moves on to the next.
    cluster.nodes[0].kill();
    let seeds = cluster.urls("nats");
    let bus = NatsBus::connect_with(&seeds, &args, "conformance")
        .await
        .expect("connects past the dead seed");
    tokenfan_testkit::conformance::bus::run(&bus).await;

    // Across nodes: a subscriber on node 1, a publisher on node 2 (interest crosses the route
    // asynchronously, so publish until it arrives).
    let one = cluster.nodes[1].addr;
    let two = cluster.nodes[2].addr;
    let sub_bus = NatsBus::connect_with(&format!("tls://{one}"), &args, "sub")
        .await
        .expect("node 1");
    let pub_bus = NatsBus::connect_with(&format!("tls://{two}"), &args, "pub")
        .await
        .expect("node 2");
    let id = StreamId::random();
    let mut feed = sub_bus.subscribe(&id).await.expect("subscribe");
    let event = std::sync::Arc::new(tokenfan_edge::event::Event::new(
        1,
        tokenfan_edge::event::EventKind::Token { text: "x".into() },
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let got = loop {
        pub_bus
            .publish(&id, vec![event.clone()].into(), None)
            .await
            .expect("publish");
        if let Ok(Some(got)) = tokio::time::timeout(Duration::from_millis(200), feed.recv()).await {
            break got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a batch crosses the route"
        );
    };
    assert_eq!(got.events[0].seq, 1);

    // Wrong password: a clear error that does not show the password.
    let wrong = tls.write("wrong-password", "not-it");
    let err = NatsBus::connect_with(&seeds, &nats_args(&tls, wrong), "wrong")
        .await
        .expect_err("wrong password");
    let text = err.to_string();
    assert!(
        text.contains("cannot connect to NATS"),
        "a clear error: {text}"
    );
    assert!(
        !text.contains("not-it") && !text.contains(PASSWORD),
        "{text}"
    );

    // No client certificate: the servers verify clients, so the handshake fails.
    let no_cert = NatsArgs {
        nats_client_cert: None,
        nats_client_key: None,
        ..args.clone()
    };
    assert!(
        NatsBus::connect_with(&seeds, &no_cert, "no-cert")
            .await
            .is_err()
    );
    // Plain text to a TLS-only cluster: refused.
    let no_tls = NatsArgs {
        nats_ca_file: None,
        nats_client_cert: None,
        nats_client_key: None,
        ..args.clone()
    };
    assert!(
        NatsBus::connect_with(&seeds, &no_tls, "no-tls")
            .await
            .is_err()
    );
}

#[tokio::test]
async fn nats_token_and_nkey_authentication() {
    let dir = TlsDir::new();
    // Token.
    let token_server = NatsServer::start_with_config("authorization { token: \"t0ken-abc\" }");
    let token_file = dir.write("token", "t0ken-abc\n");
    let args = NatsArgs {
        nats_token_file: Some(token_file),
        ..NatsArgs::default()
    };
    let bus = NatsBus::connect_with(&token_server.url(), &args, "token")
        .await
        .expect("token accepted");
    tokenfan_testkit::conformance::bus::run(&bus).await;
    assert!(
        NatsBus::connect(&token_server.url(), "anonymous")
            .await
            .is_err(),
        "no token, no connection"
    );

    // NKey: the server knows the public key, the edge holds the seed.
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().expect("seed");
    let nkey_server = NatsServer::start_with_config(&format!(
        "authorization {{ users = [ {{ nkey: \"{}\" }} ] }}",
        user.public_key()
    ));
    let args = NatsArgs {
        nats_nkey_file: Some(dir.write("user.nk", &seed)),
        ..NatsArgs::default()
    };
    let bus = NatsBus::connect_with(&nkey_server.url(), &args, "nkey")
        .await
        .expect("nkey accepted");
    assert!(bus.connected());
    let other = nkeys::KeyPair::new_user();
    let wrong = NatsArgs {
        nats_nkey_file: Some(dir.write("other.nk", &other.seed().expect("seed"))),
        ..NatsArgs::default()
    };
    assert!(
        NatsBus::connect_with(&nkey_server.url(), &wrong, "other")
            .await
            .is_err()
    );
    let garbage = NatsArgs {
        nats_nkey_file: Some(dir.write("garbage.nk", "not a seed")),
        ..NatsArgs::default()
    };
    let err = NatsBus::connect_with(&nkey_server.url(), &garbage, "garbage")
        .await
        .expect_err("not a seed");
    assert!(err.to_string().contains("NKey seed"), "{err}");

    // A `.creds` file that is not one fails start-up with a message naming the option.
    let creds = NatsArgs {
        nats_creds_file: Some(dir.write("user.creds", "not a creds file")),
        ..NatsArgs::default()
    };
    let err = NatsBus::connect_with(&nkey_server.url(), &creds, "creds")
        .await
        .expect_err("not a creds file");
    assert!(err.to_string().contains("--nats-creds-file"), "{err}");
}

#[tokio::test]
async fn tls_redis_with_an_acl_user_conforms() {
    let tls = TlsDir::new();
    let server = secure_redis(&tls);
    let url = server.tls_url();
    let store = RedisStore::connect_with(&url, &redis_args(&tls))
        .await
        .expect("TLS + ACL");
    assert!(store.healthy().await);
    tokenfan_testkit::conformance::store::run(&store).await;

    // The tenant limiter shares the connection setup (and stays inside `~tokenfan:*`).
    let limiter = Limiter::redis_with(&url, &redis_args(&tls), 0.0, 1, 1, Duration::from_secs(30))
        .await
        .expect("limiter");
    let id = StreamId::random();
    limiter.admit("tenant-a", &id).await.expect("first");
    assert!(
        limiter
            .admit("tenant-a", &StreamId::random())
            .await
            .is_err()
    );
    limiter.release("tenant-a", &id).await;
    limiter
        .admit("tenant-a", &StreamId::random())
        .await
        .expect("after release");

    // A wrong password: refused, and the error does not show it.
    let wrong = RedisArgs {
        redis_password: Some(Secret::new("wr0ng-pass")),
        ..redis_args(&tls)
    };
    let err = RedisStore::connect_with(&url, &wrong)
        .await
        .expect_err("wrong password");
    assert!(!format!("{err:?}").contains("wr0ng-pass"), "{err:?}");
    // The password in the URL instead of a flag: same result, and redacted too.
    let in_url = format!("rediss://tokenfan:wr0ng-pass@{}", server.process.addr);
    let err = RedisStore::connect_with(
        &in_url,
        &RedisArgs {
            redis_password: None,
            redis_username: None,
            ..redis_args(&tls)
        },
    )
    .await
    .expect_err("wrong password");
    assert!(!format!("{err:?}").contains("wr0ng-pass"), "{err:?}");
    // Without our CA the server's certificate is not trusted; without a client certificate
    // the server refuses the handshake.
    let no_ca = RedisArgs {
        redis_ca_file: None,
        ..redis_args(&tls)
    };
    assert!(RedisStore::connect_with(&url, &no_ca).await.is_err());
    let no_cert = RedisArgs {
        redis_client_cert: None,
        redis_client_key: None,
        ..redis_args(&tls)
    };
    assert!(RedisStore::connect_with(&url, &no_cert).await.is_err());
}

#[tokio::test]
async fn edges_on_secure_backends_deliver_exactly_once_through_a_nats_node_failure() {
    let tls = TlsDir::new();
    let mut nats = NatsCluster::start(3, &secure_nats(&tls));
    let redis = secure_redis(&tls);
    let generator = Generator::start();
    let password = tls.write("nats-password", PASSWORD);
    let f = &tls.files;
    let path = |p: &PathBuf| p.display().to_string();
    // Each edge has the dead node 0 first in its seed list and one live node after it, so
    // edge 0 (the owner) publishes through node 1 and edge 1 reads through node 2.
    nats.nodes[0].kill();
    let seeds = |live: usize| {
        format!(
            "tls://{},tls://{}",
            nats.nodes[0].addr, nats.nodes[live].addr
        )
    };
    let options = EdgeOptions {
        args: [
            "--nats-user",
            "tokenfan",
            "--nats-password-file",
            &path(&password),
            "--nats-ca-file",
            &path(&f.ca),
            "--nats-client-cert",
            &path(&f.cert),
            "--nats-client-key",
            &path(&f.key),
            "--redis-username",
            "tokenfan",
            "--redis-ca-file",
            &path(&f.ca),
            "--redis-client-cert",
            &path(&f.cert),
            "--redis-client-key",
            &path(&f.key),
        ]
        .map(str::to_owned)
        .to_vec(),
        env: vec![("TOKENFAN_EDGE_REDIS_PASSWORD".into(), REDIS_PASSWORD.into())],
        ..EdgeOptions::default()
    };
    let edges = [1, 2].map(|live| {
        common::spawn_edge(
            &format!("edge-{live}"),
            &seeds(live),
            &redis.tls_url(),
            &generator.url(),
            &options,
        )
    });
    let http = reqwest::Client::new();
    for edge in &edges {
        edge.wait_ready(&http).await;
    }

    let id = edges[0]
        .create(&http, slow("secure backends", 120, 25))
        .await;
    // Follow it live on the other edge.
    let follow = tokio::spawn({
        let url = edges[1].url(&format!("/v1/streams/{id}/events"));
        let http = http.clone();
        async move { read_sse(http.get(url).send().await.expect("GET")).await }
    });
    // Once a few tokens went through, kill the owner's NATS node.
    wait_until(Duration::from_secs(20), || async {
        let v: Value =
            try_get_json(&http, &edges[1].url(&format!("/v1/streams/{id}?after=0"))).await?;
        (v["next_after"].as_u64()? >= 10).then_some(())
    })
    .await;
    nats.nodes[1].kill();

    let (events, _) = tokio::time::timeout(Duration::from_secs(60), follow)
        .await
        .expect("the stream ends")
        .expect("reader");
    let events = stream_events(&events);
    assert_contiguous(&events, 1);
    let last = events.last().expect("events");
    assert_eq!(last["type"], "done", "{last}");
    assert_eq!(text_of(&events), expected_text("secure backends", 11, 120));
    // The history in the TLS Redis is complete too (read on the edge that did not own it).
    let v: Value = get_json(&http, &edges[1].url(&format!("/v1/streams/{id}?after=0"))).await;
    let stored = v["events"].as_array().expect("events").clone();
    assert_contiguous(&stored, 1);
    assert_eq!(text_of(&stored), expected_text("secure backends", 11, 120));
}

#[test]
fn secrets_never_show_in_the_configuration_dump() {
    let config = <tokenfan_edge::EdgeConfig as clap::Parser>::try_parse_from([
        "tokenfan-edge",
        "--nats-url",
        "tls://a:4222,tls://b:4222",
        "--redis-url",
        "rediss+cluster://a:6379,b:6379",
        "--nats-user",
        "u",
        "--nats-password",
        "pw-one",
        "--redis-username",
        "u",
        "--redis-password",
        "pw-two",
    ])
    .expect("parses");
    config.validate().expect("valid");
    let dump = format!("{config:?}");
    assert!(
        !dump.contains("pw-one") && !dump.contains("pw-two"),
        "{dump}"
    );

    // One way to authenticate to NATS at a time.
    let both = <tokenfan_edge::EdgeConfig as clap::Parser>::try_parse_from([
        "tokenfan-edge",
        "--nats-url",
        "nats://a:4222",
        "--redis-url",
        "redis://a:6379",
        "--nats-token",
        "t",
        "--nats-nkey-file",
        "/x.nk",
    ])
    .expect("parses");
    let err = both.validate().expect_err("two ways");
    assert!(err.to_string().contains("one NATS authentication"), "{err}");
}

/// A NATS JWT (v2) with `claims`, signed by `issuer`.
fn nats_jwt(mut claims: Value, issuer: &nkeys::KeyPair) -> String {
    use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
    claims["iss"] = issuer.public_key().into();
    claims["iat"] = 1_700_000_000u64.into();
    claims["jti"] = format!("{:x}", rand_u64()).into();
    let header = URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signed = format!("{header}.{body}");
    let signature = issuer.sign(signed.as_bytes()).expect("sign");
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
}

fn rand_u64() -> u64 {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("random");
    u64::from_le_bytes(bytes)
}

#[tokio::test]
async fn nats_creds_file_authentication_in_operator_mode() {
    use serde_json::json;
    let dir = TlsDir::new();
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let operator_jwt = nats_jwt(
        json!({"name": "op", "sub": operator.public_key(),
               "nats": {"type": "operator", "version": 2}}),
        &operator,
    );
    let account_jwt = nats_jwt(
        json!({"name": "tokenfan", "sub": account.public_key(),
               "nats": {"limits": {"subs": -1, "data": -1, "payload": -1, "imports": -1,
                                   "exports": -1, "wildcards": true, "conn": -1, "leaf": -1},
                        "type": "account", "version": 2}}),
        &operator,
    );
    let user_jwt = nats_jwt(
        json!({"name": "edge", "sub": user.public_key(),
               "nats": {"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
                        "type": "user", "version": 2}}),
        &account,
    );
    let server = NatsServer::start_with_config(&format!(
        "operator: {operator_jwt}\nresolver: MEMORY\nresolver_preload: {{\n  {}: {account_jwt}\n}}",
        account.public_key()
    ));
    let creds = format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
        user.seed().expect("seed")
    );
    let args = NatsArgs {
        nats_creds_file: Some(dir.write("edge.creds", &creds)),
        ..NatsArgs::default()
    };
    let bus = NatsBus::connect_with(&server.url(), &args, "creds")
        .await
        .expect("the .creds file is accepted");
    tokenfan_testkit::conformance::bus::run(&bus).await;
    // Without credentials, or with a user the account did not sign: refused.
    assert!(NatsBus::connect(&server.url(), "anonymous").await.is_err());
    let stranger = nkeys::KeyPair::new_user();
    let forged = nats_jwt(
        json!({"name": "x", "sub": stranger.public_key(),
               "nats": {"pub": {}, "sub": {}, "type": "user", "version": 2}}),
        &nkeys::KeyPair::new_account(),
    );
    let forged_creds = format!(
        "-----BEGIN NATS USER JWT-----\n{forged}\n------END NATS USER JWT------\n\n\
         -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
        stranger.seed().expect("seed")
    );
    let wrong = NatsArgs {
        nats_creds_file: Some(dir.write("forged.creds", &forged_creds)),
        ..NatsArgs::default()
    };
    assert!(
        NatsBus::connect_with(&server.url(), &wrong, "forged")
            .await
            .is_err()
    );
}
