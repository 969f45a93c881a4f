//! The journal fixtures that the in-process journal tests (`engine/tests/journal.rs`) and
//! the `payswitch journal` command tests (`cli/tests/journal_cli.rs`) share.

use std::path::Path;

use payswitch::journal::{self, scan, FsyncPolicy, Journal, JournalConfig, Record, RecordKind};

pub fn config(dir: &Path) -> JournalConfig {
    JournalConfig {
        dir: dir.to_owned(),
        fsync: FsyncPolicy::Always,
        ..JournalConfig::default()
    }
}

pub fn record(kind: RecordKind, stan: u32, rrn: &str) -> Record {
    Record {
        kind,
        time_ms: 1_764_000_000_000,
        mti: "0100".into(),
        processing_code: "000000".into(),
        transmission_time: "1125123045".into(),
        stan: format!("{stan:06}"),
        rrn: rrn.into(),
        terminal: "TERM0001".into(),
        merchant: "MERCHANT0000001".into(),
        pan_masked: "411111******1111".into(),
        pan_hash: 7,
        amount_minor: 12_500,
        currency: 840,
        ..Record::default()
    }
}

/// Bytes of one frame of `record(kind, stan, rrn)` (the same for every STAN and kind here:
/// fixed-width fields).
pub fn frame_len() -> usize {
    let mut frame = Vec::new();
    journal::record::encode_frame(&record(RecordKind::Request, 1, "533012000001"), &mut frame)
        .unwrap();
    frame.len()
}

/// A new journal in `dir` with `n` request records, one append each; its segment.
pub async fn write_requests(dir: &Path, n: u32) -> std::path::PathBuf {
    let journal = Journal::start(&config(dir), 1).unwrap();
    for i in 0..n {
        journal
            .append(&[record(RecordKind::Request, i, "533012000001")])
            .await
            .unwrap();
    }
    drop(journal);
    segments(dir).pop().unwrap()
}

pub fn read_all(dir: &Path) -> Vec<(u64, Record)> {
    let mut out = Vec::new();
    scan(dir, false, |seq, r| out.push((seq, r))).unwrap();
    out
}

pub fn segments(dir: &Path) -> Vec<std::path::PathBuf> {
    journal::segment::list_segments(dir)
        .unwrap()
        .into_iter()
        .map(|(_, p)| p)
        .collect()
}
