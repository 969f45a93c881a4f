//! What the process-level tests share: the binary, processes that die with the test,
//! their ready lines, and JSON-lines books.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_payswitch");

/// Kills the process when the test ends, however it ends.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Running {
    /// SIGKILL: no drain, no flush, no goodbye.
    pub fn kill_9(mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }

    /// Sends `signal` (`STOP`, `CONT`, …) to the process.
    pub fn signal(&self, signal: &str) {
        let pid = self.0.id().to_string();
        assert!(Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap()
            .success());
    }

    /// SIGTERM, then wait for a graceful exit.
    pub fn terminate(mut self) {
        let pid = self.0.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.0.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "process {pid} did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Starts `payswitch ARGS` and reads stdout until a line contains `ready`.
pub fn spawn(args: &[&str], ready: &str) -> (Running, Vec<String>) {
    spawn_logging(args, ready, None)
}

/// As [`spawn`], its log (stderr) written to `log` when given.
pub fn spawn_logging(
    args: &[&str],
    ready: &str,
    log: Option<&std::path::Path>,
) -> (Running, Vec<String>) {
    let stderr = match log {
        Some(path) => Stdio::from(std::fs::File::create(path).unwrap()),
        None => Stdio::null(),
    };
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let running = Running(child);
    let mut lines = Vec::new();
    let mut reader = BufReader::new(stdout);
    loop {
        let mut line = String::new();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "payswitch {args:?} ended early: {lines:?}"
        );
        let done = line.contains(ready);
        lines.push(line);
        if done {
            // Keep draining stdout so the process never blocks on a full pipe.
            std::thread::spawn(move || for _ in reader.lines() {});
            return (running, lines);
        }
    }
}

pub fn address_after(lines: &[String], marker: &str) -> SocketAddr {
    lines
        .iter()
        .find_map(|l| {
            let rest = &l[l.find(marker)? + marker.len()..];
            rest.split(|c: char| c.is_whitespace() || c == ';' || c == '/')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {marker:?} in {lines:?}"))
}

pub fn json_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Runs `payswitch load ARGS` (which must write its report with `--json json`) until
/// one request is approved — the switch's link to its acquirer is up — 15 s at most.
pub fn wait_until_approving(args: &[String], json: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = Command::new(BIN)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        let report: Value = serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
        if report["codes"]["00"].as_u64().unwrap_or(0) > 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{what} never approved: {report}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
