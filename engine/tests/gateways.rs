//! Who may connect: gateways authenticated by client certificates (a CA and an allowlist)
//! on QUIC and on TLS over TCP, one peer's idle connections not locking others out, and
//! one gateway's in-flight and rate bounds not touching another's.
//! Real sockets on loopback; certificates made in memory.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use payswitch::switch::{self, RunningSwitch, Security};
use payswitch_loadtest::acquirer_sim::{self, SimConfig};
use payswitch_net::tls::ClientAuth;
use payswitch_net::{framed, quic, tls, ClientTrust, FrameReader, TlsIdentity};
use payswitch_protocol::Message;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName};
use support::{acquirer, config, trust, wait_links_up};

mod support;

/// A CA that issues gateway certificates.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// A client certificate for `name`, issued by this CA.
    fn issue(&self, name: &str) -> TlsIdentity {
        let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        TlsIdentity {
            certs: vec![cert.der().clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        }
    }
}

fn authorization(stan: u32) -> Message {
    support::authorization("4111111111111111", stan)
}

/// A switch (QUIC and TCP) that requires certificates from `ca` naming `allowed`.
async fn switch_requiring(ca: &Ca, allowed: &[&str]) -> (acquirer_sim::RunningSim, RunningSwitch) {
    switch_requiring_with(ca, allowed, |_| {}).await
}

