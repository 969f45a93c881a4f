//! The `payswitch journal verify|export` commands on journals written in process: round
//! trip across restarts and segments, a torn final record cut off, corruption refused,
//! export without a full PAN.

use std::path::Path;
use std::process::Command;

use payswitch::journal::{self, scan, Journal, RecordKind, ScanError};

#[path = "../../engine/tests/support/journal.rs"]
mod journal_support;

use journal_support::{config, frame_len, read_all, record, segments, write_requests};

const BIN: &str = env!("CARGO_BIN_EXE_payswitch");

fn verify(dir: &Path) -> (bool, String) {
    let output = Command::new(BIN)
        .args(["journal", "verify", dir.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

#[tokio::test]
async fn records_round_trip_across_restarts_and_segments() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    // Small segments: several per run.
    cfg.segment_bytes = 2_000;
    let mut written = Vec::new();
    for run in 0..3u32 {
        let next = scan(dir.path(), true, |_, _| {}).unwrap().next_seq();
        let journal = Journal::start(&cfg, next).unwrap();
        for i in 0..20u32 {
            let mut response = record(RecordKind::Response, run * 100 + i, "533012000001");
            response.code = "00".into();
            response.approval_code = "A1B2C3".into();
            response.score = Some(0.25);
            response.request_back = 1;
            let pair = [
                record(RecordKind::Request, run * 100 + i, "533012000001"),
                response,
            ];
            let first = journal.append(&pair).await.unwrap();
            written.push((first, pair[0].clone()));
            written.push((first + 1, pair[1].clone()));
        }
    }
    assert!(segments(dir.path()).len() > 3, "rotation happened");
    let read = read_all(dir.path());
    assert_eq!(read, written);
    assert_eq!(
        read[1].1.request_of(read[1].0),
        read[0].0,
        "request_back links to the request"
    );
    let (ok, text) = verify(dir.path());
    assert!(ok, "{text}");
    assert!(text.contains("120 records"), "{text}");
}

#[tokio::test]
async fn a_torn_final_record_is_reported_and_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let segment = write_requests(dir.path(), 5).await;
    let intact = (journal::segment::SEGMENT_HEADER + 5 * frame_len()) as u64;
    // A crash in the middle of the sixth write: half a frame on disk, over the zeroed
    // runway.
    let mut frame = Vec::new();
    journal::record::encode_frame(&record(RecordKind::Request, 6, "533012000001"), &mut frame)
        .unwrap();
    journal::record::seal_frame(&mut frame, 6);
    let mut bytes = std::fs::read(&segment).unwrap();
    let at = intact as usize;
    bytes[at..at + frame.len() / 2].copy_from_slice(&frame[..frame.len() / 2]);
    std::fs::write(&segment, &bytes).unwrap();

    let report = scan(dir.path(), false, |_, _| {}).unwrap();
    assert_eq!(report.records, 5);
    let torn = report.torn_tail.unwrap();
    assert_eq!(torn.offset as u64, intact);
    assert!(!torn.truncated);
    assert_eq!(torn.bytes, frame.len() / 2);

    let (ok, text) = verify(dir.path());
    assert!(
        ok,
        "a torn tail is cut off and the journal is intact: {text}"
    );
    assert!(text.contains("torn final record"), "{text}");
    assert_eq!(
        std::fs::metadata(&segment).unwrap().len(),
        intact,
        "cut at the last intact record"
    );
    // Appending goes on after the cut, with no gap in the sequence.
    let next = scan(dir.path(), true, |_, _| {}).unwrap().next_seq();
    assert_eq!(next, 6);
    let journal = Journal::start(&config(dir.path()), next).unwrap();
    assert_eq!(
        journal
            .append(&[record(RecordKind::Request, 6, "533012000001")])
            .await
            .unwrap(),
        6
    );
    drop(journal);
    assert_eq!(read_all(dir.path()).len(), 6);
}

#[tokio::test]
async fn a_corrupt_record_in_the_middle_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let segment = write_requests(dir.path(), 10).await;
    let mut bytes = std::fs::read(&segment).unwrap();
    // One bit flipped in the fourth record's body (every record here is the same size).
    let frame_len = frame_len();
    let at = journal::segment::SEGMENT_HEADER + 3 * frame_len + frame_len / 2;
    bytes[at] ^= 0x10;
    std::fs::write(&segment, &bytes).unwrap();

    let error = scan(dir.path(), true, |_, _| {}).unwrap_err();
    assert!(
        matches!(error, ScanError::Corrupt { offset, .. } if offset == journal::segment::SEGMENT_HEADER + 3 * frame_len),
        "{error}"
    );
    assert_eq!(
        std::fs::read(&segment).unwrap(),
        bytes,
        "nothing is cut when the damage is not at the tail"
    );
    let (ok, text) = verify(dir.path());
    assert!(!ok, "{text}");
    assert!(text.contains("corrupt record"), "{text}");
}

#[tokio::test]
async fn export_writes_jsonl_and_csv_without_a_full_pan() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::start(&config(dir.path()), 1).unwrap();
    let mut response = record(RecordKind::Response, 1, "533012000001");
    response.request_back = 1;
    response.code = "00".into();
    response.approval_code = "A1B2C3".into();
    response.decision = "approve".into();
    response.score = Some(0.5);
    response.acquirer = "north".into();
    journal
        .append(&[record(RecordKind::Request, 1, "533012000001"), response])
        .await
        .unwrap();
    drop(journal);
    let jsonl = Command::new(BIN)
        .args(["journal", "export", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(jsonl.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8(jsonl.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    let r = &lines[1];
    for (key, value) in [
        ("seq", serde_json::json!(2)),
        ("kind", "response".into()),
        ("mti", "0100".into()),
        ("terminal", "TERM0001".into()),
        ("stan", "000001".into()),
        ("rrn", "533012000001".into()),
        ("pan_masked", "411111******1111".into()),
        ("amount_minor", 12_500.into()),
        ("acquirer", "north".into()),
        ("code", "00".into()),
        ("approval_code", "A1B2C3".into()),
        ("decision", "approve".into()),
        ("score", 0.5.into()),
        ("request_seq", 1.into()),
    ] {
        assert_eq!(r[key], value, "{key} in {r}");
    }
    assert!(lines[0]["code"].is_null());
    let csv = Command::new(BIN)
        .args([
            "journal",
            "export",
            dir.path().to_str().unwrap(),
            "--format",
            "csv",
        ])
        .output()
        .unwrap();
    assert!(csv.status.success());
    let text = String::from_utf8(csv.stdout).unwrap();
    let mut rows = text.lines();
    let header = rows.next().unwrap();
    assert!(
        header.starts_with("seq,kind,time_ms,request_seq,mti"),
        "{header}"
    );
    assert_eq!(rows.count(), 2);
    assert!(!text.contains("4111111111111111"));
}
