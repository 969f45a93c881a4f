//! `payswitch journal bench`: append throughput and latency of the journal with group
//! commit, as the switch uses it — many requests in flight, each appending its records and
//! waiting until they are durable.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use payswitch::journal::{FsyncPolicy, Journal, JournalConfig, Record, RecordKind};

use super::FsyncArg;

/// Arguments of `payswitch journal bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Directory to write in (a new journal is made in a fresh subdirectory, then removed).
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
    /// Concurrent appenders: requests in flight at once.
    #[arg(long, default_value_t = 64)]
    pub appenders: usize,
    /// Records per append (a request and its response: 2; with 3, a request, forwarded
    /// and response, as an authorization journals them).
    #[arg(long, default_value_t = 2)]
    pub records_per_append: usize,
    /// Write the journal to this (new or empty) directory and keep it, to measure what a
    /// start makes of it (`payswitch journal replay`).
    #[arg(long)]
    pub keep: Option<PathBuf>,
    /// How long to run.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Sync policy.
    #[arg(long, value_enum, default_value = "always")]
    pub fsync: FsyncArg,
    /// Group-commit window, microseconds.
    #[arg(long, default_value_t = 0)]
    pub group_commit_window_us: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What a bench run measured.
#[derive(Debug, Serialize)]
pub struct BenchReport {
    /// Sync policy.
    pub fsync: FsyncPolicy,
    /// Group-commit window, microseconds.
    pub group_commit_window_us: u64,
    /// Concurrent appenders.
    pub appenders: usize,
    /// Records appended per second.
    pub records_per_s: f64,
    /// Appends (waits for durability) per second.
    pub appends_per_s: f64,
    /// Records per group commit, on average.
    pub records_per_commit: f64,
    /// Time from append to durable, microseconds.
    pub append_p50_us: u64,
    /// 99th percentile of the same.
    pub append_p99_us: u64,
    /// 99.9th percentile of the same.
    pub append_p999_us: u64,
    /// Bytes per record, on average.
    pub bytes_per_record: f64,
}

/// The `k`-th record of append `i` of `per`: with three or more per append, a request, its
/// `forwarded` and its response; otherwise requests. Stamped `time_ms`.
fn sample_record(i: u64, k: usize, per: usize, time_ms: i64) -> Record {
    let kind = match (per >= 3, k) {
        (true, 1) => RecordKind::Forwarded,
        (true, 2) => RecordKind::Response,
        _ => RecordKind::Request,
    };
    let request_back = if per >= 3 { k.min(2) as u8 } else { 0 };
    Record {
        kind,
        time_ms,
        request_seq: 0,
        request_back,
        mti: "0100".into(),
        processing_code: "000000".into(),
        transmission_time: "1125123045".into(),
        stan: format!("{:06}", i % 1_000_000),
        rrn: format!("{i:012}"),
        terminal: "TERM0001".into(),
        merchant: "MERCHANT0000001".into(),
        pan_masked: "411111******1111".into(),
        pan_hash: u128::from(i) * 0x9E37_79B9_7F4A_7C15,
        amount_minor: 12_500,
        currency: 840,
        acquirer: "north".into(),
        link_stan: (i % 999_999) as u32 + 1,
        code: "00".into(),
        approval_code: "A1B2C3".into(),
        decision: "approve".into(),
        score: Some(0.0123),
        model: "forest-1a2b3c4d".into(),
        private_data: "decision=approve;score=0.0123;model=forest-1a2b3c4d;acquirer=north".into(),
        duplicate: false,
        switch_us: 40,
        acquirer_us: 700,
        attempt: 0,
        reversal_stan: 0,
        // The size of a 16-digit PAN sealed with a PAN key file (key id, nonce, digits and
        // tag), on the record a reversal is built from.
        pan_sealed: (kind == RecordKind::Forwarded).then(|| payswitch::journal::SealedPan {
            key: 1,
            nonce: [7; 12],
            data: vec![0x5a; 32],
        }),
        event_ms: time_ms,
        mcc: 5411,
        country: 840,
        pos_entry_mode: 51,
    }
}

/// Runs the bench.
pub async fn run(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    let temp = tempfile::Builder::new()
        .prefix("payswitch-journal-bench-")
        .tempdir_in(&args.dir)?;
    let dir = match &args.keep {
        Some(keep) => keep.clone(),
        None => temp.path().to_owned(),
    };
    let config = JournalConfig {
        dir,
        fsync: args.fsync.into(),
        group_commit_window_us: args.group_commit_window_us,
        ..JournalConfig::default()
    };
    let journal = Journal::start(&config, 1)?;
    let started = Instant::now();
    let end = started + args.duration;
    let mut tasks = Vec::new();
    for a in 0..args.appenders.max(1) {
        let journal = journal.clone();
        let per = args.records_per_append.max(1);
        tasks.push(tokio::spawn(async move {
            let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                .expect("static bounds are valid");
            let mut i = a as u64 * 1_000_000_000;
            while Instant::now() < end {
                let now_ms = payswitch::clock::now().unix_ms();
                let records: Vec<Record> = (0..per)
                    .map(|k| sample_record(i + (k as u64 * u64::from(per < 3)), k, per, now_ms))
                    .collect();
                i += per as u64;
                let t = Instant::now();
                if journal.append(&records).await.is_err() {
                    tokio::task::yield_now().await;
                    continue;
                }
                let _ = latency.record((t.elapsed().as_micros() as u64).max(1));
            }
            latency
        }));
    }
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for task in tasks {
        latency.add(task.await?)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let stats = Arc::clone(journal.stats());
    drop(journal);
    use std::sync::atomic::Ordering::Relaxed;
    let records = stats.records.load(Relaxed);
    let commits = stats.commits.load(Relaxed).max(1);
    Ok(BenchReport {
        fsync: args.fsync.into(),
        group_commit_window_us: args.group_commit_window_us,
        appenders: args.appenders,
        records_per_s: records as f64 / elapsed,
        appends_per_s: latency.len() as f64 / elapsed,
        records_per_commit: records as f64 / commits as f64,
        append_p50_us: latency.value_at_quantile(0.5),
        append_p99_us: latency.value_at_quantile(0.99),
        append_p999_us: latency.value_at_quantile(0.999),
        bytes_per_record: stats.bytes.load(Relaxed) as f64 / records.max(1) as f64,
    })
}

/// Runs the bench and prints its report.
pub async fn run_cli(args: BenchArgs) -> anyhow::Result<()> {
    let report = run(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "journal bench: fsync {:?}, window {} us, {} appenders x {} records: {:.0} records/s ({:.0} appends/s), {:.1} records per commit, {:.0} bytes per record; append→durable p50 {} us, p99 {} us, p99.9 {} us",
            report.fsync,
            report.group_commit_window_us,
            report.appenders,
            args.records_per_append,
            report.records_per_s,
            report.appends_per_s,
            report.records_per_commit,
            report.bytes_per_record,
            report.append_p50_us,
            report.append_p99_us,
            report.append_p999_us,
        );
    }
    Ok(())
}