/// As [`switch_requiring`], with `change` made to the configuration.
async fn switch_requiring_with(
    ca: &Ca,
    allowed: &[&str],
    change: impl FnOnce(&mut payswitch::config::Config),
) -> (acquirer_sim::RunningSim, RunningSwitch) {
    let sim = acquirer_sim::start(SimConfig {
        approval_rate: 1.0,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let mut config = config(vec![acquirer("north", &sim, 2_000)], vec![]);
    change(&mut config);
    let security = Security {
        identity: TlsIdentity::self_signed(&["localhost"]).unwrap(),
        acquirer_trust: vec![trust(&sim)],
        gateways: Some(ClientAuth {
            roots: vec![ca.der()],
            allowed: allowed.iter().map(|s| s.to_string()).collect(),
        }),
    };
    let switch = switch::start(&config, security).await.unwrap();
    wait_links_up(&switch).await;
    (sim, switch)
}

/// The response code (39) of the one answer read from `stream`, or why there is none.
async fn response_code<R: tokio::io::AsyncRead + Unpin>(stream: R) -> Result<String, String> {
    let frame = FrameReader::new(stream, 8192)
        .next_frame()
        .await
        .map_err(|e| e.to_string())?
        .ok_or("no response")?;
    let response = Message::decode(frame).map_err(|e| e.to_string())?;
    Ok(response.get_str(39).unwrap_or_default().to_string())
}

/// One authorization over QUIC presenting `identity`: its response code, or why none came.
async fn over_quic(
    switch: &RunningSwitch,
    identity: Option<TlsIdentity>,
    stan: u32,
) -> Result<String, String> {
    let endpoint = quic::client_endpoint_with_identity(
        ClientTrust::Roots(vec![switch.certificate.clone()]),
        identity,
    )
    .unwrap();
    let attempt = async {
        let conn = quic::connect(&endpoint, switch.quic_addr.unwrap(), "localhost")
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        framed::write_message(&mut send, &authorization(stan), &mut BytesMut::new())
            .await
            .map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        response_code(recv).await
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

/// One authorization over TLS on TCP from `source` (a loopback address) presenting
/// `identity`.
async fn over_tls_tcp(
    switch: &RunningSwitch,
    source: [u8; 4],
    identity: Option<TlsIdentity>,
    stan: u32,
) -> Result<String, String> {
    let config = tls::client_config(
        ClientTrust::Roots(vec![switch.certificate.clone()]),
        identity,
    )
    .unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let attempt = async {
        let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
        socket
            .bind(SocketAddr::from((source, 0)))
            .map_err(|e| e.to_string())?;
        let tcp = socket
            .connect(switch.tcp_addr.unwrap())
            .await
            .map_err(|e| e.to_string())?;
        let name = ServerName::try_from("localhost").unwrap();
        let stream = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (read, mut write) = tokio::io::split(stream);
        framed::write_message(&mut write, &authorization(stan), &mut BytesMut::new())
            .await
            .map_err(|e| e.to_string())?;
        response_code(read).await
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

#[tokio::test]
async fn only_gateways_with_an_allowed_certificate_from_the_ca_are_served_on_quic() {
    let ca = Ca::new("gateways CA");
    let rogue = Ca::new("rogue CA");
    let (_sim, switch) = switch_requiring(&ca, &["gw1.psp.example"]).await;

    let allowed = over_quic(&switch, Some(ca.issue("gw1.psp.example")), 1).await;
    assert_eq!(allowed.as_deref(), Ok("00"));

    let refusals = [
        ("no certificate", None),
        ("not on the allowlist", Some(ca.issue("gw2.psp.example"))),
        ("another CA", Some(rogue.issue("gw1.psp.example"))),
    ];
    for (i, (why, identity)) in refusals.into_iter().enumerate() {
        let result = over_quic(&switch, identity, 10 + i as u32).await;
        assert!(result.is_err(), "{why}: served {result:?}");
    }
    assert!(switch.serve_stats.handshakes_failed.load(Relaxed) >= 3);
    // The refused gateways never reached an acquirer.
    assert_eq!(switch.switch.links()[0].stats.answered.load(Relaxed), 1);
}

#[tokio::test]
async fn tcp_speaks_tls_with_the_same_check_and_refuses_plaintext() {
    let ca = Ca::new("gateways CA");
    let (_sim, switch) = switch_requiring(&ca, &["gw1.psp.example"]).await;

    let served = over_tls_tcp(
        &switch,
        [127, 0, 0, 1],
        Some(ca.issue("gw1.psp.example")),
        1,
    )
    .await;
    assert_eq!(served.as_deref(), Ok("00"));
    let refused = over_tls_tcp(
        &switch,
        [127, 0, 0, 1],
        Some(ca.issue("gw2.psp.example")),
        2,
    )
    .await;
    assert!(refused.is_err(), "{refused:?}");
    let refused = over_tls_tcp(&switch, [127, 0, 0, 1], None, 3).await;
    assert!(refused.is_err(), "{refused:?}");

    // A plaintext frame is not a TLS handshake: the connection is dropped unanswered.
    let mut plain = tokio::net::TcpStream::connect(switch.tcp_addr.unwrap())
        .await
        .unwrap();
    framed::write_message(&mut plain, &authorization(4), &mut BytesMut::new())
        .await
        .unwrap();
    let mut reader = FrameReader::new(plain, 8192);
    let answer = tokio::time::timeout(Duration::from_secs(10), reader.next_frame()).await;
    assert!(
        !matches!(answer, Ok(Ok(Some(_)))),
        "plaintext answered: {answer:?}"
    );
    assert!(switch.serve_stats.handshakes_failed.load(Relaxed) >= 3);
}

/// 2 000 connections from one address that never say anything take at most that
/// address's share of the places; a gateway from another address is still served.
#[tokio::test]
async fn idle_connections_from_one_peer_do_not_lock_out_another_gateway() {
    let ca = Ca::new("gateways CA");
    let (_sim, switch) = switch_requiring(&ca, &["gw1.psp.example"]).await;
    let addr = switch.tcp_addr.unwrap();
    let mut idle = Vec::new();
    for _ in 0..2_000 {
        if let Ok(stream) = tokio::net::TcpStream::connect(addr).await {
            idle.push(stream);
        }
    }
    // Let the accept loop take them all (and refuse those over the bound). Counted from
    // the connections the kernel completed, so a busy machine cannot fail it.
    let opened = idle.len() as u64;
    assert!(opened > 256, "only {opened} connections opened");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while switch.serve_stats.connections_refused.load(Relaxed) < opened - 256 {
        assert!(
            std::time::Instant::now() < deadline,
            "refused only {} of {opened}",
            switch.serve_stats.connections_refused.load(Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        switch.serve_stats.connections_refused.load(Relaxed),
        opened - 256,
        "one peer holds at most max_connections_per_peer"
    );
    let served = over_tls_tcp(
        &switch,
        [127, 0, 0, 2],
        Some(ca.issue("gw1.psp.example")),
        1,
    )
    .await;
    assert_eq!(served.as_deref(), Ok("00"));
    drop(idle);
}

/// A TCP gateway that says nothing, or half a frame and then nothing, is closed after the
/// idle timeout; one that keeps sending is not.
#[tokio::test]
async fn silent_and_stalled_tcp_connections_are_closed_after_the_idle_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sim = acquirer_sim::start(SimConfig {
        approval_rate: 1.0,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let mut config = config(vec![acquirer("north", &sim, 2_000)], vec![]);
    config.pipeline.idle_timeout_s = 1;
    let switch = support::start_switch(&config, vec![trust(&sim)]).await;
    wait_links_up(&switch).await;
    let addr = switch.tcp_addr.unwrap();

    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    stalled.write_all(&[0x00, 0x40, b'0', b'1']).await.unwrap(); // 64 bytes announced, 2 sent
    let mut busy = tokio::net::TcpStream::connect(addr).await.unwrap();
    let started = std::time::Instant::now();
    let mut stan = 1;
    while started.elapsed() < Duration::from_millis(2_500) {
        framed::write_message(&mut busy, &authorization(stan), &mut BytesMut::new())
            .await
            .unwrap();
        stan += 1;
        let mut len = [0u8; 2];
        busy.read_exact(&mut len).await.unwrap();
        let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
        busy.read_exact(&mut body).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for (name, stream) in [("silent", &mut silent), ("stalled", &mut stalled)] {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{name}: {read:?}");
    }
    assert!(switch.serve_stats.idle_closed.load(Relaxed) >= 2);
    // The busy one is still served.
    framed::write_message(&mut busy, &authorization(stan), &mut BytesMut::new())
        .await
        .unwrap();
    let mut len = [0u8; 2];
    busy.read_exact(&mut len).await.unwrap();
}

/// On QUIC the connection's keep-alives keep it open however its streams behave, so the
/// stall bound is per stream: one that begins a frame and stalls is reset with `STALLED`,
/// while a busy stream on the same connection is served throughout. A quiet stream is not
/// a stalled one: past the idle timeout (which closes a quiet TCP connection) it still
/// serves its next request, as a pipelined stream must after quiet hours.
#[tokio::test]
async fn a_stalled_quic_stream_is_reset_while_its_connection_and_quiet_streams_are_served() {
    let sim = acquirer_sim::start(SimConfig {
        approval_rate: 1.0,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let mut config = config(vec![acquirer("north", &sim, 2_000)], vec![]);
    config.pipeline.idle_timeout_s = 1;
    config.pipeline.stall_timeout_s = 1;
    let switch = support::start_switch(&config, vec![trust(&sim)]).await;
    wait_links_up(&switch).await;
    let endpoint =
        quic::client_endpoint(ClientTrust::Roots(vec![switch.certificate.clone()])).unwrap();
    let conn = quic::connect(&endpoint, switch.quic_addr.unwrap(), "localhost")
        .await
        .unwrap();

    let (mut stalled_send, mut stalled) = conn.open_bi().await.unwrap();
    stalled_send
        .write_all(&[0x00, 0x40, b'0', b'1'])
        .await
        .unwrap(); // 64 bytes announced, 2 sent
    let (mut idle_send, idle) = conn.open_bi().await.unwrap();
    framed::write_message(&mut idle_send, &authorization(1), &mut BytesMut::new())
        .await
        .unwrap();
    let mut idle = FrameReader::new(idle, 8192);
    assert!(idle.next_frame().await.unwrap().is_some(), "answered first");

    let (mut busy_send, busy) = conn.open_bi().await.unwrap();
    let mut busy = FrameReader::new(busy, 8192);
    let started = std::time::Instant::now();
    let mut stan = 2;
    while started.elapsed() < Duration::from_millis(2_500) {
        framed::write_message(&mut busy_send, &authorization(stan), &mut BytesMut::new())
            .await
            .unwrap();
        stan += 1;
        assert!(
            busy.next_frame().await.unwrap().is_some(),
            "busy stream answered"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let stalled_code = tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut [0u8; 1]))
        .await
        .expect("the stalled stream ends");
    assert!(
        matches!(stalled_code, Err(quinn::ReadError::Reset(code)) if code.into_inner() == u64::from(payswitch_net::codes::STALLED)),
        "stalled: {stalled_code:?}"
    );
    assert_eq!(switch.serve_stats.idle_closed.load(Relaxed), 1);
    // The quiet stream, 2.5 s past its last answer, is served again.
    framed::write_message(
        &mut idle_send,
        &authorization(stan + 1),
        &mut BytesMut::new(),
    )
    .await
    .unwrap();
    let again = tokio::time::timeout(Duration::from_secs(5), idle.next_frame()).await;
    assert!(matches!(again, Ok(Ok(Some(_)))), "quiet stream: {again:?}");
    // The connection still serves a new stream.
    framed::write_message(&mut busy_send, &authorization(stan), &mut BytesMut::new())
        .await
        .unwrap();
    assert!(busy.next_frame().await.unwrap().is_some());
}

/// `POST /api/tls/reload` swaps a new client CA in without a restart: a certificate from
/// the old CA no longer connects, one from the new does. Every mutating admin call, with a
/// wrong token too, is in the audit log.
#[tokio::test]
async fn a_new_client_ca_is_reloaded_without_a_restart_and_admin_calls_are_audited() {
    use payswitch::config::TlsConfig;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let old_ca = Ca::new("old gateways CA");
    let new_ca = Ca::new("new gateways CA");
    let files = tempfile::tempdir().unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&server_key)
        .unwrap();
    let write = |name: &str, text: String| {
        let path = files.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let cert = write("switch.pem", server.pem());
    let key = write("switch.key", server_key.serialize_pem());
    let client_ca = write("gateways-ca.pem", old_ca.cert.pem());

    let sim = acquirer_sim::start(SimConfig {
        approval_rate: 1.0,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let mut config = config(vec![acquirer("north", &sim, 2_000)], vec![]);
    config.tls = Some(TlsConfig {
        cert,
        key,
        client_ca: Some(client_ca.clone()),
        allowed_clients: vec!["gw1.psp.example".into()],
    });
    config.admin_token = Some("s3cret".into());
    // The simulator's certificate is trusted below, as the other tests do.
    config.insecure_acquirers = true;
    let mut security = Security::from_config(&config).unwrap();
    security.acquirer_trust = vec![trust(&sim)];
    let switch = switch::start(&config, security).await.unwrap();
    wait_links_up(&switch).await;
    assert_eq!(
        over_quic(&switch, Some(old_ca.issue("gw1.psp.example")), 1)
            .await
            .as_deref(),
        Ok("00")
    );

    let admin = switch.admin_addr.unwrap();
    let post = |path: &'static str, token: &'static str| async move {
        let mut stream = tokio::net::TcpStream::connect(admin).await.unwrap();
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut bytes = Vec::new();
        stream.read_to_end(&mut bytes).await.unwrap();
        let text = String::from_utf8(bytes).unwrap();
        text[9..12].parse::<u16>().unwrap()
    };
    std::fs::write(&client_ca, new_ca.cert.pem()).unwrap();
    assert_eq!(post("/api/tls/reload", "wrong").await, 401);
    assert_eq!(post("/api/tls/reload", "s3cret").await, 200);

    let old = over_quic(&switch, Some(old_ca.issue("gw1.psp.example")), 2).await;
    assert!(
        old.is_err(),
        "a certificate from the old CA still connects: {old:?}"
    );
    assert_eq!(
        over_quic(&switch, Some(new_ca.issue("gw1.psp.example")), 3)
            .await
            .as_deref(),
        Ok("00")
    );

    let audit = std::fs::read_to_string(config.journal.dir.join("admin-audit.jsonl")).unwrap();
    let entries: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(entries.len(), 2, "{audit}");
    assert_eq!(entries[0]["token_ok"], false);
    assert_eq!(entries[0]["status"], 401);
    assert_eq!(entries[1]["token_ok"], true);
    assert_eq!(entries[1]["status"], 200);
    assert_eq!(entries[1]["call"], "POST /api/tls/reload");
    assert!(entries[1]["peer"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(config.journal.dir.join("admin-audit.jsonl"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// `count` authorizations from one gateway presenting `identity`, spread over
/// `connections` QUIC connections, one stream each, all sent at once: their codes.
async fn burst(
    switch: &RunningSwitch,
    identity: &TlsIdentity,
    connections: usize,
    count: u32,
    first_stan: u32,
) -> Vec<String> {
    let endpoint = quic::client_endpoint_with_identity(
        ClientTrust::Roots(vec![switch.certificate.clone()]),
        Some(identity.clone()),
    )
    .unwrap();
    let mut conns = Vec::new();
    for _ in 0..connections {
        conns.push(
            quic::connect(&endpoint, switch.quic_addr.unwrap(), "localhost")
                .await
                .unwrap(),
        );
    }
    let mut requests = Vec::new();
    for i in 0..count {
        let conn = conns[i as usize % connections].clone();
        requests.push(tokio::spawn(async move {
            let (mut send, recv) = conn.open_bi().await.unwrap();
            framed::write_message(
                &mut send,
                &authorization(first_stan + i),
                &mut BytesMut::new(),
            )
            .await
            .unwrap();
            send.finish().unwrap();
            response_code(recv).await.unwrap()
        }));
    }
    let mut codes = Vec::new();
    for request in requests {
        codes.push(request.await.unwrap());
    }
    codes
}

/// A gateway (a client certificate) at `pipeline.max_in_flight_per_gateway` over all its
/// connections gets 91 at once for more, counted; another gateway is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_at_its_in_flight_bound_is_shed_while_another_is_served() {
    let ca = Ca::new("gateways");
    let (sim, switch) = switch_requiring_with(&ca, &["gw1.test", "gw2.test"], |config| {
        config.pipeline.max_in_flight_per_gateway = 4;
    })
    .await;
    // Answers take 600 ms: gw1's first four are still out when the rest arrive.
    sim.set_delay(Duration::from_millis(600));
    let gw1 = ca.issue("gw1.test");
    let gw2 = ca.issue("gw2.test");
    let busy = burst(&switch, &gw1, 2, 10, 100);
    let other = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        over_quic(&switch, Some(gw2.clone()), 200).await
    };
    let (codes, other) = tokio::join!(busy, other);
    let approved = codes.iter().filter(|c| *c == "00").count();
    let shed = codes.iter().filter(|c| *c == "91").count();
    assert_eq!((approved, shed), (4, 6), "{codes:?}");
    assert_eq!(other.as_deref(), Ok("00"), "another gateway is served");
    assert_eq!(switch.serve_stats.gateway_shed.load(Relaxed), 6);
    // Its places come back as its requests finish.
    sim.set_delay(Duration::ZERO);
    assert_eq!(
        over_quic(&switch, Some(gw1), 300).await.as_deref(),
        Ok("00")
    );
}

/// `pipeline.max_rate_per_gateway`: a burst beyond a second's worth is shed, per gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_over_its_rate_is_shed_while_another_is_served() {
    let ca = Ca::new("gateways");
    let (_sim, switch) = switch_requiring_with(&ca, &["gw1.test", "gw2.test"], |config| {
        config.pipeline.max_rate_per_gateway = 5;
    })
    .await;
    let gw1 = ca.issue("gw1.test");
    let codes = burst(&switch, &gw1, 1, 12, 400).await;
    let approved = codes.iter().filter(|c| *c == "00").count();
    // A second's burst (5), and perhaps one more token refilled while the burst arrived.
    assert!((5..=6).contains(&approved), "{codes:?}");
    assert_eq!(approved + codes.iter().filter(|c| *c == "91").count(), 12);
    let gw2 = ca.issue("gw2.test");
    assert_eq!(
        over_quic(&switch, Some(gw2), 500).await.as_deref(),
        Ok("00")
    );
}
