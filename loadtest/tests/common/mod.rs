//! Helpers shared by the loopback tests: a simulator, a QUIC client trusting it, requests.

#![allow(dead_code)] // each test binary uses its own subset

use std::future::Future;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use payswitch_loadtest::acquirer_sim::{self, RunningSim, SimConfig};
use payswitch_loadtest::cards::{
    authorization, pan_with_bin, Card, RrnGenerator, Terminal, DEFAULT_BINS,
};
use payswitch_net::framed::write_message;
use payswitch_net::{quic, ClientTrust, FrameReader};
use payswitch_protocol::time::UtcDateTime;
use payswitch_protocol::{Message, Pan, Stan};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// Generous bound on a whole test: only there so a hang fails instead of blocking CI.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `test` under [`TEST_TIMEOUT`].
pub async fn bounded<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("test took longer than TEST_TIMEOUT")
}

/// A simulator on ephemeral loopback ports (QUIC and TCP) with a small latency.
pub async fn sim(config: SimConfig) -> RunningSim {
    acquirer_sim::start(SimConfig {
        tcp_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..config
    })
    .await
    .expect("simulator starts")
}

/// Trust exactly the simulator's self-signed certificate.
pub fn trust(sim: &RunningSim) -> ClientTrust {
    ClientTrust::Roots(vec![sim.certificate.clone()])
}

/// A QUIC connection to the simulator, checking its certificate for "localhost".
pub async fn connect(sim: &RunningSim) -> (quinn::Endpoint, quinn::Connection) {
    let endpoint = quic::client_endpoint(trust(sim)).unwrap();
    let connection = quic::connect(&endpoint, sim.quic_addr, "localhost")
        .await
        .expect("QUIC handshake with the simulator");
    (endpoint, connection)
}

/// One transaction on a fresh stream.
pub async fn exchange(connection: &quinn::Connection, request: &Message) -> Message {
    let (mut send, recv) = connection.open_bi().await.unwrap();
    write_message(&mut send, request, &mut BytesMut::new())
        .await
        .unwrap();
    send.finish().unwrap();
    let mut frames = FrameReader::new(recv, 8192);
    let frame = frames.next_frame().await.unwrap().expect("a response");
    Message::decode(frame).unwrap()
}

/// A card with a BIN from the defaults and the given expiry (YYMM).
pub fn card(seed: u64, expiry: &str) -> Card {
    let mut rng = StdRng::seed_from_u64(seed);
    let pan = pan_with_bin(DEFAULT_BINS[0], &mut rng);
    Card {
        pan: Pan::parse(pan.as_bytes()).unwrap(),
        expiry: expiry.to_owned(),
    }
}

/// An expiry a few years ahead.
pub fn future_expiry() -> String {
    format!(
        "{:02}12",
        (UtcDateTime::from_system_time(SystemTime::now()).year() + 3) % 100
    )
}

/// December of last year: expired.
pub fn past_expiry() -> String {
    format!(
        "{:02}12",
        (UtcDateTime::from_system_time(SystemTime::now()).year() - 1) % 100
    )
}

/// A 0100 of `card` for `amount_minor` from terminal 1.
pub fn request(card: &Card, amount_minor: u64, stan: u32) -> Message {
    let rrn = RrnGenerator::new().next_rrn();
    authorization(
        card,
        amount_minor,
        &Terminal::synthetic(1),
        Stan::new(stan).unwrap(),
        &rrn,
        UtcDateTime::from_system_time(SystemTime::now()),
    )
    .unwrap()
}
