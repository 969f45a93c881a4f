//! The binary as an operator runs it: `payswitch acquirer-sim`, `payswitch serve` with the
//! quick-start flags, and `payswitch load`, as separate processes on loopback.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_payswitch");

mod common;
use common::address_after;

/// Kills the process when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `payswitch ARGS` and reads stdout lines until `done` says enough; returns them.
fn spawn(args: &[&str], done: impl Fn(&str) -> bool) -> (Running, Vec<String>) {
    spawn_with_env(args, &[], done)
}

fn spawn_with_env(
    args: &[&str],
    env: &[(&str, &str)],
    done: impl Fn(&str) -> bool,
) -> (Running, Vec<String>) {
    // Each process in its own working directory: `serve` keeps its journal there.
    let cwd = tempfile::tempdir().unwrap().keep();
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(cwd)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let running = Running(child);
    let mut lines = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        let finished = done(&line);
        lines.push(line);
        if finished {
            return (running, lines);
        }
    }
    panic!("payswitch {args:?} ended early: {lines:?}");
}

fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(addr).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    Some(text)
}

fn load(args: &[&str]) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let mut all = vec!["load"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--json", json.to_str().unwrap(), "--quiet"]);
    let output = Command::new(BIN).args(&all).output().unwrap();
    assert!(
        output.status.success(),
        "load failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap()
}

fn check_report(report: &serde_json::Value, expected: u64) {
    assert_eq!(report["sent"], expected, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["answered"], expected, "{report}");
    assert_eq!(
        report["codes"]["00"], expected,
        "approval rate 1.0: {report}"
    );
    assert_eq!(
        report["codes_by_acquirer"]["acquirer-1"]["00"], expected,
        "{report}"
    );
    for key in [
        "offered_tps",
        "achieved_tps",
        "p50_us",
        "p90_us",
        "p99_us",
        "p999_us",
        "max_us",
    ] {
        assert!(report[key].is_number(), "{key} in {report}");
    }
    assert!(report["p50_us"].as_u64() <= report["max_us"].as_u64());
}

#[test]
fn quick_start_serve_forwards_a_load_to_the_acquirer_over_quic_and_tcp() {
    let (_sim, sim_lines) = spawn(
        &[
            "acquirer-sim",
            "--listen",
            "127.0.0.1:0",
            "--approval-rate",
            "1.0",
        ],
        |l| l.contains("listening on"),
    );
    let acquirer = address_after(&sim_lines, "QUIC ").to_string();
    let (_switch, lines) = spawn(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--tcp-listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--acquirer",
            &acquirer,
            "--shards",
            "2",
        ],
        |l| l.contains("acquirer acquirer-1"),
    );
    let quic = address_after(&lines, "QUIC (ALPN iso8583) on ").to_string();
    let tcp = address_after(&lines, "TCP on ").to_string();
    let admin = address_after(&lines, "admin on http://");

    let health = http_get(admin, "/health").unwrap();
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");

    // The link to the acquirer connects in the background: wait until a request gets 00.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let probe = load(&[
            "--target",
            &quic,
            "--rate",
            "10",
            "--duration",
            "100ms",
            "--connections",
            "1",
        ]);
        if probe["codes"]["00"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "switch never approved: {probe}");
        std::thread::sleep(Duration::from_millis(100));
    }

    let report = load(&[
        "--target",
        &quic,
        "--rate",
        "400",
        "--duration",
        "1s",
        "--connections",
        "2",
    ]);
    check_report(&report, 400);
    let report = load(&[
        "--target",
        &quic,
        "--rate",
        "400",
        "--duration",
        "1s",
        "--connections",
        "2",
        "--pipelined",
    ]);
    check_report(&report, 400);
    let report = load(&[
        "--target",
        &tcp,
        "--tcp",
        "--rate",
        "400",
        "--duration",
        "1s",
        "--connections",
        "2",
    ]);
    check_report(&report, 400);
}

#[test]
fn serve_refuses_a_config_that_does_not_check_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[listen]\nquic = \"127.0.0.1:0\"\n[[acquirers]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\nca = \"a.pem\"\n\
         [[routes]]\nbins = [\"4\"]\nacquirers = [\"b\"]\n",
    )
    .unwrap();
    let output = Command::new(BIN)
        .args(["serve", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unknown acquirer \"b\""), "{stderr}");
}

