//! `payswitch gen-data`: a labeled workload, deterministic by seed.
//!
//! A population is drawn first — cards with a home country, currency and spending habits,
//! merchants with an MCC, a country and a risk, terminals of each merchant — then events:
//! legitimate purchases that follow each card's habits (daytime-heavy, home country, usual
//! MCCs, chip mostly), and fraud bursts of four labeled scenarios (`card_testing`,
//! `account_takeover`, `stolen_card`, `compromised_terminal`). Events are kept compact
//! (about 48 bytes each), sorted by time, and written in chunks through
//! [`payswitch_models::data::write_all`], so the file's header and column order are the
//! models crate's contract, and a million rows take tens of MiB, not hundreds.

mod population;
mod scenarios;

use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::{ensure, Context};
use payswitch_models::data::{parse_rfc3339_utc_ms, write_all, LabeledTransaction};
use payswitch_protocol::time::UtcDateTime;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub use population::{Population, COUNTRIES};
pub use scenarios::Scenario;

/// Arguments of `payswitch gen-data`.
#[derive(clap::Args, Debug, Clone)]
pub struct GenDataArgs {
    /// Rows to write.
    #[arg(long)]
    pub count: u64,
    /// Seed: the same seed and arguments give the same file, byte for byte.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The CSV file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Share of rows that are fraud (0 to 0.5).
    #[arg(long, default_value_t = DEFAULT_FRAUD_RATE)]
    pub fraud_rate: f64,
    /// First instant of the data, RFC 3339 UTC.
    #[arg(long, default_value = DEFAULT_START)]
    pub start: String,
}

/// Default share of fraud rows: card fraud runs at a fraction of a percent of transactions.
pub const DEFAULT_FRAUD_RATE: f64 = 0.005;
/// Default first instant of the data.
pub const DEFAULT_START: &str = "2026-11-01T00:00:00Z";
/// Most rows: events are held compactly (about 48 bytes) to be sorted by time, so ten
/// million take about 500 MiB; larger sets are better made as several seeds.
pub const MAX_COUNT: u64 = 10_000_000;
/// Highest fraud rate accepted: above half, "fraud" is the normal traffic.
pub const MAX_FRAUD_RATE: f64 = 0.5;
/// Rows turned into [`LabeledTransaction`]s and written at a time: bounds the full-text rows
/// in memory while keeping write calls large.
const WRITE_CHUNK_ROWS: usize = 65_536;

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenConfig {
    /// Rows.
    pub count: u64,
    /// Seed.
    pub seed: u64,
    /// Share of fraud rows.
    pub fraud_rate: f64,
    /// First instant, Unix milliseconds.
    pub start_ms: i64,
}

impl GenConfig {
    /// `count` rows from `seed` with the default fraud rate and start.
    pub fn new(count: u64, seed: u64) -> GenConfig {
        GenConfig {
            count,
            seed,
            fraud_rate: DEFAULT_FRAUD_RATE,
            start_ms: parse_rfc3339_utc_ms(DEFAULT_START).expect("the default start parses"),
        }
    }

    fn check(&self) -> anyhow::Result<()> {
        ensure!(
            (1..=MAX_COUNT).contains(&self.count),
            "count must be 1 to {MAX_COUNT}"
        );
        ensure!(
            (0.0..=MAX_FRAUD_RATE).contains(&self.fraud_rate),
            "fraud rate must be 0 to {MAX_FRAUD_RATE}"
        );
        ensure!(self.start_ms >= 0, "start must be after 1970");
        Ok(())
    }
}

/// One generated transaction, compact: indices into the population instead of strings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Event {
    pub(crate) time_ms: i64,
    pub(crate) amount_minor: u64,
    pub(crate) card: u32,
    pub(crate) terminal: u32,
    pub(crate) pos_entry_mode: u16,
    pub(crate) scenario: Option<Scenario>,
}

