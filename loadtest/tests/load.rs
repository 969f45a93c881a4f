//! Short open-loop runs against the simulator over loopback: every request is accounted for.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use payswitch_loadtest::acquirer_sim::{RunningSim, SimConfig};
use payswitch_loadtest::load::{self, LoadConfig, Mode, Report};

fn config(sim: &RunningSim, mode: Mode) -> LoadConfig {
    let target = match mode {
        Mode::Tcp => sim.tcp_addr.expect("TCP is served"),
        Mode::QuicPerStream | Mode::QuicPipelined => sim.quic_addr,
    };
    LoadConfig {
        mode,
        rate_tps: 500.0,
        duration: Duration::from_secs(1),
        connections: 2,
        cards: 1000,
        terminals: 10,
        ..LoadConfig::new(target, trust(sim))
    }
}

/// The invariants of any report: every scheduled request ends answered or as an error,
/// codes add up to the answers, percentiles are ordered.
fn assert_accounts_for_everything(report: &Report) {
    assert_eq!(report.sent, report.answered + report.errors, "{report:#?}");
    assert_eq!(
        report.errors,
        report.errors_by_kind.values().sum::<u64>(),
        "{report:#?}"
    );
    assert_eq!(report.codes.values().sum::<u64>(), report.answered);
    let by_acquirer: u64 = report
        .codes_by_acquirer
        .values()
        .flat_map(|codes| codes.values())
        .sum();
    assert_eq!(by_acquirer, report.answered);
    assert!(report.p50_us <= report.p90_us, "{report:#?}");
    assert!(report.p90_us <= report.p99_us, "{report:#?}");
    assert!(report.p99_us <= report.p999_us, "{report:#?}");
    assert!(report.p999_us <= report.max_us, "{report:#?}");
}

async fn clean_run(mode: Mode) {
    let sim = sim(SimConfig {
        name: "sim-a".into(),
        ..SimConfig::default()
    })
    .await;
    let report = load::run(config(&sim, mode)).await.expect("load runs");
    assert_accounts_for_everything(&report);
    assert_eq!(report.sent, 500);
    assert_eq!(report.errors, 0, "{report:#?}");
    assert_eq!(report.answered, 500);
    assert_eq!(report.late_responses + report.unmatched_responses, 0);
    assert!(report.codes.contains_key("00"), "{report:#?}");
    assert_eq!(
        report.codes_by_acquirer.keys().collect::<Vec<_>>(),
        ["sim-a"]
    );
    assert!(report.achieved_tps > 0.0);
    assert_eq!(sim.stats.requests.load(Ordering::Relaxed), 500);
    let text = report.render();
    assert!(text.contains(mode.as_str()), "{text}");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_stream_per_transaction_answers_every_request() {
    bounded(clean_run(Mode::QuicPerStream)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_pipelined_matches_every_response() {
    bounded(clean_run(Mode::QuicPipelined)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_pipelined_matches_every_response() {
    bounded(clean_run(Mode::Tcp)).await;
}

/// An acquirer slower than the request timeout: every request is an error (timeout, or
/// overload past the outstanding cap), none is lost from the totals, and the run still ends.
async fn slow_target_run(mode: Mode) {
    let sim = sim(SimConfig {
        delay: Duration::from_secs(3),
        ..SimConfig::default()
    })
    .await;
    let report = load::run(LoadConfig {
        rate_tps: 100.0,
        duration: Duration::from_millis(500),
        request_timeout: Duration::from_millis(300),
        max_outstanding_per_connection: 5,
        ..config(&sim, mode)
    })
    .await
    .expect("load runs");
    assert_accounts_for_everything(&report);
    assert_eq!(report.sent, 50);
    assert_eq!(report.answered, 0, "{report:#?}");
    assert!(report.errors_by_kind["timeout"] > 0, "{report:#?}");
    assert!(report.errors_by_kind["overload"] > 0, "{report:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_target_per_stream_counts_timeouts_and_overload() {
    bounded(slow_target_run(Mode::QuicPerStream)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_target_pipelined_counts_timeouts_and_overload() {
    bounded(slow_target_run(Mode::QuicPipelined)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_target_is_an_error_not_a_hang() {
    bounded(async {
        // Bind and drop a TCP listener to get a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let config = LoadConfig {
            mode: Mode::Tcp,
            ..LoadConfig::new(port, payswitch_net::ClientTrust::AcceptAny)
        };
        assert!(load::run(config).await.is_err());
    })
    .await;
}

#[derive(clap::Parser, Debug)]
struct LoadCli {
    #[command(flatten)]
    args: load::LoadArgs,
}

#[derive(clap::Parser, Debug)]
struct SimCli {
    #[command(flatten)]
    args: payswitch_loadtest::acquirer_sim::SimArgs,
}

#[test]
fn command_lines_parse() {
    use clap::Parser;
    let sim = SimCli::try_parse_from([
        "sim",
        "--listen",
        "127.0.0.1:0",
        "--approval-rate",
        "0.5",
        "--delay-ms",
        "10",
        "--name",
        "b",
    ])
    .unwrap();
    assert_eq!(sim.args.approval_rate, 0.5);
    assert!(SimCli::try_parse_from(["sim", "--approval-rate", "1.5"]).is_err());
    assert!(
        SimCli::try_parse_from(["sim", "--cert", "c.pem"]).is_err(),
        "--key required"
    );
    let load = LoadCli::try_parse_from(["load", "--duration", "1m30s", "--bins", "4,51"]).unwrap();
    assert_eq!(load.args.duration, Duration::from_secs(90));
    assert_eq!(load.args.bins, ["4", "51"]);
    let defaults = LoadCli::try_parse_from(["load"]).unwrap();
    assert_eq!(defaults.args.bins, ["400000", "510000"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_writes_the_json_report() {
    use clap::Parser;
    bounded(async {
        let sim = sim(SimConfig::default()).await;
        let json = std::env::temp_dir().join(format!(
            "payswitch-load-{}-{}.json",
            std::process::id(),
            sim.quic_addr.port()
        ));
        let target = sim.tcp_addr.unwrap().to_string();
        let cli = LoadCli::try_parse_from([
            "load",
            "--target",
            &target,
            "--tcp",
            "--rate",
            "200",
            "--duration",
            "500ms",
            "--connections",
            "1",
            "--quiet",
            "--json",
            json.to_str().unwrap(),
        ])
        .unwrap();
        load::run_cli(cli.args).await.expect("load runs");
        let written: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let _ = std::fs::remove_file(&json);
        assert_eq!(written["sent"], 100);
        assert_eq!(written["answered"], 100);
        assert_eq!(written["mode"], "tcp");
        for key in [
            "offered_tps",
            "achieved_tps",
            "p50_us",
            "p999_us",
            "max_us",
            "codes",
        ] {
            assert!(written.get(key).is_some(), "{key} in {written}");
        }
    })
    .await;
}
