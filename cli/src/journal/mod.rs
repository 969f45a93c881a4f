//! `payswitch journal verify|export|bench`: the journal's tools over `payswitch::journal`.

pub mod bench;

use std::io;

use anyhow::Context;

use payswitch::journal::{self, ExportFormat, FsyncPolicy};

/// `--fsync` values: when journal records reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FsyncArg {
    /// `fdatasync` after every group commit, before any of its callers is answered:
    /// nothing answered is lost, even on a power failure.
    Always,
    /// Written to the operating system only: survives a crash of the switch, not of the
    /// machine. For tests and for measuring what the sync costs.
    Never,
}

impl From<FsyncArg> for FsyncPolicy {
    fn from(arg: FsyncArg) -> FsyncPolicy {
        match arg {
            FsyncArg::Always => FsyncPolicy::Always,
            FsyncArg::Never => FsyncPolicy::Never,
        }
    }
}

/// `journal export --format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormatArg {
    /// One JSON object per line.
    Jsonl,
    /// CSV with a header.
    Csv,
}

impl From<ExportFormatArg> for ExportFormat {
    fn from(arg: ExportFormatArg) -> ExportFormat {
        match arg {
            ExportFormatArg::Jsonl => ExportFormat::Jsonl,
            ExportFormatArg::Csv => ExportFormat::Csv,
        }
    }
}

/// `payswitch journal …`.
#[derive(Debug, clap::Subcommand)]
pub enum JournalCommand {
    /// Check every record's checksum and the sequence; cut off a torn final record (a
    /// crash mid-write). Exit 0 only when the journal is intact (after such a cut).
    Verify {
        /// The journal directory.
        #[arg(required_unless_present = "config")]
        dir: Option<std::path::PathBuf>,
        /// Report a torn tail without cutting it off.
        #[arg(long)]
        dry_run: bool,
        /// Check the journal stream of this configuration's `[cluster]` instead of a
        /// directory: every frame's checksum, and each node's sequence (missing records
        /// are groups the stream never acknowledged, answered 91).
        #[arg(long, conflicts_with = "dir")]
        config: Option<std::path::PathBuf>,
        /// With `--config`: this node's records only.
        #[arg(long, requires = "config")]
        node: Option<String>,
    },
    /// Measure append throughput and latency with group commit.
    Bench(bench::BenchArgs),
    /// Add a new random key to a PAN key file (`journal.pan_key_file`; created readable by
    /// its owner only): from the next start it seals new PANs, the older keys still open
    /// what they sealed. Keep the file outside the journal directory.
    NewPanKey {
        /// The key file.
        file: std::path::PathBuf,
    },
    /// Replay the journal as a start would, without starting: what is in doubt, what is
    /// owed, how many requests the duplicate window gets back, the time it took and the
    /// peak memory.
    Replay {
        /// The journal directory.
        dir: std::path::PathBuf,
        /// `journal.duplicate_window_s`.
        #[arg(long, default_value_t = 600)]
        window_s: u64,
        /// `journal.max_duplicates`.
        #[arg(long, default_value_t = 500_000)]
        max_duplicates: usize,
        /// The configured acquirers' names.
        #[arg(long = "acquirer", default_value = "north")]
        acquirers: Vec<String>,
        /// Leave the velocity state out (what a start cost before it was rebuilt).
        #[arg(long)]
        no_velocity: bool,
    },
    /// Write every record as JSON lines or CSV to standard output.
    Export {
        /// The journal directory.
        #[arg(required_unless_present = "config")]
        dir: Option<std::path::PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value = "jsonl")]
        format: ExportFormatArg,
        /// Export the journal stream of this configuration's `[cluster]` instead of a
        /// directory, in stream order, each record with its `node` (JSON lines only).
        #[arg(long, conflicts_with = "dir")]
        config: Option<std::path::PathBuf>,
        /// With `--config`: this node's records only.
        #[arg(long, requires = "config")]
        node: Option<String>,
    },
}

