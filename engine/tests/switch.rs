//! The switch end to end over real loopback sockets: a gateway (QUIC or TCP client), the
//! switch, and simulated acquirers, all on ephemeral ports.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use payswitch::config::{Config, RouteConfig};
use payswitch::switch::RunningSwitch;
use payswitch_loadtest::acquirer_sim::{self, RunningSim, SimConfig};
use payswitch_net::{framed, quic, ClientTrust, FrameReader};
use support::{
    acquirer, authorization, config, gateway, start_switch, transact, trust, wait_links_up,
};

mod support;
use payswitch_protocol::{Message, Mti};
use tokio::io::AsyncWriteExt;

const VISA_TEST_CARD: &str = "4111111111111111";
const MASTERCARD_TEST_CARD: &str = "5500000000000004";

/// `authorization` with some fields replaced (`Some`) or removed (`None`).
fn authorization_with(pan: &str, stan: u32, changes: &[(u8, Option<&str>)]) -> Message {
    let base = authorization(pan, stan);
    let mut b = Message::builder(base.mti());
    for n in base.field_numbers() {
        match changes.iter().find(|(c, _)| *c == n) {
            Some((_, Some(v))) => b.set_str(n, v).unwrap(),
            Some((_, None)) => continue,
            None => b.set(n, base.get(n).unwrap()).unwrap(),
        };
    }
    for (n, v) in changes {
        if let (false, Some(v)) = (base.has(*n), v) {
            b.set_str(*n, v).unwrap();
        }
    }
    b.build()
}

async fn start_sim(config: SimConfig) -> RunningSim {
    acquirer_sim::start(config).await.unwrap()
}

fn sim_config() -> SimConfig {
    SimConfig {
        approval_rate: 1.0,
        ..SimConfig::default()
    }
}

/// A switch in front of one approving simulator.
async fn one_acquirer() -> (RunningSim, RunningSwitch) {
    in_front_of(sim_config(), 2_000).await
}

/// A switch in front of one simulator, with the link's timeout.
async fn in_front_of(sim: SimConfig, timeout_ms: u64) -> (RunningSim, RunningSwitch) {
    let sim = start_sim(sim).await;
    let switch = start_switch(
        &config(vec![acquirer("north", &sim, timeout_ms)], vec![]),
        vec![trust(&sim)],
    )
    .await;
    wait_links_up(&switch).await;
    (sim, switch)
}

#[tokio::test]
async fn approval_echoes_the_contract_fields_and_adds_38_39_48() {
    let (_sim, switch) = one_acquirer().await;
    let conn = gateway(&switch).await;
    let request = authorization(VISA_TEST_CARD, 1);
    let response = transact(&conn, &request).await;
    assert_eq!(response.mti().as_str(), "0110");
    assert_eq!(response.get_str(39), Some("00"));
    assert_eq!(response.get(38).map(<[u8]>::len), Some(6));
    for n in [2, 3, 4, 7, 11, 37, 41, 42, 49] {
        assert_eq!(response.get(n), request.get(n), "field {n} echoed");
    }
    let tags = response.get_str(48).unwrap();
    assert!(tags.contains("decision=approve"), "{tags}");
    assert!(tags.contains("acquirer=north"), "{tags}");
}

#[tokio::test]
async fn acquirer_declines_pass_through() {
    let (_sim, switch) = in_front_of(
        SimConfig {
            approval_rate: 0.0,
            ..SimConfig::default()
        },
        2_000,
    )
    .await;
    let conn = gateway(&switch).await;
    let response = transact(&conn, &authorization(VISA_TEST_CARD, 2)).await;
    assert_eq!(response.get_str(39), Some("05"));
    assert!(!response.has(38), "no approval code on a decline");
    // An expired card is the acquirer's 54, also passed through.
    let expired = authorization_with(VISA_TEST_CARD, 3, &[(14, Some("2001"))]);
    assert_eq!(transact(&conn, &expired).await.get_str(39), Some("54"));
}

#[tokio::test]
async fn validation_answers_30_14_and_12_without_the_acquirer() {
    let (sim, switch) = one_acquirer().await;
    let conn = gateway(&switch).await;
    let before = sim
        .stats
        .requests
        .load(std::sync::atomic::Ordering::Relaxed);

    let missing_amount = authorization_with(VISA_TEST_CARD, 10, &[(4, None)]);
    let r = transact(&conn, &missing_amount).await;
    assert_eq!((r.mti().as_str(), r.get_str(39)), ("0110", Some("30")));
    assert_eq!(r.get_str(11), Some("000010"), "echoes what it could read");

    let bad_luhn = authorization_with("4111111111111112", 11, &[]);
    assert_eq!(transact(&conn, &bad_luhn).await.get_str(39), Some("14"));

    let malformed_pan = authorization_with("41111111111X1111", 12, &[]);
    assert_eq!(
        transact(&conn, &malformed_pan).await.get_str(39),
        Some("30")
    );

    let mut unsupported = Message::builder(Mti::parse(b"0300").unwrap());
    unsupported
        .set_str(11, "000013")
        .unwrap()
        .set_str(41, "TERM0001")
        .unwrap();
    let r = transact(&conn, &unsupported.build()).await;
    assert_eq!((r.mti().as_str(), r.get_str(39)), ("0310", Some("12")));

    assert_eq!(
        sim.stats
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
        before,
        "refused requests never reach the acquirer"
    );
}

#[tokio::test]
async fn a_field_that_breaks_the_codec_is_answered_30_with_what_could_be_read() {
    let (_sim, switch) = one_acquirer().await;
    let conn = gateway(&switch).await;
    // Field 49 holds a non-ASCII byte: the codec stops there, the switch answers 30.
    let mut raw = authorization(VISA_TEST_CARD, 20).to_bytes().to_vec();
    *raw.last_mut().unwrap() = 0xff;
    let (mut send, recv) = conn.open_bi().await.unwrap();
    framed::write_frame(&mut send, &raw, &mut BytesMut::new())
        .await
        .unwrap();
    send.finish().unwrap();
    let frame = FrameReader::new(recv, 8192)
        .next_frame()
        .await
        .unwrap()
        .unwrap();
    let r = Message::decode(frame).unwrap();
    assert_eq!(r.get_str(39), Some("30"));
    assert_eq!(r.get_str(41), Some("TERM0001"));
    assert_eq!(r.get_str(11), Some("000020"));
}

