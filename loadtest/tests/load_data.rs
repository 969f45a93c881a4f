//! `load --data` over loopback: a gen-data file replayed against the simulator (never 59)
//! and against a tiny server that declines small amounts, checking the fraud figures
//! against the file.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use payswitch_loadtest::acquirer_sim::SimConfig;
use payswitch_loadtest::load::{self, LabelReport, LoadConfig, Mode, Report};
use payswitch_loadtest::workload::{write_workload, GenConfig};
use payswitch_models::data::{read_all, LabeledTransaction};
use payswitch_net::serve::{serve_quic, Handler};
use payswitch_net::{quic, ClientTrust, Limits, Reply, ServeStats, TlsIdentity};
use payswitch_protocol::{fields, Message, Mti};
use tokio_util::sync::CancellationToken;

/// The test server declines (59) exactly the amounts below this, approves the rest.
const DECLINE_BELOW_MINOR: u64 = 500;

/// Writes a gen-data file of `count` rows (5 % fraud, so a short run sends plenty) to a
/// fresh path and returns it with its rows.
fn data_file(name: &str, count: u64, seed: u64) -> (PathBuf, Vec<LabeledTransaction>) {
    let path = std::env::temp_dir().join(format!(
        "payswitch-load-data-{}-{name}.csv",
        std::process::id()
    ));
    let config = GenConfig {
        fraud_rate: 0.05,
        ..GenConfig::new(count, seed)
    };
    let file = std::fs::File::create(&path).unwrap();
    write_workload(&config, std::io::BufWriter::new(file)).unwrap();
    let rows = read_all(std::fs::File::open(&path).unwrap()).unwrap();
    (path, rows)
}

fn labels(report: &Report) -> &LabelReport {
    report.labels.as_ref().expect("a --data run reports labels")
}

fn fraud_in(rows: &[LabeledTransaction]) -> u64 {
    rows.iter().filter(|r| r.is_fraud == 1).count() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_replay_against_the_simulator_sends_every_fraud_row_and_catches_none() {
    bounded(async {
        let sim = sim(SimConfig::default()).await;
        let (path, rows) = data_file("sim", 1_000, 21);
        // 1 000 rows at 2 000 TPS take half a second: the file ends before the duration.
        let report = load::run(LoadConfig {
            mode: Mode::QuicPipelined,
            rate_tps: 2_000.0,
            duration: Duration::from_secs(10),
            connections: 3,
            data: Some(path.clone()),
            ..LoadConfig::new(sim.quic_addr, trust(&sim))
        })
        .await
        .expect("load runs");
        assert_eq!(
            (report.sent, report.answered),
            (1_000, 1_000),
            "{report:#?}"
        );
        let l = labels(&report);
        assert_eq!(l.ended_by, "end_of_file");
        assert_eq!(l.fraud_sent, fraud_in(&rows));
        assert_eq!((l.fraud_caught, l.legit_declined), (0, 0));
        assert_eq!(l.fraud_amount_caught_minor, 0);
        assert_eq!(l.fraud_sent_by_scenario.values().sum::<u64>(), l.fraud_sent);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["fraud_sent"], l.fraud_sent);
        assert!(report.render().contains("fraud"), "{}", report.render());

        // Half a second at 400 TPS is 200 rows: the duration ends this one.
        let report = load::run(LoadConfig {
            rate_tps: 400.0,
            duration: Duration::from_millis(500),
            connections: 2,
            data: Some(path.clone()),
            ..LoadConfig::new(sim.quic_addr, trust(&sim))
        })
        .await
        .expect("load runs");
        assert_eq!(report.sent, 200, "{report:#?}");
        let l = labels(&report);
        assert_eq!(l.ended_by, "duration");
        assert_eq!(l.fraud_sent, fraud_in(&rows[..200]));
        sim.shutdown().await;
        let _ = std::fs::remove_file(path);
    })
    .await;
}

/// Declines amounts below [`DECLINE_BELOW_MINOR`] with 59, approves the rest; echoes the
/// fields a pipelined client matches on.
struct SmallAmountDecliner;

impl Handler for SmallAmountDecliner {
    async fn handle(self: Arc<Self>, frame: Bytes) -> Reply {
        let Ok(request) = Message::decode(frame) else {
            return Reply::Close(1);
        };
        let amount: u64 = request
            .get_str(fields::AMOUNT)
            .and_then(|a| a.parse().ok())
            .unwrap_or(u64::MAX);
        let code = if amount < DECLINE_BELOW_MINOR {
            "59"
        } else {
            "00"
        };
        let mut response = Message::builder(Mti::AUTHORIZATION_RESPONSE);
        for field in [fields::STAN, fields::RRN, fields::TERMINAL] {
            if let Some(value) = request.get(field) {
                response.set(field, value).unwrap();
            }
        }
        response.set_str(fields::RESPONSE_CODE, code).unwrap();
        Reply::Message(response.build())
    }
}

async fn decliner_run(mode: Mode) {
    let identity = TlsIdentity::self_signed(&["localhost"]).unwrap();
    let certificate = identity.certs[0].clone();
    let endpoint = quic::server_endpoint("127.0.0.1:0".parse().unwrap(), identity).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve_quic(
        endpoint,
        Arc::new(SmallAmountDecliner),
        Limits::default(),
        Arc::new(ServeStats::default()),
        shutdown.clone(),
    ));
    let (path, rows) = data_file(mode.as_str(), 1_500, 33);
    let report = load::run(LoadConfig {
        mode,
        rate_tps: 3_000.0,
        duration: Duration::from_secs(10),
        connections: 2,
        data: Some(path.clone()),
        ..LoadConfig::new(addr, ClientTrust::Roots(vec![certificate]))
    })
    .await
    .expect("load runs");
    assert_eq!(
        (report.sent, report.answered),
        (1_500, 1_500),
        "{report:#?}"
    );
    let small = |r: &LabeledTransaction| r.amount_minor < DECLINE_BELOW_MINOR;
    let fraud: Vec<&LabeledTransaction> = rows.iter().filter(|r| r.is_fraud == 1).collect();
    let caught: Vec<&LabeledTransaction> = fraud.iter().copied().filter(|r| small(r)).collect();
    let legit_small = rows.iter().filter(|r| r.is_fraud == 0 && small(r)).count();
    let l = labels(&report);
    assert_eq!(l.fraud_sent, fraud.len() as u64);
    assert_eq!(l.fraud_caught, caught.len() as u64);
    assert!(l.fraud_caught > 0, "card testing probes are below 5.00");
    assert_eq!(l.legit_declined, legit_small as u64);
    assert_eq!(
        l.fraud_amount_minor,
        fraud.iter().map(|r| r.amount_minor).sum::<u64>()
    );
    assert_eq!(
        l.fraud_amount_caught_minor,
        caught.iter().map(|r| r.amount_minor).sum::<u64>()
    );
    for (scenario, n) in &l.fraud_caught_by_scenario {
        let expected = caught.iter().filter(|r| &r.scenario == scenario).count();
        assert_eq!(*n, expected as u64, "{scenario}");
    }
    assert_eq!(
        report.codes.get("59").copied().unwrap_or(0),
        l.fraud_caught + l.legit_declined
    );
    shutdown.cancel();
    let _ = server.await;
    let _ = std::fs::remove_file(path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fraud_caught_and_legit_declined_match_the_file_per_stream() {
    bounded(decliner_run(Mode::QuicPerStream)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fraud_caught_and_legit_declined_match_the_file_pipelined() {
    bounded(decliner_run(Mode::QuicPipelined)).await;
}