/// Runs a `journal` subcommand.
pub fn run(command: JournalCommand) -> anyhow::Result<()> {
    match command {
        JournalCommand::Replay {
            dir,
            window_s,
            max_duplicates,
            acquirers,
            no_velocity,
        } => {
            anyhow::ensure!(dir.is_dir(), "{}: no such directory", dir.display());
            let started = std::time::Instant::now();
            let window_ms = i64::try_from(window_s.saturating_mul(1000)).unwrap_or(i64::MAX);
            let since = payswitch::clock::now().unix_ms().saturating_sub(window_ms);
            // The velocity state a start rebuilds too, with the default scoring bounds and
            // one shard per core, as `serve` would have.
            let defaults = payswitch::config::ScoringConfig::default();
            let shards = std::thread::available_parallelism().map_or(1, |n| n.get());
            let rules = std::sync::Arc::new(payswitch::scoring::rules::RuleSet::load(
                None,
                payswitch::scoring::rule_variables(),
            )?);
            let scoring = std::sync::Arc::new(payswitch::scoring::Scoring::new(
                rules,
                std::time::Duration::from_micros(defaults.budget_us),
                defaults.event_time,
                defaults.max_entities,
            ));
            let now_ms = payswitch::clock::now().unix_ms();
            let velocity = payswitch::recovery::VelocityReplay::new(
                scoring,
                shards,
                defaults.max_cards / shards,
                now_ms.saturating_sub(payswitch::recovery::VELOCITY_REPLAY_MS),
            );
            let recovery = payswitch::recovery::recover(
                &dir,
                &acquirers,
                since,
                max_duplicates,
                (!no_velocity).then_some(velocity),
            )?;
            let elapsed = started.elapsed();
            let velocity_fed = recovery.velocity.as_ref().map_or(0, |v| v.fed);
            println!(
                "replayed {} records in {:.2} s: {} in doubt, {} reversals owed, {} requests remembered, {} beyond max_duplicates, {} requests replayed into velocity; peak RSS {} MiB",
                recovery.report.records,
                elapsed.as_secs_f64(),
                recovery.in_doubt.len(),
                recovery.pending.len(),
                recovery.recent.len(),
                recovery.dropped_over_capacity,
                velocity_fed,
                peak_rss_kib().map_or_else(|| "?".to_string(), |k| (k / 1024).to_string()),
            );
            Ok(())
        }
        JournalCommand::NewPanKey { file } => {
            let id = payswitch::journal::vault::add_key(&file)
                .with_context(|| format!("adding a key to {}", file.display()))?;
            println!(
                "key {id} added to {}: it seals PANs from the next start",
                file.display()
            );
            Ok(())
        }
        JournalCommand::Verify {
            config: Some(config),
            node,
            ..
        } => {
            let report = read_stream(&config, node.as_deref(), |_, _, _| Ok(()))?;
            let mut gaps = 0;
            for (name, range) in &report.nodes {
                println!(
                    "node {name}: {} records, sequence {}..={}, {} missing, {} repeated",
                    range.records, range.first_seq, range.last_seq, range.missing, range.repeated
                );
                gaps += range.missing;
            }
            println!(
                "journal stream intact: {} records in {} messages, every checksum right{}",
                report.records,
                report.messages,
                if gaps > 0 {
                    "; the missing records were never acknowledged (answered 91) and are in their node's segments"
                } else {
                    ""
                }
            );
            Ok(())
        }
        JournalCommand::Verify { dir, dry_run, .. } => {
            let dir = dir.context("a journal directory, or --config")?;
            anyhow::ensure!(dir.is_dir(), "{}: no such directory", dir.display());
            let report = journal::scan(&dir, !dry_run, |_, _| {})?;
            if let Some(torn) = &report.torn_tail {
                eprintln!(
                    "torn final record: {} bytes at byte {} of {} ({})",
                    torn.bytes,
                    torn.offset,
                    torn.path.display(),
                    if torn.truncated {
                        "cut off"
                    } else {
                        "left in place: --dry-run"
                    }
                );
            }
            println!(
                "journal intact: {} records in {} segments, sequence {}..={}",
                report.records,
                report.segments,
                report.first_seq.unwrap_or(0),
                report.last_seq.unwrap_or(0),
            );
            anyhow::ensure!(
                report.torn_tail.as_ref().is_none_or(|t| t.truncated),
                "torn final record not cut off (--dry-run)"
            );
            Ok(())
        }
        JournalCommand::Bench(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(bench::run_cli(args)),
        JournalCommand::Export {
            config: Some(config),
            node,
            format,
            ..
        } => {
            anyhow::ensure!(
                matches!(format, ExportFormatArg::Jsonl),
                "the journal stream is exported as JSON lines (--format jsonl)"
            );
            let mut out = io::BufWriter::new(io::stdout().lock());
            read_stream(&config, node.as_deref(), |node, seq, record| {
                let line = serde_json::json!({
                    "node": node,
                    "record": journal::Exported::of(seq, record),
                });
                serde_json::to_writer(&mut out, &line)?;
                io::Write::write_all(&mut out, b"\n")?;
                Ok(())
            })?;
            io::Write::flush(&mut out)?;
            Ok(())
        }
        JournalCommand::Export { dir, format, .. } => {
            let dir = dir.context("a journal directory, or --config")?;
            anyhow::ensure!(dir.is_dir(), "{}: no such directory", dir.display());
            let report = journal::export(&dir, format.into(), io::stdout().lock())?;
            if let Some(torn) = &report.torn_tail {
                eprintln!(
                    "warning: torn final record in {} left out ({} bytes)",
                    torn.path.display(),
                    torn.bytes
                );
            }
            Ok(())
        }
    }
}

/// The process's peak resident memory, KiB (Linux `VmHWM`).
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Reads the journal stream of `config`'s `[cluster]`, handing each record to `each`;
/// the first error `each` returns stops the export.
fn read_stream(
    config: &std::path::Path,
    node: Option<&str>,
    mut each: impl FnMut(&str, u64, &journal::Record) -> anyhow::Result<()>,
) -> anyhow::Result<payswitch::cluster::StreamReport> {
    // Only `[cluster]` is read: a node's file completed by `serve` flags will do.
    let config = payswitch::config::Config::read_file(config)?;
    let cluster = config
        .cluster
        .context("the configuration has no [cluster]: no journal stream to read")?;
    cluster.check().map_err(anyhow::Error::msg)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut failure = None;
    let report = runtime.block_on(payswitch::cluster::read_journal(
        &cluster,
        node,
        |node, seq, record| {
            if failure.is_none() {
                failure = each(node, seq, &record).err();
            }
        },
    ))?;
    match failure {
        Some(e) => Err(e),
        None => Ok(report),
    }
}