#[tokio::test]
async fn garbage_frame_closes_only_its_stream() {
    let (_sim, switch) = one_acquirer().await;
    let conn = gateway(&switch).await;
    let (mut send, recv) = conn.open_bi().await.unwrap();
    framed::write_frame(
        &mut send,
        b"\x00\x01garbage that is no ISO 8583",
        &mut BytesMut::new(),
    )
    .await
    .unwrap();
    let _ = send.finish();
    let mut reader = FrameReader::new(recv, 8192);
    assert!(
        reader.next_frame().await.is_err(),
        "the stream is reset, not answered"
    );

    // Oversized frame header: the stream is reset before the body is even read.
    let (mut send, recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0xff, 0xff, 0x00]).await.unwrap();
    assert!(FrameReader::new(recv, 8192).next_frame().await.is_err());

    // The same connection goes on.
    let r = transact(&conn, &authorization(VISA_TEST_CARD, 21)).await;
    assert_eq!(r.get_str(39), Some("00"));
}

#[tokio::test]
async fn fifty_requests_pipelined_on_one_stream() {
    let (_sim, switch) = one_acquirer().await;
    let conn = gateway(&switch).await;
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let mut out = BytesMut::new();
    for stan in 1..=50 {
        authorization(VISA_TEST_CARD, stan)
            .encode_framed(&mut out)
            .unwrap();
    }
    send.write_all(&out).await.unwrap();
    send.finish().unwrap();
    let mut reader = FrameReader::new(recv, 8192);
    let mut stans = Vec::new();
    while let Some(frame) = reader.next_frame().await.unwrap() {
        let r = Message::decode(frame).unwrap();
        assert_eq!(r.get_str(39), Some("00"));
        assert_eq!(r.get_str(41), Some("TERM0001"));
        stans.push(r.get_str(11).unwrap().parse::<u32>().unwrap());
    }
    stans.sort_unstable();
    assert_eq!(
        stans,
        (1..=50).collect::<Vec<_>>(),
        "every request answered once"
    );
}

