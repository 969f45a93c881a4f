//! What the in-process switch tests share: a loopback configuration, and starting a switch
//! in front of simulated acquirers.

// Each test binary uses a part of this.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use bytes::BytesMut;
use payswitch::config::{AcquirerConfig, Config, ListenConfig, PipelineConfig, RouteConfig};
use payswitch::switch::{self, RunningSwitch, Security};
use payswitch_loadtest::acquirer_sim::RunningSim;
use payswitch_net::{framed, quic, ClientTrust, FrameReader, TlsIdentity};
use payswitch_protocol::{Message, Mti};

pub mod nats;
pub mod python;

/// An acquirer at `sim`, answered within `timeout_ms`.
pub fn acquirer(name: &str, sim: &RunningSim, timeout_ms: u64) -> AcquirerConfig {
    AcquirerConfig {
        name: name.into(),
        address: sim.quic_addr,
        server_name: "localhost".into(),
        ca: None,
        timeout_ms,
        max_in_flight: 1024,
        breaker: Default::default(),
    }
}

/// QUIC, TCP and admin on ephemeral loopback ports, two shards, no model, no admin token.
pub fn config(acquirers: Vec<AcquirerConfig>, routes: Vec<RouteConfig>) -> Config {
    Config {
        listen: ListenConfig {
            quic: Some("127.0.0.1:0".parse().unwrap()),
            tcp: Some("127.0.0.1:0".parse().unwrap()),
            admin: Some("127.0.0.1:0".parse().unwrap()),
        },
        tls: None,
        pipeline: PipelineConfig {
            shards: 2,
            ..PipelineConfig::default()
        },
        scoring: Default::default(),
        // Each switch its own journal, as in production (kept for a failing test's autopsy
        // under the system's temporary directory).
        journal: payswitch::journal::JournalConfig {
            dir: tempfile::tempdir().unwrap().keep(),
            // Small segments keep the zeroed runway (and what the tests leave behind) small.
            segment_bytes: 1 << 20,
            ..Default::default()
        },
        cluster: None,
        acquirers,
        routes,
        insecure_acquirers: false,
        source: None,
        admin_token: None,
    }
}

/// How the switch trusts a simulator: its self-signed certificate.
pub fn trust(sim: &RunningSim) -> ClientTrust {
    ClientTrust::Roots(vec![sim.certificate.clone()])
}

/// Starts the switch; its acquirer links connect in the background.
pub async fn start_switch(config: &Config, trust: Vec<ClientTrust>) -> RunningSwitch {
    let security = Security {
        identity: TlsIdentity::self_signed(&["localhost"]).unwrap(),
        acquirer_trust: trust,
        gateways: None,
    };
    switch::start(config, security).await.unwrap()
}

/// Waits until every acquirer link of the switch is up.
pub async fn wait_links_up(switch: &RunningSwitch) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !switch.switch.links().iter().all(|l| l.is_up()) {
        assert!(Instant::now() < deadline, "acquirer links did not come up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A switch in front of the one simulator `sim` (acquirer "north"), links up.
pub async fn in_front_of(sim: &RunningSim, config: Config) -> RunningSwitch {
    let switch = start_switch(&config, vec![trust(sim)]).await;
    wait_links_up(&switch).await;
    switch
}

/// A well-formed 0100 for `pan` with STAN `stan` (and an RRN made from it).
pub fn authorization(pan: &str, stan: u32) -> Message {
    let mut b = Message::builder(Mti::AUTHORIZATION_REQUEST);
    b.set_str(2, pan).unwrap();
    b.set_str(3, "000000").unwrap();
    b.set_str(4, "000000012500").unwrap();
    b.set_str(7, "1125123045").unwrap();
    b.set_str(11, &format!("{stan:06}")).unwrap();
    b.set_str(14, "9912").unwrap();
    b.set_str(18, "5411").unwrap();
    b.set_str(22, "051").unwrap();
    b.set_str(37, &format!("5330{stan:08}")).unwrap();
    b.set_str(41, "TERM0001").unwrap();
    b.set_str(42, "MERCHANT0000001").unwrap();
    b.set_str(49, "840").unwrap();
    b.build()
}

/// A gateway connection to the switch over QUIC.
pub async fn gateway(switch: &RunningSwitch) -> quinn::Connection {
    let endpoint =
        quic::client_endpoint(ClientTrust::Roots(vec![switch.certificate.clone()])).unwrap();
    quic::connect(&endpoint, switch.quic_addr.unwrap(), "localhost")
        .await
        .unwrap()
}

/// One transaction on its own stream: write, finish, read the one response.
pub async fn transact(conn: &quinn::Connection, request: &Message) -> Message {
    let (mut send, recv) = conn.open_bi().await.unwrap();
    framed::write_message(&mut send, request, &mut BytesMut::new())
        .await
        .unwrap();
    send.finish().unwrap();
    let mut reader = FrameReader::new(recv, 8192);
    let frame = reader.next_frame().await.unwrap().expect("a response");
    assert!(
        reader.next_frame().await.unwrap().is_none(),
        "exactly one response"
    );
    Message::decode(frame).unwrap()
}