#[test]
fn an_acquirer_killed_without_goodbye_is_marked_down_and_answered_91_at_once() {
    let (mut sim, sim_lines) = spawn(
        &[
            "acquirer-sim",
            "--listen",
            "127.0.0.1:0",
            "--approval-rate",
            "1.0",
        ],
        |l| l.contains("listening on"),
    );
    let acquirer = address_after(&sim_lines, "QUIC ").to_string();
    let (_switch, lines) = spawn(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--acquirer",
            &acquirer,
            "--acquirer-timeout-ms",
            "5000",
        ],
        |l| l.contains("acquirer acquirer-1"),
    );
    let quic = address_after(&lines, "QUIC (ALPN iso8583) on ").to_string();
    let probe = || {
        load(&[
            "--target",
            &quic,
            "--rate",
            "10",
            "--duration",
            "100ms",
            "--connections",
            "1",
        ])
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while probe()["codes"]["00"] != 1 {
        assert!(Instant::now() < deadline, "switch never approved");
        std::thread::sleep(Duration::from_millis(100));
    }

    // SIGKILL: the acquirer sends no CONNECTION_CLOSE; only the link's idle timeout tells.
    sim.0.kill().unwrap();
    let _ = sim.0.wait();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let report = probe();
        // Once the link is down, 91 comes without waiting for the 5 s acquirer timeout.
        if report["codes"]["91"] == 1 && report["max_us"].as_u64().unwrap() < 1_000_000 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "link never marked down: {report}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn payswitch(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("PAYSWITCH_ADMIN_TOKEN")
        .output()
        .unwrap()
}

#[test]
fn model_deploy_reaches_a_running_switch_only_with_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.csv");
    let model = dir.path().join("lr.pswm");
    let (data_s, model_s) = (data.to_str().unwrap(), model.to_str().unwrap());
    assert!(
        payswitch(&["gen-data", "--count", "20000", "--seed", "3", "--out", data_s])
            .status
            .success()
    );
    let trained = payswitch(&[
        "model", "train", "--data", data_s, "--kind", "logistic", "--out", model_s,
    ]);
    assert!(
        trained.status.success(),
        "{}",
        String::from_utf8_lossy(&trained.stderr)
    );

    let (_sim, sim_lines) = spawn(&["acquirer-sim", "--listen", "127.0.0.1:0"], |l| {
        l.contains("listening on")
    });
    let acquirer = address_after(&sim_lines, "QUIC ").to_string();
    let (_switch, lines) = spawn_with_env(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--acquirer",
            &acquirer,
        ],
        &[("PAYSWITCH_ADMIN_TOKEN", "s3cret")],
        |l| l.contains("acquirer acquirer-1"),
    );
    let admin = address_after(&lines, "admin on http://").to_string();

    let refused = payswitch(&[
        "model", "deploy", model_s, "--admin", &admin, "--token", "wrong",
    ]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("401"), "{stderr}");

    let deployed = payswitch(&[
        "model", "deploy", model_s, "--admin", &admin, "--token", "s3cret",
    ]);
    assert!(
        deployed.status.success(),
        "{}",
        String::from_utf8_lossy(&deployed.stderr)
    );
    let stdout = String::from_utf8_lossy(&deployed.stdout);
    assert!(stdout.contains("as champion"), "{stdout}");
    let listing = http_get(admin.parse().unwrap(), "/api/models").unwrap();
    let id = stdout.split_whitespace().nth(1).unwrap();
    assert!(listing.contains(id), "{listing}");
}

#[test]
fn logs_to_a_pipe_carry_no_colour_escapes() {
    let cwd = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--acquirer",
            "127.0.0.1:9",
        ])
        .current_dir(cwd.path())
        .env_remove("NO_COLOR")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let mut running = Running(child);
    // Up once the listener is announced; the start-up warnings are logged by then.
    let up = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.contains("QUIC (ALPN iso8583) on"));
    assert!(up, "serve ended before listening");
    running.0.kill().unwrap();
    running.0.wait().unwrap();
    let mut logs = String::new();
    stderr.read_to_string(&mut logs).unwrap();
    assert!(logs.contains("self-signed"), "no start-up warning: {logs}");
    assert!(
        !logs.contains("\x1b["),
        "colour escapes in piped logs: {logs:?}"
    );
}