#[tokio::test]
async fn two_hundred_concurrent_streams() {
    let (_sim, switch) = one_acquirer().await;
    let conn = gateway(&switch).await;
    let tasks: Vec<_> = (1..=200)
        .map(|stan| {
            let conn = conn.clone();
            tokio::spawn(async move { transact(&conn, &authorization(VISA_TEST_CARD, stan)).await })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let r = task.await.unwrap();
        assert_eq!(r.get_str(39), Some("00"));
        assert_eq!(r.get_str(11).unwrap(), format!("{:06}", i + 1));
    }
}

#[tokio::test]
async fn network_echo_is_answered_by_the_switch() {
    let (sim, switch) = one_acquirer().await;
    let conn = gateway(&switch).await;
    let mut echo = Message::builder(Mti::NETWORK_REQUEST);
    echo.set_str(7, "1125123045")
        .unwrap()
        .set_str(11, "000077")
        .unwrap()
        .set_str(70, "301")
        .unwrap();
    let r = transact(&conn, &echo.build()).await;
    assert_eq!(r.mti().as_str(), "0810");
    assert_eq!(r.get_str(39), Some("00"));
    assert_eq!(r.get_str(70), Some("301"));
    assert_eq!(r.get_str(11), Some("000077"));
    assert_eq!(
        sim.stats
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test]
async fn tcp_listener_serves_the_same_framing_pipelined() {
    let (_sim, switch) = one_acquirer().await;
    let stream = tokio::net::TcpStream::connect(switch.tcp_addr.unwrap())
        .await
        .unwrap();
    let (read, mut write) = stream.into_split();
    let mut out = BytesMut::new();
    for stan in 1..=5 {
        authorization(VISA_TEST_CARD, stan)
            .encode_framed(&mut out)
            .unwrap();
    }
    write.write_all(&out).await.unwrap();
    let mut reader = FrameReader::new(read, 8192);
    for _ in 0..5 {
        let r = Message::decode(reader.next_frame().await.unwrap().unwrap()).unwrap();
        assert_eq!(r.get_str(39), Some("00"));
    }
    // Garbage on TCP closes that connection only.
    framed::write_frame(&mut write, b"nonsense", &mut BytesMut::new())
        .await
        .unwrap();
    assert!(matches!(reader.next_frame().await, Ok(None) | Err(_)));
    let again = tokio::net::TcpStream::connect(switch.tcp_addr.unwrap())
        .await
        .unwrap();
    let (read, mut write) = again.into_split();
    framed::write_message(
        &mut write,
        &authorization(VISA_TEST_CARD, 6),
        &mut BytesMut::new(),
    )
    .await
    .unwrap();
    let r = Message::decode(
        FrameReader::new(read, 8192)
            .next_frame()
            .await
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(r.get_str(39), Some("00"));
}

/// A UDP port with nothing behind it.
fn dead_address() -> SocketAddr {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap()
    // dropped here: nothing listens on it any more
}

#[tokio::test]
async fn acquirer_down_answers_91_at_once() {
    let sim = start_sim(sim_config()).await;
    let mut down = acquirer("down", &sim, 10_000);
    down.address = dead_address();
    let switch = start_switch(&config(vec![down], vec![]), vec![trust(&sim)]).await;
    let conn = gateway(&switch).await;
    let started = Instant::now();
    let r = transact(&conn, &authorization(VISA_TEST_CARD, 30)).await;
    assert_eq!(r.get_str(39), Some("91"));
    // Answered without waiting for the 10 s acquirer timeout.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn acquirer_down_falls_over_to_the_next_in_the_route() {
    let sim = start_sim(sim_config()).await;
    let mut down = acquirer("down", &sim, 2_000);
    down.address = dead_address();
    let up = acquirer("up", &sim, 2_000);
    let switch = start_switch(
        &config(vec![down, up], vec![]),
        vec![trust(&sim), trust(&sim)],
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !switch.switch.links()[1].is_up() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let conn = gateway(&switch).await;
    let r = transact(&conn, &authorization(VISA_TEST_CARD, 31)).await;
    assert_eq!(r.get_str(39), Some("00"));
    assert!(r.get_str(48).unwrap().contains("acquirer=up"));
}

#[tokio::test]
async fn acquirer_slower_than_its_timeout_gets_91_within_the_timeout() {
    let (_sim, switch) = in_front_of(
        SimConfig {
            approval_rate: 1.0,
            delay: Duration::from_secs(3),
            ..SimConfig::default()
        },
        300,
    )
    .await;
    let conn = gateway(&switch).await;
    let started = Instant::now();
    let r = transact(&conn, &authorization(VISA_TEST_CARD, 40)).await;
    let elapsed = started.elapsed();
    assert_eq!(r.get_str(39), Some("91"));
    assert!(
        elapsed >= Duration::from_millis(300),
        "waited for the timeout: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(3),
        "did not wait for the acquirer: {elapsed:?}"
    );
}

/// Two approving simulators, `north` and `south` (2 s timeouts), and a switch in front
/// of them with `routes` (none: every card to north, then south), links up.
async fn north_and_south(routes: Vec<RouteConfig>) -> (RunningSim, RunningSim, RunningSwitch) {
    let north = start_sim(SimConfig {
        name: "north".into(),
        ..sim_config()
    })
    .await;
    let south = start_sim(SimConfig {
        name: "south".into(),
        ..sim_config()
    })
    .await;
    let switch = start_switch(
        &config(
            vec![
                acquirer("north", &north, 2_000),
                acquirer("south", &south, 2_000),
            ],
            routes,
        ),
        vec![trust(&north), trust(&south)],
    )
    .await;
    wait_links_up(&switch).await;
    (north, south, switch)
}

/// The acquirer an answer names in field 48 (`acquirer=NAME`), or "".
fn acquirer_of(response: &Message) -> String {
    response
        .get_str(48)
        .unwrap_or_default()
        .split(';')
        .find_map(|t| t.strip_prefix("acquirer=").map(str::to_string))
        .unwrap_or_default()
}

/// An acquirer that turns slow (answers after 3 s, timeout 2 s) while a healthy backup
/// shares its route: its circuit breaker opens on the stall, well before the first
/// timeout, and the backup takes the traffic; once it is quick again, probes close the
/// breaker and it takes its traffic back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_acquirer_is_skipped_once_its_breaker_opens_and_comes_back_when_quick() {
    let (north, _south, switch) = north_and_south(vec![]).await;
    let conn = gateway(&switch).await;
    for stan in 1..=20 {
        let r = transact(&conn, &authorization(VISA_TEST_CARD, stan)).await;
        assert_eq!(
            (r.get_str(39), acquirer_of(&r).as_str()),
            (Some("00"), "north")
        );
    }

    // North turns slow; a request every 10 ms for 2.5 s, each on its own stream.
    north.set_delay(Duration::from_secs(3));
    let slow_since = Instant::now();
    let mut tasks = Vec::new();
    for stan in 100..350 {
        let conn = conn.clone();
        let sent = slow_since.elapsed();
        tasks.push(tokio::spawn(async move {
            let r = transact(&conn, &authorization(VISA_TEST_CARD, stan)).await;
            (sent, r)
        }));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut before = (0, 0); // (91s, all) sent within the first 500 ms
    let mut after = Vec::new(); // (code, acquirer) of those sent later
    for task in tasks {
        let (sent, r) = task.await.unwrap();
        let code = r.get_str(39).unwrap().to_string();
        if sent < Duration::from_millis(500) {
            before.0 += usize::from(code == "91");
            before.1 += 1;
        } else {
            after.push((code, acquirer_of(&r)));
        }
    }
    let link = &switch.switch.links()[0];
    assert_ne!(link.breaker_state(), "closed");
    assert!(
        link.stats
            .breaker_opened
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    // Sent after the breaker opened: the backup approves all but the probes (one per
    // open period, each a real authorization that times out at north).
    let by_south = after
        .iter()
        .filter(|(code, acquirer)| code == "00" && acquirer == "south")
        .count();
    let probes = after.len() - by_south;
    assert!(
        probes <= 3,
        "{probes} of {} requests sent after the stall were not approved by the backup: {after:?}",
        after.len()
    );
    assert!(
        after
            .iter()
            .all(|(code, acquirer)| (code == "00" && acquirer == "south") || code == "91"),
        "{after:?}"
    );
    eprintln!(
        "sent in the first 500 ms: {} of {} answered 91; later: {probes} of {} (probes)",
        before.0,
        before.1,
        after.len()
    );

    // North is quick again: probes close its breaker and it takes its traffic back.
    north.set_delay(Duration::ZERO);
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut stan = 400;
    loop {
        let r = transact(&conn, &authorization(VISA_TEST_CARD, stan)).await;
        stan += 1;
        if acquirer_of(&r) == "north" && link.breaker_state() == "closed" {
            break;
        }
        assert!(Instant::now() < deadline, "north never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A balanced route: two healthy acquirers share the traffic; one that stalls loses its
/// share as soon as its breaker opens, and the other carries everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balanced_route_shares_traffic_by_health() {
    let route = RouteConfig {
        bins: vec![],
        currencies: vec![],
        mccs: vec![],
        acquirers: vec!["north".into(), "south".into()],
        balance: true,
        stand_in: None,
    };
    let (north, _south, switch) = north_and_south(vec![route]).await;
    let conn = gateway(&switch).await;
    let mut shares = std::collections::HashMap::new();
    for stan in 1..=200 {
        let r = transact(&conn, &authorization(VISA_TEST_CARD, stan)).await;
        assert_eq!(r.get_str(39), Some("00"));
        *shares.entry(acquirer_of(&r)).or_insert(0) += 1;
    }
    let (n, s) = (shares["north"], shares["south"]);
    assert!((60..=140).contains(&n) && n + s == 200, "{shares:?}");

    // North stalls: after its breaker opens, south gets everything but the probes.
    north.set_delay(Duration::from_secs(3));
    let mut tasks = Vec::new();
    for stan in 300..400 {
        let conn = conn.clone();
        tasks.push(tokio::spawn(async move {
            transact(&conn, &authorization(VISA_TEST_CARD, stan)).await
        }));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut late = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        let r = task.await.unwrap();
        if i >= 50 {
            late.push((r.get_str(39).unwrap().to_string(), acquirer_of(&r)));
        }
    }
    let by_south = late
        .iter()
        .filter(|(code, acquirer)| code == "00" && acquirer == "south")
        .count();
    assert!(by_south >= late.len() - 3, "{late:?}");
}

#[tokio::test]
async fn routes_by_bin_between_two_acquirers() {
    let visa = start_sim(sim_config()).await;
    let mastercard = start_sim(sim_config()).await;
    let routes = vec![
        RouteConfig {
            bins: vec!["4".into()],
            currencies: vec![],
            mccs: vec![],
            acquirers: vec!["visa".into()],
            balance: false,
            stand_in: None,
        },
        RouteConfig {
            bins: vec!["510000-559999".into()],
            currencies: vec![],
            mccs: vec![],
            acquirers: vec!["mastercard".into()],
            balance: false,
            stand_in: None,
        },
    ];
    let config = config(
        vec![
            acquirer("visa", &visa, 2_000),
            acquirer("mastercard", &mastercard, 2_000),
        ],
        routes,
    );
    let switch = start_switch(&config, vec![trust(&visa), trust(&mastercard)]).await;
    wait_links_up(&switch).await;
    let conn = gateway(&switch).await;
    let r = transact(&conn, &authorization(VISA_TEST_CARD, 50)).await;
    assert!(r.get_str(48).unwrap().contains("acquirer=visa"));
    let r = transact(&conn, &authorization(MASTERCARD_TEST_CARD, 51)).await;
    assert!(r.get_str(48).unwrap().contains("acquirer=mastercard"));
    // A Discover card matches no route: 92.
    let r = transact(&conn, &authorization("6011000000000004", 52)).await;
    assert_eq!(r.get_str(39), Some("92"));
}

#[tokio::test]
async fn admin_health_answers_once_listeners_are_up() {
    let (sim, switch) = one_acquirer().await;
    let addr = switch.admin_addr.unwrap();
    // One HTTP/1.1 exchange: the status and the body.
    let get = |path: &'static str| async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut bytes = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut bytes)
            .await
            .unwrap();
        let text = String::from_utf8(bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").expect("a header and a body");
        let status: u16 = head[9..12].parse().unwrap();
        (status, body.to_string())
    };
    let ready = |body: &str| -> serde_json::Value {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
    };

    // Alive, and ready: the acquirer is connected, no model is configured, the journal writes.
    assert_eq!(get("/health").await, (200, "ok\n".to_string()));
    let (status, body) = get("/ready").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        ready(&body),
        serde_json::json!({"ready": true, "reasons": [], "degraded": []})
    );

    // The only acquirer gone: still alive, no longer ready, and /ready says why.
    sim.shutdown().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, body) = loop {
        let (status, body) = get("/ready").await;
        if status != 200 {
            break (status, body);
        }
        assert!(Instant::now() < deadline, "still ready without an acquirer");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        ready(&body),
        serde_json::json!({
            "ready": false,
            "reasons": ["no acquirer connected"],
            "degraded": ["acquirer north: down"],
        })
    );
    assert_eq!(get("/health").await, (200, "ok\n".to_string()));
}

#[tokio::test]
async fn graceful_shutdown_answers_requests_in_progress() {
    let (_sim, switch) = in_front_of(
        SimConfig {
            approval_rate: 1.0,
            delay: Duration::from_millis(500),
            ..SimConfig::default()
        },
        2_000,
    )
    .await;
    let conn = gateway(&switch).await;
    let in_flight = {
        let conn = conn.clone();
        tokio::spawn(async move { transact(&conn, &authorization(VISA_TEST_CARD, 60)).await })
    };
    // The request is at the acquirer (500 ms) when the shutdown starts.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let quic_addr = switch.quic_addr.unwrap();
    let stopping = tokio::spawn(switch.shutdown());
    let response = in_flight.await.unwrap();
    assert_eq!(response.get_str(39), Some("00"), "answered, not dropped");
    stopping.await.unwrap();
    // Nothing listens any more.
    let endpoint = quic::client_endpoint(ClientTrust::AcceptAny).unwrap();
    let connect = tokio::time::timeout(
        Duration::from_secs(2),
        quic::connect(&endpoint, quic_addr, "localhost"),
    )
    .await;
    assert!(
        !matches!(connect, Ok(Ok(_))),
        "a stopped switch accepts no connection"
    );
}

/// The journal's records, read back (the switch is still running: a record being
/// written at the end is left out as a torn tail, not repaired).
fn journal_records(config: &Config) -> Vec<(u64, payswitch::journal::Record)> {
    let mut out = Vec::new();
    payswitch::journal::scan(&config.journal.dir, false, |seq, r| out.push((seq, r))).unwrap();
    out
}

async fn switch_with_journal(sim: &RunningSim, timeout_ms: u64) -> (Config, RunningSwitch) {
    let config = config(vec![acquirer("north", sim, timeout_ms)], vec![]);
    let switch = start_switch(&config, vec![trust(sim)]).await;
    wait_links_up(&switch).await;
    (config, switch)
}

#[tokio::test]
async fn retransmissions_sequential_and_concurrent_get_the_original_answer_and_reach_the_acquirer_once(
) {
    use std::sync::atomic::Ordering::Relaxed;
    // Answers take 200 ms: concurrent retransmissions arrive while the original is out.
    let sim = start_sim(SimConfig {
        approval_rate: 1.0,
        delay: Duration::from_millis(200),
        ..SimConfig::default()
    })
    .await;
    let (config, switch) = switch_with_journal(&sim, 2_000).await;
    let conn = gateway(&switch).await;
    let request = authorization(VISA_TEST_CARD, 41);
    let concurrent = futures_join_all((0..5).map(|_| {
        let (conn, request) = (conn.clone(), request.clone());
        async move { transact(&conn, &request).await }
    }))
    .await;
    let codes: Vec<_> = concurrent.iter().map(|r| r.get_str(39).unwrap()).collect();
    assert_eq!(codes, vec!["00"; 5]);
    let approvals: Vec<_> = concurrent.iter().map(|r| r.get(38).unwrap()).collect();
    assert!(
        approvals.windows(2).all(|w| w[0] == w[1]),
        "one approval code"
    );
    let dups = concurrent
        .iter()
        .filter(|r| r.get_str(48).unwrap().ends_with(";dup=1"))
        .count();
    assert_eq!(dups, 4, "all but the original are marked dup=1");
    // Sequential retransmissions, after the original completed.
    for _ in 0..3 {
        let again = transact(&conn, &request).await;
        assert_eq!(again.get_str(39), Some("00"));
        assert_eq!(again.get(38), concurrent[0].get(38));
        assert!(again.get_str(48).unwrap().contains("dup=1"));
        assert!(again.get_str(48).unwrap().contains("acquirer=north"));
    }
    assert_eq!(
        sim.stats.requests.load(Relaxed),
        1,
        "the acquirer saw it once"
    );
    assert_eq!(switch.switch.stats.duplicates.load(Relaxed), 7);
    // The same terminal, STAN and RRN at another transmission time is a new request.
    let later = authorization_with(VISA_TEST_CARD, 41, &[(7, Some("1125123046"))]);
    let fresh = transact(&conn, &later).await;
    assert!(!fresh.get_str(48).unwrap().contains("dup=1"));
    assert_eq!(sim.stats.requests.load(Relaxed), 2);
    // In the journal: one request forwarded once, eight responses, seven marked duplicate.
    let records = journal_records(&config);
    let of_first: Vec<_> = records
        .iter()
        .filter(|(_, r)| r.stan == "000041" && r.transmission_time == "1125123045")
        .collect();
    let count = |kind| of_first.iter().filter(|(_, r)| r.kind == kind).count();
    use payswitch::journal::RecordKind;
    assert_eq!(count(RecordKind::Forwarded), 1);
    assert_eq!(count(RecordKind::Response), 8);
    assert_eq!(of_first.iter().filter(|(_, r)| r.duplicate).count(), 7);
}

/// Joins futures without a dependency on the `futures` crate.
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let mut set = Vec::new();
    for f in futures {
        set.push(tokio::spawn(f));
    }
    let mut out = Vec::new();
    for h in set {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
async fn a_slow_acquirer_gets_its_reversals_once_it_answers_each_acknowledged_once() {
    use payswitch::journal::RecordKind;
    use std::sync::atomic::Ordering::Relaxed;
    let sim = start_sim(SimConfig {
        approval_rate: 1.0,
        latency_median: Duration::ZERO,
        ..SimConfig::default()
    })
    .await;
    let (config, switch) = switch_with_journal(&sim, 200).await;
    sim.set_delay(Duration::from_millis(1_500));
    let conn = gateway(&switch).await;
    for stan in 50..55 {
        let response = transact(&conn, &authorization(VISA_TEST_CARD, stan)).await;
        assert_eq!(response.get_str(39), Some("91"), "timeout");
    }
    assert_eq!(switch.switch.stats.reversals_queued.load(Relaxed), 5);
    // Reversal attempts time out too while the acquirer is slow (a late answer to one
    // may acknowledge it already: see the test below), until it recovers.
    tokio::time::sleep(Duration::from_millis(300)).await;
    sim.set_delay(Duration::ZERO);
    let deadline = Instant::now() + Duration::from_secs(20);
    while switch.switch.reversals.stats.acknowledged.load(Relaxed) < 5 {
        assert!(Instant::now() < deadline, "reversals not acknowledged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(switch.switch.reversals.stats.pending.load(Relaxed), 0);
    assert!(sim.stats.reversals.load(Relaxed) >= 5);
    let records = journal_records(&config);
    for stan in 50..55 {
        let stan = format!("{stan:06}");
        let count = |kind| {
            records
                .iter()
                .filter(|(_, r)| r.stan == stan && r.kind == kind)
                .count()
        };
        assert_eq!(count(RecordKind::ReversalQueued), 1, "stan {stan}");
        assert_eq!(count(RecordKind::ReversalAck), 1, "stan {stan}");
        assert!(count(RecordKind::ReversalSent) >= 1, "stan {stan}");
        let response = records
            .iter()
            .find(|(_, r)| r.stan == stan && r.kind == RecordKind::Response)
            .unwrap();
        assert_eq!(response.1.code, "91");
        let ack = records
            .iter()
            .find(|(_, r)| r.stan == stan && r.kind == RecordKind::ReversalAck)
            .unwrap();
        assert_eq!(ack.1.code, "00");
        assert_eq!(ack.1.acquirer, "north");
    }
}

/// An acquirer that answers everything, reversals included, only after the switch's
/// timeout: before issue 10 its reversals were retried as new 0400s for ever. Now each
/// retry repeats the same reversal (0401, same link STAN) and the late answer to any
/// attempt acknowledges it, while the acquirer stays slow.
#[tokio::test]
async fn reversals_to_an_acquirer_that_always_answers_late_converge() {
    use payswitch::journal::RecordKind;
    use std::sync::atomic::Ordering::Relaxed;
    let sim = start_sim(SimConfig {
        approval_rate: 1.0,
        latency_median: Duration::ZERO,
        ..SimConfig::default()
    })
    .await;
    let (config, switch) = switch_with_journal(&sim, 200).await;
    sim.set_delay(Duration::from_millis(700));
    let conn = gateway(&switch).await;
    for stan in 70..75 {
        let response = transact(&conn, &authorization(VISA_TEST_CARD, stan)).await;
        assert_eq!(response.get_str(39), Some("91"), "timeout");
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while switch.switch.reversals.stats.acknowledged.load(Relaxed) < 5 {
        assert!(
            Instant::now() < deadline,
            "reversals to a slow acquirer not acknowledged: {} of 5",
            switch.switch.reversals.stats.acknowledged.load(Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(switch.switch.reversals.stats.pending.load(Relaxed), 0);
    let link = &switch.switch.links()[0];
    assert!(
        link.stats.late.load(Relaxed) >= 5,
        "the original answers came late"
    );
    let records = journal_records(&config);
    let mut repeated = 0;
    for stan in 70..75 {
        let stan = format!("{stan:06}");
        let stan = stan.as_str();
        let of = |kind| {
            records
                .iter()
                .filter(move |(_, r)| r.stan == stan && r.kind == kind)
                .map(|(_, r)| r)
        };
        assert_eq!(of(RecordKind::ReversalAck).count(), 1);
        let sent: Vec<_> = of(RecordKind::ReversalSent).collect();
        assert!(!sent.is_empty());
        let reversal_stan = sent[0].reversal_stan;
        assert_ne!(reversal_stan, 0);
        assert!(
            sent.iter().all(|r| r.reversal_stan == reversal_stan),
            "every attempt carries the same STAN"
        );
        let ack = of(RecordKind::ReversalAck).next().unwrap();
        assert_eq!(ack.reversal_stan, reversal_stan);
        repeated += usize::from(sent.len() > 1);
    }
    assert!(
        repeated > 0,
        "some reversal was repeated before its late answer came"
    );
}

#[tokio::test]
async fn a_gateway_reversal_reaches_the_original_acquirer_once() {
    use std::sync::atomic::Ordering::Relaxed;
    let (sim, switch) = one_acquirer().await;
    let conn = gateway(&switch).await;
    let original = authorization(VISA_TEST_CARD, 60);
    assert_eq!(transact(&conn, &original).await.get_str(39), Some("00"));
    let reversal = |stan: u32, original_stan: &str| {
        let base = authorization_with(VISA_TEST_CARD, stan, &[(37, Some("533000000060"))]);
        let mut b = Message::builder(Mti::REVERSAL_REQUEST);
        for n in base.field_numbers() {
            b.set(n, base.get(n).unwrap()).unwrap();
        }
        b.set_str(90, &format!("0100{original_stan}1125123045{:022}", 0))
            .unwrap();
        b.build()
    };
    let first = reversal(61, "000060");
    let answer = transact(&conn, &first).await;
    assert_eq!(answer.mti().as_str(), "0410");
    assert_eq!(answer.get_str(39), Some("00"));
    assert_eq!(answer.get_str(48), Some("reversal=queued"));
    // Retransmitted: the same answer, marked; a second reversal of the same original:
    // nothing more reaches the acquirer.
    let again = transact(&conn, &first).await;
    assert_eq!(again.get_str(48), Some("reversal=queued;dup=1"));
    let second = transact(&conn, &reversal(62, "000060")).await;
    assert_eq!(second.get_str(48), Some("reversal=already_queued"));
    // A reversal of something the switch never saw.
    let unknown = transact(&conn, &reversal(63, "999999")).await;
    assert_eq!(unknown.get_str(39), Some("25"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while switch.switch.reversals.stats.acknowledged.load(Relaxed) < 1 {
        assert!(Instant::now() < deadline, "reversal not acknowledged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(sim.stats.reversals.load(Relaxed), 1);
    // In the journal, the reversal belongs to the original authorization.
    let dir = switch.switch.journal().unwrap().dir().to_owned();
    let mut records = Vec::new();
    payswitch::journal::scan(&dir, false, |seq, r| records.push((seq, r))).unwrap();
    use payswitch::journal::RecordKind;
    let original_seq = records
        .iter()
        .find(|(_, r)| r.kind == RecordKind::Request && r.stan == "000060")
        .unwrap()
        .0;
    for kind in [RecordKind::ReversalQueued, RecordKind::ReversalAck] {
        let (seq, r) = records.iter().find(|(_, r)| r.kind == kind).unwrap();
        assert_eq!(r.request_of(*seq), original_seq, "{kind:?}");
        assert_eq!((r.mti.as_str(), r.stan.as_str()), ("0100", "000060"));
    }
}

/// `journal.retention_days`: at start, closed segments last written before the retention
/// are deleted, except one holding a reversal still owed (its acquirer never answered),
/// which the next start needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_old_segments_but_keeps_what_a_reversal_owed_needs() {
    use payswitch::journal::segment::list_segments;
    use payswitch_loadtest::acquirer_sim::{self, SimConfig};
    use std::time::{Duration, SystemTime};

    let sim = acquirer_sim::start(SimConfig {
        approval_rate: 1.0,
        latency_median: Duration::ZERO,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let mut config = config(vec![acquirer("north", &sim, 300)], vec![]);
    let age = |dir: &std::path::Path, days: u64| {
        for (_, path) in list_segments(dir).unwrap() {
            let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            file.set_modified(SystemTime::now() - Duration::from_secs(days * 86_400))
                .unwrap();
        }
    };
    let run = |config: payswitch::config::Config, stans: std::ops::Range<u32>| {
        let sim_trust = trust(&sim);
        async move {
            let switch = start_switch(&config, vec![sim_trust]).await;
            wait_links_up(&switch).await;
            let conn = gateway(&switch).await;
            let mut codes = Vec::new();
            for stan in stans {
                let response = transact(&conn, &authorization(VISA_TEST_CARD, stan)).await;
                codes.push(response.get_str(39).unwrap().to_string());
            }
            switch.shutdown().await;
            codes
        }
    };
    // First run: approved, then shut down; its segment ages 10 days.
    assert_eq!(run(config.clone(), 1..3).await, ["00", "00"]);
    age(&config.journal.dir, 10);
    // Second run: the acquirer answers after the timeout: 91, a reversal queued and not
    // acknowledged before the shutdown. Its segment ages 10 days too.
    sim.set_delay(Duration::from_secs(5));
    assert_eq!(run(config.clone(), 10..11).await, ["91"]);
    age(&config.journal.dir, 10);
    let before: Vec<u64> = list_segments(&config.journal.dir)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(before.len(), 2, "{before:?}");
    // Third run, retention 1 day: the first run's segment goes; the second's (a reversal
    // owed) stays, as does the new one.
    config.journal.retention_days = 1;
    let switch = start_switch(&config, vec![trust(&sim)]).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let after = loop {
        let after: Vec<u64> = list_segments(&config.journal.dir)
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        if !after.contains(&before[0]) {
            break after;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the old segment was never deleted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        after.contains(&before[1]),
        "the segment a reversal needs was deleted: {after:?}"
    );
    assert_eq!(after.len(), 2, "{after:?}");
    assert_eq!(
        switch
            .switch
            .reversals
            .stats
            .pending
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    switch.shutdown().await;
}

/// The acquirer simulator's ledger (`--ledger`), a JSON value per message it answered.
fn ledger_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Stand-in (STIP): with the route's only acquirer unreachable, a small authorization is
/// approved by the switch (`S…` approval code, `stand_in=1`) and a large one answered 91;
/// once the acquirer is up the advice reaches it (0120, acknowledged by 0130) and books
/// the approval, and a gateway reversal of the stand-in approval follows the advice,
/// naming it in field 90.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_acquirer_is_stood_in_for_and_gets_the_advice_once_it_is_back() {
    use payswitch::journal::RecordKind;
    use payswitch::routing::StandIn;
    use payswitch_net::TlsIdentity;
    use std::sync::atomic::Ordering::Relaxed;

    let identity = TlsIdentity::self_signed(&["localhost"]).unwrap();
    let address = dead_address();
    let north = payswitch::config::AcquirerConfig {
        name: "north".into(),
        address,
        server_name: "localhost".into(),
        ca: None,
        timeout_ms: 1_000,
        max_in_flight: 64,
        breaker: Default::default(),
    };
    let route = RouteConfig {
        bins: vec![],
        currencies: vec![840],
        mccs: vec![],
        acquirers: vec!["north".into()],
        balance: false,
        stand_in: Some(StandIn {
            max_amount_minor: 20_000,
            max_score: None,
        }),
    };
    let config = config(vec![north], vec![route]);
    let switch = start_switch(
        &config,
        vec![ClientTrust::Roots(vec![identity.certs[0].clone()])],
    )
    .await;
    let conn = gateway(&switch).await;

    let small = authorization(VISA_TEST_CARD, 70);
    let stood_in = transact(&conn, &small).await;
    assert_eq!(stood_in.get_str(39), Some("00"));
    let approval = stood_in.get_str(38).unwrap().to_string();
    assert!(approval.starts_with('S'), "{approval}");
    assert!(
        stood_in
            .get_str(48)
            .unwrap()
            .contains("stand_in=1;advice=north"),
        "{:?}",
        stood_in.get_str(48)
    );
    let large = authorization_with(VISA_TEST_CARD, 71, &[(4, Some("000000020001"))]);
    assert_eq!(transact(&conn, &large).await.get_str(39), Some("91"));
    // A retransmission gets the stand-in answer, not a second approval.
    assert_eq!(transact(&conn, &small).await.get_str(38), Some(&*approval));
    // The gateway reverses the stand-in approval while the acquirer is still away.
    let reversal = {
        let mut b = Message::builder(Mti::REVERSAL_REQUEST);
        for n in small.field_numbers() {
            b.set(n, small.get(n).unwrap()).unwrap();
        }
        b.set_str(11, "000072").unwrap();
        b.set_str(90, &format!("0100{:06}1125123045{:022}", 70, 0))
            .unwrap();
        b.build()
    };
    let answer = transact(&conn, &reversal).await;
    assert_eq!(answer.get_str(48), Some("reversal=queued"));
    let stats = &switch.switch.reversals.stats;
    assert_eq!(stats.advices_acknowledged.load(Relaxed), 0);

    // The acquirer comes up where the switch expects it.
    let ledger = tempfile::tempdir().unwrap();
    let ledger_path = ledger.path().join("ledger.jsonl");
    let sim = start_sim(SimConfig {
        quic_listen: address,
        identity: Some(identity.clone()),
        ledger: Some(ledger_path.clone()),
        ..sim_config()
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while stats.acknowledged.load(Relaxed) < 1 {
        assert!(
            Instant::now() < deadline,
            "advice and reversal not acknowledged: {} advices, {} reversals at the acquirer",
            sim.stats.advices.load(Relaxed),
            sim.stats.reversals.load(Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stats.advices_acknowledged.load(Relaxed), 1);
    assert_eq!(
        sim.stats.requests.load(Relaxed),
        0,
        "no authorization reached it"
    );
    sim.shutdown().await;
    // The acquirer's books: the advice (booked with the switch's approval code), then the
    // reversal naming it.
    let lines = ledger_lines(&ledger_path);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["mti"], "0120");
    assert_eq!(lines[0]["approval_code"], approval.as_str());
    assert_eq!(lines[0]["rrn"], "533000000070");
    assert_eq!(lines[0]["amount_minor"], 12_500);
    assert_eq!(lines[1]["mti"], "0400");
    let original = lines[1]["original"].as_str().unwrap();
    let advice_stan = lines[0]["stan"].as_str().unwrap();
    assert_eq!(&original[..10], &format!("0120{advice_stan}"), "{original}");
    // The journal: the stand-in response and its advice, attempted and acknowledged.
    let records = journal_records(&config);
    let kinds: Vec<_> = records.iter().map(|(_, r)| r.kind).collect();
    for kind in [
        RecordKind::AdviceQueued,
        RecordKind::AdviceSent,
        RecordKind::AdviceAck,
        RecordKind::ReversalQueued,
        RecordKind::ReversalAck,
    ] {
        assert!(kinds.contains(&kind), "{kind:?} in {kinds:?}");
    }
    // The stand-in answer is journaled on its advice_queued record.
    assert!(records
        .iter()
        .any(|(_, r)| r.kind == RecordKind::AdviceQueued
            && r.code == "00"
            && r.approval_code == approval
            && r.private_data.contains("stand_in=1")));
    let counters = &switch.switch.stats;
    assert_eq!(
        (
            counters.stand_in_approved.load(Relaxed),
            counters.stand_in_refused.load(Relaxed)
        ),
        (1, 1)
    );
}

/// With `journal.pan_key_file`, the PAN is sealed in the journal (never in clear), and a
/// reversal rebuilt from the journal after a restart carries it in field 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_pan_key_file_a_reversal_rebuilt_after_a_restart_carries_the_pan() {
    use std::sync::atomic::Ordering::Relaxed;
    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("pan-data.key");
    payswitch::journal::vault::add_key(&key_file).unwrap();
    let ledger = tempfile::tempdir().unwrap();
    let ledger_path = ledger.path().join("ledger.jsonl");
    let sim = start_sim(SimConfig {
        latency_median: Duration::ZERO,
        ledger: Some(ledger_path.clone()),
        ..sim_config()
    })
    .await;
    let mut config = config(vec![acquirer("north", &sim, 200)], vec![]);
    config.journal.pan_key_file = Some(key_file.clone());
    let switch = start_switch(&config, vec![trust(&sim)]).await;
    wait_links_up(&switch).await;
    sim.set_delay(Duration::from_millis(1_500));
    let conn = gateway(&switch).await;
    let response = transact(&conn, &authorization(VISA_TEST_CARD, 80)).await;
    assert_eq!(response.get_str(39), Some("91"), "timeout: reversal queued");
    // Stopped before the reversal leaves (it waits 5 s after its original).
    switch.shutdown().await;
    sim.set_delay(Duration::ZERO);
    let journal_bytes: Vec<u8> = std::fs::read_dir(&config.journal.dir)
        .unwrap()
        .flat_map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert!(
        !journal_bytes
            .windows(VISA_TEST_CARD.len())
            .any(|w| w == VISA_TEST_CARD.as_bytes()),
        "the PAN in clear in the journal"
    );
    let sealed = journal_records(&config)
        .into_iter()
        .filter(|(_, r)| r.pan_sealed.is_some())
        .map(|(_, r)| r.kind)
        .collect::<Vec<_>>();
    use payswitch::journal::RecordKind;
    assert_eq!(
        sealed,
        [RecordKind::Forwarded, RecordKind::ReversalQueued],
        "sealed where a reversal is built from, nowhere else"
    );

    let switch = start_switch(&config, vec![trust(&sim)]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while switch.switch.reversals.stats.acknowledged.load(Relaxed) < 1 {
        assert!(Instant::now() < deadline, "reversal not acknowledged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    switch.shutdown().await;
    sim.shutdown().await;
    let lines = ledger_lines(&ledger_path);
    let reversal = lines
        .iter()
        .find(|l| l["mti"] == "0400" || l["mti"] == "0401")
        .expect("the reversal reached the acquirer");
    assert_eq!(reversal["rrn"], "533000000080");
    assert_eq!(reversal["pan"], "411111******1111", "{reversal}");
    // A key file others may read is refused at start.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o640)).unwrap();
    let security = payswitch::switch::Security {
        identity: payswitch_net::TlsIdentity::self_signed(&["localhost"]).unwrap(),
        acquirer_trust: vec![],
        gateways: None,
    };
    let refused = payswitch::switch::start(&config, security).await;
    assert!(refused.is_err(), "a key file readable by its group");
}

/// Velocity survives a restart: the journal's scored requests of the last day are
/// replayed into the card state, so a rule on the card's 24-hour count sees the requests
/// made before the restart (before issue 10 the windows were empty after one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn velocity_windows_come_back_after_a_restart() {
    use payswitch_protocol::time::UtcDateTime;
    let rules_dir = tempfile::tempdir().unwrap();
    let rules = rules_dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        "[[rule]]\nname = \"fourth_in_a_day\"\nwhen = \"card_count_24h >= 3.0\"\naction = \"decline\"\n",
    )
    .unwrap();
    let sim = start_sim(sim_config()).await;
    let mut config = config(vec![acquirer("north", &sim, 2_000)], vec![]);
    config.scoring.rules = Some(rules);
    // Field 7 now: velocity runs on the transactions' own time.
    let now = UtcDateTime::from_unix_ms(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64,
    )
    .transmission_time();
    let at_now = |pan: &str, stan: u32| authorization_with(pan, stan, &[(7, Some(&now))]);

    let switch = start_switch(&config, vec![trust(&sim)]).await;
    wait_links_up(&switch).await;
    let conn = gateway(&switch).await;
    for stan in 90..93 {
        let r = transact(&conn, &at_now(VISA_TEST_CARD, stan)).await;
        assert_eq!(r.get_str(39), Some("00"), "stan {stan}");
    }
    switch.shutdown().await;

    let switch = start_switch(&config, vec![trust(&sim)]).await;
    wait_links_up(&switch).await;
    let conn = gateway(&switch).await;
    let fourth = transact(&conn, &at_now(VISA_TEST_CARD, 93)).await;
    assert_eq!(
        fourth.get_str(39),
        Some("59"),
        "the card's three requests before the restart count: {:?}",
        fourth.get_str(48)
    );
    assert!(fourth.get_str(48).unwrap().contains("fourth_in_a_day"));
    let other = transact(&conn, &at_now(MASTERCARD_TEST_CARD, 94)).await;
    assert_eq!(other.get_str(39), Some("00"), "another card has no history");
}
