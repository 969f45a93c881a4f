//! `payswitch journal verify|export|bench`: the journal's tools over `payswitch::journal`.

pub mod bench;

use std::io;

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
        dir: std::path::PathBuf,
        /// Report a torn tail without cutting it off.
        #[arg(long)]
        dry_run: bool,
    },
    /// Measure append throughput and latency with group commit.
    Bench(bench::BenchArgs),
    /// Write every record as JSON lines or CSV to standard output.
    Export {
        /// The journal directory.
        dir: std::path::PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value = "jsonl")]
        format: ExportFormatArg,
    },
}

/// Runs a `journal` subcommand.
pub fn run(command: JournalCommand) -> anyhow::Result<()> {
    match command {
        JournalCommand::Verify { dir, dry_run } => {
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
        JournalCommand::Export { dir, format } => {
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