/// Generates the events of `config`, sorted by time, and the population they refer to.
pub fn generate_events(config: &GenConfig) -> anyhow::Result<(Population, Vec<EventRow>)> {
    config.check()?;
    let mut rng = StdRng::seed_from_u64(config.seed);
    let population = Population::new(config.count, &mut rng);
    let span_ms = population.span_ms(config.count);
    let fraud_target = (config.count as f64 * config.fraud_rate).round() as u64;
    let capacity = usize::try_from(config.count).context("count does not fit memory")?;
    let mut events = Vec::with_capacity(capacity);
    scenarios::fraud(
        &population,
        config.start_ms,
        span_ms,
        fraud_target,
        &mut rng,
        &mut events,
    );
    let legit = config.count - events.len() as u64;
    for _ in 0..legit {
        let event = population.legit_event(config.start_ms, span_ms, &mut rng);
        events.push(event);
    }
    // Stable: events at the same millisecond keep their generation order, so the output is
    // a function of the seed alone.
    events.sort_by_key(|e| e.time_ms);
    Ok((population, events.into_iter().map(EventRow).collect()))
}

/// A generated event; turn it into a row with [`Population::row`].
#[derive(Debug, Clone, Copy)]
pub struct EventRow(pub(crate) Event);

impl EventRow {
    /// Whether this event is fraud.
    pub fn is_fraud(&self) -> bool {
        self.0.scenario.is_some()
    }
}

/// Generates `config`'s rows and writes them as a labeled CSV file to `output`.
pub fn write_workload<W: Write>(config: &GenConfig, mut output: W) -> anyhow::Result<()> {
    let (population, events) = generate_events(config)?;
    let mut text = Vec::new();
    for (i, chunk) in events.chunks(WRITE_CHUNK_ROWS).enumerate() {
        let rows: Vec<LabeledTransaction> = chunk.iter().map(|e| population.row(e)).collect();
        text.clear();
        write_all(&mut text, &rows)?;
        // write_all always starts with the header; later chunks continue the same file, so
        // their header line is dropped.
        let body = match i {
            0 => &text[..],
            _ => skip_first_line(&text),
        };
        output.write_all(body)?;
    }
    if events.is_empty() {
        write_all(&mut output, &[])?;
    }
    output.flush()?;
    Ok(())
}

fn skip_first_line(text: &[u8]) -> &[u8] {
    match text.iter().position(|&b| b == b'\n') {
        Some(end) => &text[end + 1..],
        None => &[],
    }
}

/// Generates `config`'s rows in memory (tests and small sets).
pub fn generate(config: &GenConfig) -> anyhow::Result<Vec<LabeledTransaction>> {
    let (population, events) = generate_events(config)?;
    Ok(events.iter().map(|e| population.row(e)).collect())
}

/// Writes a labeled workload file.
pub fn run(args: GenDataArgs) -> anyhow::Result<()> {
    let start_ms = parse_rfc3339_utc_ms(&args.start)
        .with_context(|| format!("--start {:?} is not RFC 3339 UTC", args.start))?;
    let config = GenConfig {
        count: args.count,
        seed: args.seed,
        fraud_rate: args.fraud_rate,
        start_ms,
    };
    let file = std::fs::File::create(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    write_workload(&config, BufWriter::new(file))
        .with_context(|| format!("writing {}", args.out.display()))?;
    Ok(())
}

/// `ms` Unix milliseconds as RFC 3339 UTC with milliseconds: `2026-11-01T08:15:02.250Z`.
pub fn rfc3339_ms(ms: i64) -> String {
    let ms = ms.max(0) as u64;
    let t = UtcDateTime::from_unix_seconds(ms / 1000);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        t.month(),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        ms % 1000
    )
}

/// A uniform draw in `0..n` for a non-empty range given as `u32`.
pub(crate) fn pick(rng: &mut impl Rng, n: usize) -> u32 {
    rng.gen_range(0..n) as u32
}

#[cfg(test)]
mod tests;
