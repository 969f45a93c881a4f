//! Nothing lost, nothing doubled: `kill -9` of the switch under load, five times, with a
//! gateway that retransmits what went unanswered, checked against three sets of books —
//! the load generator's record, the acquirer simulator's ledger, and the switch's journal.
//! All separate processes on loopback.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{address_after, json_lines, spawn, Running, BIN};

struct Books {
    dir: PathBuf,
}

impl Books {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn journal(&self) -> PathBuf {
        self.path("journal")
    }

    fn record(&self) -> PathBuf {
        self.path("record.jsonl")
    }
}

fn export(journal: &Path) -> Vec<Value> {
    let output = Command::new(BIN)
        .args(["journal", "export", journal.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn start_switch(listen: &str, acquirer: &str, books: &Books) -> (Running, SocketAddr) {
    let (switch, lines) = spawn(
        &[
            "serve",
            "--listen",
            listen,
            "--acquirer",
            acquirer,
            "--acquirer-timeout-ms",
            "1000",
            "--shards",
            "2",
            "--journal",
            books.journal().to_str().unwrap(),
        ],
        "acquirer acquirer-1",
    );
    (switch, address_after(&lines, "QUIC (ALPN iso8583) on "))
}

fn load_args(target: SocketAddr, books: &Books, rate: &str, duration: &str) -> Vec<String> {
    [
        "load",
        "--target",
        &target.to_string(),
        "--rate",
        rate,
        "--duration",
        duration,
        "--connections",
        "2",
        "--timeout",
        "1s",
        "--retransmit-for",
        "30s",
        "--record",
        books.record().to_str().unwrap(),
        "--quiet",
    ]
    .map(String::from)
    .to_vec()
}

/// Small loads until one is approved: the switch's link to the acquirer is up.
fn wait_until_approving(target: SocketAddr, books: &Books) {
    let json = books.path("probe.json");
    let mut args = load_args(target, books, "20", "100ms");
    args.extend(["--json".into(), json.to_str().unwrap().into()]);
    common::wait_until_approving(&args, &json, "the switch");
}

#[test]
fn kill_9_under_load_five_times_loses_nothing_and_authorizes_nothing_twice() {
    let books = Books {
        dir: tempfile::tempdir().unwrap().keep(),
    };
    let ledger = books.path("ledger.jsonl");
    // Answers take 20-60 ms, so a kill always finds authorizations out at the acquirer.
    let (sim, sim_lines) = spawn(
        &[
            "acquirer-sim",
            "--listen",
            "127.0.0.1:0",
            "--approval-rate",
            "0.9",
            "--latency-us-median",
            "30000",
            "--latency-us-max",
            "60000",
            "--ledger",
            ledger.to_str().unwrap(),
        ],
        "listening on",
    );
    let acquirer = address_after(&sim_lines, "QUIC ").to_string();
    let (mut switch, target) = start_switch("127.0.0.1:0", &acquirer, &books);
    wait_until_approving(target, &books);

    let mut retransmissions = 0;
    for round in 0..5u64 {
        let json = books.path(&format!("load-{round}.json"));
        let mut args = load_args(target, &books, "300", "3s");
        args.extend(["--json".into(), json.to_str().unwrap().into()]);
        let load = Running(
            Command::new(BIN)
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        std::thread::sleep(Duration::from_millis(600 + 350 * round));
        switch.kill_9();
        // Back at once on the same port, from the same journal; the load's
        // retransmissions find it there.
        (switch, _) = start_switch(&target.to_string(), &acquirer, &books);
        let mut load = load;
        let status = load.0.wait().unwrap();
        assert!(status.success(), "round {round}: load failed");
        let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        assert_eq!(
            report["errors"], 0,
            "round {round}: every request answered in the end: {report}"
        );
        retransmissions += report["retransmissions"].as_u64().unwrap();
    }
    assert!(retransmissions > 0, "the kills left requests unanswered");

    // Every reversal the switch owes is delivered and acknowledged.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let records = export(&books.journal());
        let of = |kind: &str| -> HashSet<u64> {
            records
                .iter()
                .filter(|r| r["kind"] == kind)
                .map(|r| r["request_seq"].as_u64().unwrap())
                .collect()
        };
        let (queued, acked) = (of("reversal_queued"), of("reversal_ack"));
        if queued.is_subset(&acked) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "reversals not acknowledged: {:?}",
            queued.difference(&acked).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    switch.terminate();
    sim.terminate();

    let verify = Command::new(BIN)
        .args(["journal", "verify", books.journal().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );

    let journal = export(&books.journal());
    let record = json_lines(&books.record());
    let ledger = json_lines(&ledger);
    let s = |v: &Value, k: &str| v[k].as_str().unwrap_or("").to_string();

    // 1. Every answer the gateway recorded is in the journal with the same code, and no
    //    request has two different outcomes there.
    let mut journaled: HashMap<(String, String, String), HashSet<String>> = HashMap::new();
    for r in journal.iter().filter(|r| r["kind"] == "response") {
        journaled
            .entry((s(r, "terminal"), s(r, "stan"), s(r, "rrn")))
            .or_default()
            .insert(s(r, "code"));
    }
    for line in &record {
        let key = (s(line, "terminal"), s(line, "stan"), s(line, "rrn"));
        let codes = journaled
            .get(&key)
            .unwrap_or_else(|| panic!("recorded answer not in the journal: {line}"));
        assert!(
            codes.contains(&s(line, "code")),
            "{line} vs journal {codes:?}"
        );
        assert_eq!(codes.len(), 1, "two outcomes for {key:?}: {codes:?}");
    }

    // 2. Nothing reached the acquirer twice, so nothing was approved twice.
    let mut authorizations: HashMap<String, &Value> = HashMap::new();
    for line in ledger.iter().filter(|l| l["mti"] == "0100") {
        let previous = authorizations.insert(s(line, "rrn"), line);
        assert!(
            previous.is_none(),
            "RRN {} reached the acquirer twice",
            s(line, "rrn")
        );
    }

    // 3. Every approval the gateway did not get as an approval is reversed at the
    //    acquirer (field 90 naming the STAN the acquirer saw) and acknowledged in the
    //    journal; no approval the gateway got is reversed.
    let delivered: HashMap<String, String> =
        record.iter().map(|l| (s(l, "rrn"), s(l, "code"))).collect();
    // A retry is a repeat (0401) of the reversal, never a new 0400, across restarts too.
    let mut first_sends: HashMap<String, usize> = HashMap::new();
    for line in ledger.iter().filter(|l| l["mti"] == "0400") {
        *first_sends.entry(s(line, "rrn")).or_default() += 1;
    }
    for (rrn, sends) in &first_sends {
        assert_eq!(
            *sends, 1,
            "RRN {rrn}: {sends} new reversals (0400) instead of repeats"
        );
    }
    let reversed: HashMap<String, &Value> = ledger
        .iter()
        .filter(|l| (l["mti"] == "0400" || l["mti"] == "0401") && l["code"] == "00")
        .map(|l| (s(l, "rrn"), l))
        .collect();
    let acknowledged: HashSet<String> = journal
        .iter()
        .filter(|r| r["kind"] == "reversal_ack")
        .map(|r| s(r, "rrn"))
        .collect();
    let mut owed = 0;
    for (rrn, line) in &authorizations {
        if line["code"] != "00" || delivered.get(rrn).map(String::as_str) == Some("00") {
            continue;
        }
        owed += 1;
        let reversal = reversed
            .get(rrn)
            .unwrap_or_else(|| panic!("approval {line} neither delivered nor reversed"));
        assert_eq!(
            &s(reversal, "original")[4..10],
            s(line, "stan"),
            "field 90 names the original as the acquirer saw it"
        );
        assert!(
            acknowledged.contains(rrn),
            "reversal of {rrn} not acknowledged"
        );
    }
    for rrn in reversed.keys() {
        assert_ne!(
            delivered.get(rrn).map(String::as_str),
            Some("00"),
            "RRN {rrn} reversed although the gateway was told it was approved"
        );
    }
    eprintln!(
        "books: {} answers recorded ({retransmissions} retransmissions), {} authorizations and {} reversals at the acquirer, {owed} approvals owed a reversal, {} journal records",
        record.len(),
        authorizations.len(),
        reversed.len(),
        journal.len()
    );
    assert!(
        owed > 0,
        "the kills left approvals in doubt (else this test proves little)"
    );
    // No full PAN in any of the books: no run of 13 or more digits (a PAN's shortest) in
    // any value but those that are long numbers by nature — field 90 (42 digits), the
    // journal's hex PAN hash and the millisecond times (journal, load record).
    let long_digit_run = |text: &str| {
        text.split(|c: char| !c.is_ascii_digit())
            .any(|run| run.len() >= 13)
    };
    for line in record.iter().chain(&ledger).chain(&journal) {
        for (key, value) in line.as_object().unwrap() {
            if ["original", "pan_hash", "time_ms", "intended_ms"].contains(&key.as_str()) {
                continue;
            }
            let text = value.to_string();
            assert!(!long_digit_run(&text), "{key}: {text}");
        }
    }
    for r in &journal {
        let masked = s(r, "pan_masked");
        assert!(masked.contains("******"), "{masked}");
    }
}
