//! The open-loop load generator: `payswitch load`.
//!
//! Open loop: request `i` of the run has an intended send time `t0 + i / rate`, fixed
//! before the run starts, whatever the target does. Requests are dealt round-robin over the
//! connections. A sender that falls behind sends at once but keeps the intended time, and
//! latency is measured from it — so a target that stalls shows the stall in its
//! percentiles instead of slowing the load down (no coordinated omission). The sender wakes
//! one timer tick early so the timer's own lag is not counted as the target's.
//!
//! Three ways to carry requests ([`Mode`]): a QUIC stream per transaction, one long-lived
//! QUIC stream per connection with pipelining, or pipelining over plain TCP. Pipelined
//! responses come back in completion order and are matched by terminal (41) + STAN (11).
//! Everything is bounded: outstanding requests per connection (beyond the cap a request is
//! an error, not a queue entry) and the time each request may take.
//!
//! With `--data FILE` the requests are the rows of a labeled file ([`payswitch_models::data`])
//! in file order, request `i` being row `i`; the run ends at the end of the file or after
//! `rate × duration` rows, whichever comes first. Each request carries its row's label to
//! its response, and the report adds fraud caught (59 on fraud rows) and legitimate
//! declined (59 on legitimate rows).

mod data;
mod report;

use std::collections::HashMap;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{ensure, Context};
use bytes::BytesMut;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use payswitch_net::framed::write_message;
use payswitch_net::{codes, quic, ClientTrust, FrameReader};
use payswitch_protocol::time::UtcDateTime;
use payswitch_protocol::{fields, Message, Stan, DEFAULT_MAX_FRAME};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio::time::Instant;

use data::{DataSet, Label};
pub use data::{MAX_DATA_BYTES, MAX_SCENARIOS};
use report::{DataFacts, Failure, RunFacts, Tally};
pub use report::{LabelReport, Report};

use crate::cards::{
    authorization, sample_amount_minor, CardPool, RrnGenerator, StanCounter, Terminal, DEFAULT_BINS,
};

/// Command-line arguments of `payswitch load`.
#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// Address of the switch (or an acquirer simulator): HOST:PORT. Several, separated by
    /// commas, are the nodes of a cluster: connections are spread over them, and with
    /// `--retransmit-for` a request that goes unanswered is sent again to the next node,
    /// as a gateway fails over when its node vanishes.
    #[arg(long, default_value = "127.0.0.1:8583")]
    pub target: String,
    /// Offered load, transactions per second, over all connections.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// How long to offer load ("10s", "1m30s").
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Connections to spread the load over.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Pipeline on one long-lived QUIC stream per connection instead of a stream per
    /// transaction.
    #[arg(long)]
    pub pipelined: bool,
    /// Plain TCP (always pipelined) instead of QUIC.
    #[arg(long)]
    pub tcp: bool,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Cards in the synthetic card pool.
    #[arg(long, default_value_t = 10_000)]
    pub cards: usize,
    /// Seed of the workload (cards, amounts, terminals).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// PEM file of the CA (or self-signed certificate) to trust; without it any server
    /// certificate is accepted.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Name the server certificate must carry.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// Terminals sending (at least one per connection).
    #[arg(long, default_value_t = 100)]
    pub terminals: usize,
    /// BINs of the card pool, comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_BINS.map(String::from))]
    pub bins: Vec<String>,
    /// A request without a response after this long counts as an error.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Outstanding requests per connection; more count as errors (overload).
    #[arg(long, default_value_t = DEFAULT_MAX_OUTSTANDING)]
    pub max_outstanding: usize,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Replay this labeled CSV file (as `gen-data` writes) in file order instead of random
    /// cards; the run ends at the end of the file or after rate × duration rows.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Append one JSON line per answered request to this file: `terminal`, `stan`, `rrn`,
    /// `mti` (the request's), `code`, `approval_code`.
    #[arg(long)]
    pub record: Option<PathBuf>,
    /// Retransmit requests left unanswered after --timeout (same message, reconnecting if
    /// need be) until answered or this long has passed, as a gateway does: "30s".
    #[arg(long, value_parser = humantime::parse_duration)]
    pub retransmit_for: Option<Duration>,
}

/// How requests are carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// A QUIC bidirectional stream per transaction: open, write, finish, read.
    QuicPerStream,
    /// One long-lived QUIC stream per connection, requests pipelined on it.
    QuicPipelined,
    /// Plain TCP, requests pipelined on the connection.
    Tcp,
}

impl Mode {
    /// The name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::QuicPerStream => "quic-per-stream",
            Mode::QuicPipelined => "quic-pipelined",
            Mode::Tcp => "tcp",
        }
    }
}

/// Default cap on outstanding requests per connection: the QUIC stream limit of the switch
/// (`payswitch_net::quic::MAX_CONCURRENT_STREAMS`), so per-stream mode never waits for
/// stream credit. At a 5 ms round trip that is 200 000 TPS per connection; a target that
/// has more outstanding is overloaded, and queueing further would measure our own queue.
pub const DEFAULT_MAX_OUTSTANDING: usize = quic::MAX_CONCURRENT_STREAMS as usize;
/// Highest cap accepted: far below the 999 999 STANs of a terminal, so a terminal + STAN
/// key is never outstanding twice.
pub const MAX_OUTSTANDING_LIMIT: usize = 65_536;
/// Most connections: the switch's default connection limit.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most terminals: each holds its ids and a STAN counter (about 100 bytes).
pub const MAX_TERMINALS: usize = 100_000;
/// Time to set up all connections before the schedule starts.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often pipelined connections look for timed-out requests; also how long after the
/// last answer a pipelined connection notices it is done.
const SWEEP_INTERVAL: Duration = Duration::from_millis(10);
/// How long to wait for QUIC connections to close cleanly at the end.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Progress bar refresh.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);

/// Everything [`run`] needs.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// The switch or simulator.
    pub target: SocketAddr,
    /// Other nodes of the same switch cluster: connection `c` starts at node `c` modulo
    /// their count (`target` first), and retransmissions fail over from node to node.
    pub alternates: Vec<SocketAddr>,
    /// Name the server certificate must carry (QUIC).
    pub server_name: String,
    /// Which server certificates to trust (QUIC).
    pub trust: ClientTrust,
    /// How requests are carried.
    pub mode: Mode,
    /// Offered load over all connections, transactions per second.
    pub rate_tps: f64,
    /// How long to offer it.
    pub duration: Duration,
    /// Connections.
    pub connections: usize,
    /// Cards in the pool.
    pub cards: usize,
    /// BINs of the pool.
    pub bins: Vec<String>,
    /// Terminals (raised to one per connection).
    pub terminals: usize,
    /// Seed of the workload.
    pub seed: u64,
    /// Time a request may take before it is an error.
    pub request_timeout: Duration,
    /// Outstanding requests per connection before new ones are errors.
    pub max_outstanding_per_connection: usize,
    /// Draw a progress bar on stderr (only if stderr is a terminal).
    pub progress: bool,
    /// A labeled file to replay instead of the card pool (`cards`, `bins`, `terminals` and
    /// `seed` then do not apply).
    pub data: Option<PathBuf>,
    /// Append one JSON line per answered request here (`terminal`, `stan`, `rrn`, `mti`,
    /// `code`, `approval_code`): the gateway's side of the books.
    pub record: Option<PathBuf>,
    /// Behave like a gateway that must get an answer: a request with no answer within
    /// `request_timeout` is sent again — the same message, so the switch can recognise it
    /// — on a new connection if need be, until answered or this long has passed since it
    /// was first sent. QUIC per-stream mode only.
    pub retransmit_for: Option<Duration>,
}

impl LoadConfig {
    /// A short run against `target` with the defaults of the command line.
    pub fn new(target: SocketAddr, trust: ClientTrust) -> LoadConfig {
        LoadConfig {
            target,
            alternates: Vec::new(),
            server_name: "localhost".into(),
            trust,
            mode: Mode::QuicPerStream,
            rate_tps: 1000.0,
            duration: Duration::from_secs(10),
            connections: 4,
            cards: 10_000,
            bins: DEFAULT_BINS.map(String::from).to_vec(),
            terminals: 100,
            seed: 1,
            request_timeout: Duration::from_secs(5),
            max_outstanding_per_connection: DEFAULT_MAX_OUTSTANDING,
            progress: false,
            data: None,
            record: None,
            retransmit_for: None,
        }
    }

    /// Every node: `target`, then the alternates.
    pub fn targets(&self) -> Vec<SocketAddr> {
        std::iter::once(self.target)
            .chain(self.alternates.iter().copied())
            .collect()
    }

    fn check(&self) -> anyhow::Result<()> {
        ensure!(
            self.rate_tps.is_finite() && self.rate_tps > 0.0,
            "rate must be a positive number"
        );
        ensure!(!self.duration.is_zero(), "duration must be positive");
        ensure!(
            (1..=MAX_CONNECTIONS).contains(&self.connections),
            "connections must be 1 to {MAX_CONNECTIONS}"
        );
        ensure!(
            (1..=MAX_TERMINALS).contains(&self.terminals),
            "terminals must be 1 to {MAX_TERMINALS}"
        );
        ensure!(
            (1..=MAX_OUTSTANDING_LIMIT).contains(&self.max_outstanding_per_connection),
            "max outstanding must be 1 to {MAX_OUTSTANDING_LIMIT}"
        );
        ensure!(!self.request_timeout.is_zero(), "timeout must be positive");
        ensure!(
            self.retransmit_for.is_none() || self.mode == Mode::QuicPerStream,
            "retransmission needs QUIC with a stream per transaction (not --pipelined or --tcp)"
        );
        Ok(())
    }

    /// Requests in the whole schedule.
    fn total_requests(&self) -> u64 {
        (self.rate_tps * self.duration.as_secs_f64()).round() as u64
    }
}

/// The intended send times of one connection's share: requests `c, c + n, c + 2n, ...` of
/// the run, request `i` at `t0 + i / rate`.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    t0: Instant,
    rate_tps: f64,
    connection: u64,
    connections: u64,
    total: u64,
}

impl Schedule {
    /// The intended send time of this connection's `k`-th request, `None` past the end.
    fn intended(&self, k: u64) -> Option<Instant> {
        let i = self.index(k);
        (i < self.total).then(|| self.t0 + Duration::from_secs_f64(i as f64 / self.rate_tps))
    }

    /// The run-wide number of this connection's `k`-th request (a data file's row).
    fn index(&self, k: u64) -> u64 {
        self.connection + k * self.connections
    }

    /// Requests in this connection's share.
    fn len(&self) -> u64 {
        (self.total + self.connections - 1 - self.connection) / self.connections
    }
}

/// tokio's timer fires on the first millisecond tick after a deadline, up to a tick late.
const TIMER_TICK: Duration = Duration::from_millis(1);

/// Waits for a request's turn and returns the time its latency counts from.
///
/// Wakes a timer tick early and sends at once, so the timer's lag is not measured as the
/// target's latency. Latency counts from the *earlier* of the intended and the actual send
/// time: a request sent early is timed from when it really left (never shorter than the
/// true round trip), and one sent late, by a sender behind schedule, still counts from its
/// intended time (no coordinated omission).
async fn wait_for(intended: Instant) -> Instant {
    let wake = intended.checked_sub(TIMER_TICK).unwrap_or(intended);
    tokio::time::sleep_until(wake).await;
    intended.min(Instant::now())
}

/// Terminal id (field 41) and STAN (field 11): what a pipelined response is matched by.
type Key = ([u8; 8], u32);

/// The key of a message, if it carries a well-formed one.
fn key_of(message: &Message) -> Option<Key> {
    let terminal: [u8; 8] = message.get(fields::TERMINAL)?.try_into().ok()?;
    let stan = Stan::parse(message.get(fields::STAN)?).ok()?;
    Some((terminal, stan.get()))
}

/// Where a connection's requests come from.
// One per connection, made once: the size difference (the synthetic rng) costs nothing.
#[allow(clippy::large_enum_variant)]
enum Workload {
    Synthetic(Synthetic),
    /// Rows of a labeled file; each row's STAN was fixed when the file was loaded.
    Data {
        data: Arc<DataSet>,
        rrns: RrnGenerator,
    },
}

impl Workload {
    /// Request number `index` of the run, its key and (from a data file) its label.
    fn next_request(&mut self, index: u64) -> Option<(Message, Key, Option<Label>)> {
        match self {
            Workload::Synthetic(synthetic) => {
                let (request, key) = synthetic.next_request()?;
                Some((request, key, None))
            }
            Workload::Data { data, rrns } => {
                let (request, label) = data.request(index, &rrns.next_rrn())?;
                let key = key_of(&request)?;
                Some((request, key, Some(label)))
            }
        }
    }
}

/// The synthetic requests of one connection: its own terminals (so their STANs never
/// collide with another connection's) and cards from the shared pool.
struct Synthetic {
    pool: Arc<CardPool>,
    terminals: Vec<(Terminal, StanCounter)>,
    rrns: RrnGenerator,
    rng: StdRng,
}

impl Synthetic {
    fn new(config: &LoadConfig, pool: Arc<CardPool>, connection: usize) -> Synthetic {
        let terminals = config.terminals.max(config.connections);
        let terminals = (connection..terminals)
            .step_by(config.connections)
            .map(|t| (Terminal::synthetic(t as u32), StanCounter::new()))
            .collect();
        // Distinct, reproducible streams per connection (golden-ratio increments).
        let seed = config
            .seed
            .wrapping_add((connection as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        Synthetic {
            pool,
            terminals,
            rrns: RrnGenerator::new(),
            rng: StdRng::seed_from_u64(seed),
        }
    }

    fn next_request(&mut self) -> Option<(Message, Key)> {
        let card = self.pool.pick(&mut self.rng);
        let amount = sample_amount_minor(&mut self.rng);
        let index = self.rng.gen_range(0..self.terminals.len());
        let (terminal, stans) = &mut self.terminals[index];
        let stan = stans.next_stan();
        let rrn = self.rrns.next_rrn();
        let request = authorization(
            card,
            amount,
            terminal,
            stan,
            &rrn,
            UtcDateTime::from_system_time(SystemTime::now()),
        )
        .ok()?;
        let key = key_of(&request)?;
        Some((request, key))
    }
}

/// What the tasks of one connection share: its tally, and the run's count of finished
/// requests for the progress bar.
struct Shared {
    tally: Mutex<Tally>,
    finished: Arc<AtomicU64>,
    record: Option<Arc<Recorder>>,
    /// Requests sent again for want of an answer.
    retransmissions: AtomicU64,
}

/// The `--record` file: lines are formatted by the connection's task and written under a
/// lock into one buffer, flushed at the end of the run.
struct Recorder {
    out: Mutex<std::io::BufWriter<std::fs::File>>,
}

/// One answered request in the `--record` file.
#[derive(Serialize)]
struct RecordLine<'a> {
    terminal: &'a str,
    stan: &'a str,
    rrn: &'a str,
    mti: String,
    code: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    approval_code: Option<&'a str>,
    /// When the request was due to be sent (the open-loop schedule), Unix milliseconds.
    intended_ms: i64,
    /// From then to the answer, microseconds.
    latency_us: u64,
}

impl Recorder {
    fn open(path: &std::path::Path) -> anyhow::Result<Recorder> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Recorder {
            out: Mutex::new(std::io::BufWriter::new(file)),
        })
    }

    fn write(&self, response: &Message, latency: Duration) {
        // The request's MTI: the response's minus 10 (0110 -> 0100).
        let response_mti = response.mti();
        let mti = response_mti.as_str();
        let request_mti = match mti.as_bytes() {
            [a, b, c, d] if (b'1'..=b'9').contains(c) && (c - b'0') % 2 == 1 => {
                format!(
                    "{}{}{}{}",
                    *a as char,
                    *b as char,
                    (c - 1) as char,
                    *d as char
                )
            }
            _ => mti.to_string(),
        };
        let line = RecordLine {
            terminal: response
                .get_str(payswitch_protocol::fields::TERMINAL)
                .unwrap_or(""),
            stan: response
                .get_str(payswitch_protocol::fields::STAN)
                .unwrap_or(""),
            rrn: response
                .get_str(payswitch_protocol::fields::RRN)
                .unwrap_or(""),
            mti: request_mti,
            code: response
                .get_str(payswitch_protocol::fields::RESPONSE_CODE)
                .unwrap_or(""),
            approval_code: response.get_str(payswitch_protocol::fields::APPROVAL_CODE),
            intended_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.saturating_sub(latency).as_millis() as i64),
            latency_us: latency.as_micros() as u64,
        };
        let Ok(mut text) = serde_json::to_vec(&line) else {
            return;
        };
        text.push(b'\n');
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let _ = std::io::Write::write_all(&mut *out, &text);
    }

    fn flush(&self) -> std::io::Result<()> {
        std::io::Write::flush(&mut *self.out.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Shared {
    fn answered(&self, intended: Instant, response: &Message, label: Option<Label>) {
        if let Some(record) = &self.record {
            record.write(response, intended.elapsed());
        }
        self.lock().answered(intended.elapsed(), response, label);
        self.finished.fetch_add(1, Ordering::Relaxed);
    }

    fn failed(&self, failure: Failure) {
        self.lock().failed(failure);
        self.finished.fetch_add(1, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tally> {
        // A panic while holding the lock leaves counts, not broken invariants: keep going.
        self.tally.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One connection's link to the target.
enum Link {
    Quic {
        endpoint: quinn::Endpoint,
        connection: quinn::Connection,
        /// One long-lived stream instead of one per transaction.
        pipelined: bool,
    },
    Tcp(tokio::net::TcpStream),
}

async fn connect(config: &LoadConfig, target: SocketAddr) -> anyhow::Result<Link> {
    match config.mode {
        Mode::Tcp => {
            let stream = tokio::net::TcpStream::connect(target).await?;
            stream.set_nodelay(true)?;
            Ok(Link::Tcp(stream))
        }
        Mode::QuicPerStream | Mode::QuicPipelined => {
            let bind = match target {
                SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
                SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
            };
            let endpoint = quic::client_endpoint_bound(bind, config.trust.clone())?;
            let connection = quic::connect(&endpoint, target, &config.server_name).await?;
            Ok(Link::Quic {
                endpoint,
                connection,
                pipelined: config.mode == Mode::QuicPipelined,
            })
        }
    }
}

/// Runs a load and returns its report. Prints nothing; draws a progress bar only when
/// `config.progress` is set and stderr is a terminal.
pub async fn run(config: LoadConfig) -> anyhow::Result<Report> {
    config.check()?;
    let source = Source::of(&config)?;
    let links = connect_all(&config).await?;
    let total = source.total(&config);
    let record = match &config.record {
        Some(path) => Some(Arc::new(Recorder::open(path)?)),
        None => None,
    };
    let finished = Arc::new(AtomicU64::new(0));
    let progress = (config.progress && std::io::stderr().is_terminal())
        .then(|| spawn_progress(total, Arc::clone(&finished)));
    let t0 = Instant::now();
    let plan = RunPlan {
        config: &config,
        source: &source,
        t0,
        total,
        record: record.clone(),
        finished,
    };
    let drivers = plan.spawn_drivers(links);
    let (tally, ended, retransmissions) = join_drivers(drivers, t0).await?;
    if let Some(record) = &record {
        record.flush().context("writing the --record file")?;
    }
    if let Some((bar, ticker)) = progress {
        ticker.abort();
        bar.finish_and_clear();
    }
    let facts = RunFacts {
        target: config
            .targets()
            .iter()
            .map(SocketAddr::to_string)
            .collect::<Vec<_>>()
            .join(","),
        mode: config.mode,
        connections: config.connections,
        duration: config.duration,
        elapsed: ended - t0,
        offered_tps: config.rate_tps,
        sent: total,
        data: source.facts(&config, total),
    };
    let mut report = Report::new(facts, &tally);
    report.retransmissions = retransmissions;
    Ok(report)
}

/// Opens every connection of the run, one after the other, each within
/// `CONNECT_TIMEOUT`.
async fn connect_all(config: &LoadConfig) -> anyhow::Result<Vec<Link>> {
    let mut links = Vec::with_capacity(config.connections);
    let targets = config.targets();
    for c in 0..config.connections {
        let target = targets[c % targets.len()];
        let link = tokio::time::timeout(CONNECT_TIMEOUT, connect(config, target))
            .await
            .map_err(|_| anyhow::anyhow!("timed out"))
            .and_then(|r| r)
            .with_context(|| format!("connecting to {target}"))?;
        links.push(link);
    }
    Ok(links)
}

/// What every connection's driver of one run shares.
struct RunPlan<'a> {
    config: &'a LoadConfig,
    source: &'a Source,
    /// When the schedule starts.
    t0: Instant,
    /// Requests in the run, over all connections.
    total: u64,
    record: Option<Arc<Recorder>>,
    /// Requests answered so far, for the progress bar.
    finished: Arc<AtomicU64>,
}

impl RunPlan<'_> {
    /// Starts one driver per link, each with its share of the schedule and the workload.
    fn spawn_drivers(&self, links: Vec<Link>) -> JoinSet<(Arc<Shared>, Instant)> {
        let config = self.config;
        let mut drivers = JoinSet::new();
        for (c, link) in links.into_iter().enumerate() {
            let schedule = Schedule {
                t0: self.t0,
                rate_tps: config.rate_tps,
                connection: c as u64,
                connections: config.connections as u64,
                total: self.total,
            };
            let shared = Arc::new(Shared {
                tally: Mutex::new(Tally::new()),
                finished: Arc::clone(&self.finished),
                record: self.record.clone(),
                retransmissions: AtomicU64::new(0),
            });
            let workload = self.source.workload(config, c);
            let mut limits = Bounds::of(config);
            limits.at = c % limits.targets.len();
            drivers.spawn(drive(link, workload, schedule, limits, shared));
        }
        drivers
    }
}

/// Waits for every driver: their tallies merged, when the last one ended (`t0` at the
/// earliest), and the retransmissions sent.
async fn join_drivers(
    mut drivers: JoinSet<(Arc<Shared>, Instant)>,
    t0: Instant,
) -> anyhow::Result<(Tally, Instant, u64)> {
    let mut tally = Tally::new();
    let mut ended = t0;
    let mut retransmissions = 0;
    while let Some(done) = drivers.join_next().await {
        let (shared, connection_ended) = done.context("a connection task failed")?;
        retransmissions += shared.retransmissions.load(Ordering::Relaxed);
        tally.merge(&shared.lock());
        ended = ended.max(connection_ended);
    }
    Ok((tally, ended, retransmissions))
}

/// The requests of a run: a synthetic card pool or a labeled file.
enum Source {
    Pool(Arc<CardPool>),
    Data(Arc<DataSet>),
}

impl Source {
    fn of(config: &LoadConfig) -> anyhow::Result<Source> {
        Ok(match &config.data {
            Some(path) => Source::Data(Arc::new(DataSet::load(path)?)),
            None => Source::Pool(Arc::new(CardPool::new(
                config.cards,
                &config.bins,
                config.seed,
                UtcDateTime::from_system_time(SystemTime::now()),
            )?)),
        })
    }

    /// Requests in the run: the schedule's, or fewer if the file ends first.
    fn total(&self, config: &LoadConfig) -> u64 {
        match self {
            Source::Pool(_) => config.total_requests(),
            Source::Data(data) => config.total_requests().min(data.len() as u64),
        }
    }

    fn workload(&self, config: &LoadConfig, connection: usize) -> Workload {
        match self {
            Source::Pool(pool) => {
                Workload::Synthetic(Synthetic::new(config, Arc::clone(pool), connection))
            }
            Source::Data(data) => Workload::Data {
                data: Arc::clone(data),
                rrns: RrnGenerator::new(),
            },
        }
    }

    fn facts(&self, config: &LoadConfig, total: u64) -> Option<DataFacts> {
        let Source::Data(data) = self else {
            return None;
        };
        Some(DataFacts {
            file: config
                .data
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            rows: data.len() as u64,
            ended_by_file: total == data.len() as u64,
            sent: data.sent_summary(total),
            scenarios: data.scenarios.clone(),
        })
    }
}

fn spawn_progress(
    total: u64,
    finished: Arc<AtomicU64>,
) -> (ProgressBar, tokio::task::JoinHandle<()>) {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {pos}/{len} requests, {elapsed} ({eta} left)")
    {
        bar.set_style(style);
    }
    let ticker_bar = bar.clone();
    let ticker = tokio::spawn(async move {
        let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
        loop {
            tick.tick().await;
            ticker_bar.set_position(finished.load(Ordering::Relaxed));
        }
    });
    (bar, ticker)
}

/// The per-connection bounds.
#[derive(Debug, Clone)]
struct Bounds {
    max_outstanding: usize,
    request_timeout: Duration,
    retransmit_for: Option<Duration>,
    /// The switch's nodes, and which one this connection started at.
    targets: Vec<SocketAddr>,
    at: usize,
    server_name: String,
}

impl Bounds {
    fn of(config: &LoadConfig) -> Bounds {
        Bounds {
            max_outstanding: config.max_outstanding_per_connection,
            request_timeout: config.request_timeout,
            retransmit_for: config.retransmit_for,
            targets: config.targets(),
            at: 0,
            server_name: config.server_name.clone(),
        }
    }
}

/// A QUIC connection to the switch that is replaced when it stops answering (for
/// retransmissions: the switch may have restarted, or — with several nodes — vanished,
/// when the next node takes the retransmission).
struct Gateway {
    endpoint: quinn::Endpoint,
    targets: Vec<SocketAddr>,
    server_name: String,
    /// The connection, its generation (bumped at each replacement) and the node it is to.
    current: tokio::sync::Mutex<(u64, quinn::Connection, usize)>,
}

/// Pause between failed reconnection attempts.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);

/// How long a replacement connection may take: a node that does not answer a handshake
/// in this time is passed over for the next (the first connections get
/// `CONNECT_TIMEOUT`).
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(2);

impl Gateway {
    async fn connection(&self) -> (u64, quinn::Connection) {
        let current = self.current.lock().await;
        (current.0, current.1.clone())
    }

    /// Replaces connection `generation` (if nobody has yet) with a new one: to the same
    /// node when it is the only one, else to the next node.
    async fn replace(&self, generation: u64) {
        let mut current = self.current.lock().await;
        if current.0 != generation {
            return;
        }
        let next = (current.2 + 1) % self.targets.len();
        let connect = quic::connect(&self.endpoint, self.targets[next], &self.server_name);
        match tokio::time::timeout(RECONNECT_TIMEOUT, connect).await {
            Ok(Ok(connection)) => {
                current
                    .1
                    .close(quinn::VarInt::from_u32(codes::DONE), b"replaced");
                *current = (generation + 1, connection, next);
            }
            _ => {
                // The next try starts from the node after this one.
                current.2 = next;
                tokio::time::sleep(RECONNECT_PAUSE).await
            }
        }
    }
}

/// Runs one connection's share of the schedule to the end and closes the connection.
async fn drive(
    link: Link,
    workload: Workload,
    schedule: Schedule,
    bounds: Bounds,
    shared: Arc<Shared>,
) -> (Arc<Shared>, Instant) {
    match link {
        Link::Tcp(stream) => {
            let (read, write) = stream.into_split();
            pipeline(read, write, workload, schedule, bounds, &shared).await;
            (shared, Instant::now())
        }
        Link::Quic {
            endpoint,
            connection,
            pipelined,
        } => {
            if !pipelined {
                let gateway = Arc::new(Gateway {
                    endpoint: endpoint.clone(),
                    targets: bounds.targets.clone(),
                    server_name: bounds.server_name.clone(),
                    current: tokio::sync::Mutex::new((0, connection.clone(), bounds.at)),
                });
                per_stream(&gateway, workload, schedule, bounds.clone(), &shared).await;
                let (_, last) = gateway.connection().await;
                last.close(quinn::VarInt::from_u32(codes::DONE), b"done");
            } else if let Ok((send, recv)) = connection.open_bi().await {
                pipeline(recv, send, workload, schedule, bounds, &shared).await;
            } else {
                for _ in 0..schedule.len() {
                    shared.failed(Failure::Transport);
                }
            }
            let ended = Instant::now();
            connection.close(quinn::VarInt::from_u32(codes::DONE), b"done");
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, endpoint.wait_idle()).await;
            (shared, ended)
        }
    }
}

/// Sends each request on a stream of its own, on schedule, each in its own task.
async fn per_stream(
    gateway: &Arc<Gateway>,
    mut workload: Workload,
    schedule: Schedule,
    bounds: Bounds,
    shared: &Arc<Shared>,
) {
    let mut tasks = JoinSet::new();
    for k in 0..schedule.len() {
        let Some(intended) = schedule.intended(k) else {
            break;
        };
        let intended = wait_for(intended).await;
        while tasks.try_join_next().is_some() {}
        if tasks.len() >= bounds.max_outstanding {
            shared.failed(Failure::Overload);
            continue;
        }
        let Some((request, _, label)) = workload.next_request(schedule.index(k)) else {
            shared.failed(Failure::Build);
            continue;
        };
        let gateway = Arc::clone(gateway);
        let shared = Arc::clone(shared);
        let (request_timeout, retransmit_for) = (bounds.request_timeout, bounds.retransmit_for);
        tasks.spawn(async move {
            let give_up = intended + retransmit_for.unwrap_or(Duration::ZERO);
            loop {
                let (generation, connection) = gateway.connection().await;
                let exchange = transaction(&connection, &request);
                let failure = match tokio::time::timeout(request_timeout, exchange).await {
                    Ok(Ok(response)) => return shared.answered(intended, &response, label),
                    Ok(Err(failure)) => failure,
                    Err(_) => Failure::Timeout,
                };
                let retry = matches!(failure, Failure::Timeout | Failure::Transport);
                if retransmit_for.is_none() || !retry || Instant::now() >= give_up {
                    return shared.failed(failure);
                }
                shared.retransmissions.fetch_add(1, Ordering::Relaxed);
                gateway.replace(generation).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// One transaction on a fresh stream: open, write the request, finish, read the response.
async fn transaction(
    connection: &quinn::Connection,
    request: &Message,
) -> Result<Message, Failure> {
    let (mut send, recv) = connection.open_bi().await.map_err(|_| Failure::Transport)?;
    let mut scratch = BytesMut::with_capacity(256);
    write_message(&mut send, request, &mut scratch)
        .await
        .map_err(|_| Failure::Transport)?;
    send.finish().map_err(|_| Failure::Transport)?;
    let mut frames = FrameReader::new(recv, DEFAULT_MAX_FRAME);
    match frames.next_frame().await {
        Ok(Some(frame)) => Message::decode(frame).map_err(|_| Failure::BadResponse),
        Ok(None) | Err(_) => Err(Failure::Transport),
    }
}

/// A request sent on a pipelined stream and not yet answered.
#[derive(Debug, Clone, Copy)]
struct Pending {
    intended: Instant,
    deadline: Instant,
    label: Option<Label>,
}

/// What the writer and the reader of one pipelined stream share.
struct Pipe<'a> {
    shared: &'a Shared,
    bounds: Bounds,
    /// Outstanding requests, at most `bounds.max_outstanding`.
    pending: Mutex<HashMap<Key, Pending>>,
    /// The writer has sent its whole share.
    writer_done: AtomicBool,
    /// The stream failed: nothing more can be sent or answered on it.
    broken: AtomicBool,
}

impl Pipe<'_> {
    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Pending>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a request about to be written; `false` (and an overload error) at the cap.
    fn register(&self, key: Key, intended: Instant, label: Option<Label>) -> bool {
        let mut pending = self.pending();
        if pending.len() >= self.bounds.max_outstanding {
            drop(pending);
            self.shared.failed(Failure::Overload);
            return false;
        }
        let deadline = Instant::now() + self.bounds.request_timeout;
        pending.insert(
            key,
            Pending {
                intended,
                deadline,
                label,
            },
        );
        true
    }

    fn answer(&self, frame: bytes::Bytes) {
        let Some(response) = Message::decode(frame).ok() else {
            self.shared.lock().unmatched();
            return;
        };
        let Some(key) = key_of(&response) else {
            self.shared.lock().unmatched();
            return;
        };
        let entry = self.pending().remove(&key);
        match entry {
            Some(p) => self.shared.answered(p.intended, &response, p.label),
            None => self.shared.lock().late(),
        }
    }

    /// Counts requests past their deadline as timeouts and forgets them.
    fn expire(&self) {
        let now = Instant::now();
        let mut expired = 0u64;
        self.pending().retain(|_, p| {
            let keep = p.deadline > now;
            expired += u64::from(!keep);
            keep
        });
        for _ in 0..expired {
            self.shared.failed(Failure::Timeout);
        }
    }

    /// The stream failed: every outstanding request is lost.
    fn fail_all(&self) {
        self.broken.store(true, Ordering::Relaxed);
        let lost = self.pending().drain().count();
        for _ in 0..lost {
            self.shared.failed(Failure::Transport);
        }
    }
}

/// Sends one connection's share on one stream while reading responses from it.
async fn pipeline<R, W>(
    reader: R,
    writer: W,
    workload: Workload,
    schedule: Schedule,
    bounds: Bounds,
    shared: &Shared,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let max_outstanding = bounds.max_outstanding;
    let pipe = Pipe {
        shared,
        bounds,
        pending: Mutex::new(HashMap::with_capacity(max_outstanding)),
        writer_done: AtomicBool::new(false),
        broken: AtomicBool::new(false),
    };
    tokio::join!(
        pipeline_send(writer, workload, schedule, &pipe),
        pipeline_receive(reader, &pipe)
    );
    // Both halves run in this one task, so the receiver's last sweep saw every request the
    // writer registered; this only keeps the totals exact should that ever change.
    pipe.fail_all();
}

async fn pipeline_send<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut workload: Workload,
    schedule: Schedule,
    pipe: &Pipe<'_>,
) {
    let mut scratch = BytesMut::with_capacity(512);
    for k in 0..schedule.len() {
        let Some(intended) = schedule.intended(k) else {
            break;
        };
        let intended = wait_for(intended).await;
        if pipe.broken.load(Ordering::Relaxed) {
            pipe.shared.failed(Failure::Transport);
            continue;
        }
        let Some((request, key, label)) = workload.next_request(schedule.index(k)) else {
            pipe.shared.failed(Failure::Build);
            continue;
        };
        // Registered before the write, so an answer cannot overtake its own entry.
        if !pipe.register(key, intended, label) {
            continue;
        }
        // A target that stops reading would block this write forever: give up on the
        // stream after a request timeout, as on a request.
        let write = write_message(&mut writer, &request, &mut scratch);
        let written = tokio::time::timeout(pipe.bounds.request_timeout, write).await;
        if !matches!(written, Ok(Ok(()))) {
            pipe.broken.store(true, Ordering::Relaxed);
            if pipe.pending().remove(&key).is_some() {
                pipe.shared.failed(Failure::Transport);
            }
        }
    }
    let _ = writer.shutdown().await;
    pipe.writer_done.store(true, Ordering::Relaxed);
}

async fn pipeline_receive<R: AsyncRead + Unpin>(reader: R, pipe: &Pipe<'_>) {
    let mut frames = FrameReader::new(reader, DEFAULT_MAX_FRAME);
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            frame = frames.next_frame() => match frame {
                Ok(Some(frame)) => pipe.answer(frame),
                Ok(None) | Err(_) => break,
            },
            _ = sweep.tick() => {
                pipe.expire();
                if pipe.writer_done.load(Ordering::Relaxed) && pipe.pending().is_empty() {
                    return;
                }
            }
        }
    }
    // The writer may still be running its schedule: it now counts each request as lost.
    pipe.fail_all();
}

/// Runs a load and prints its report (and writes it as JSON with `--json`).
pub async fn run_cli(args: LoadArgs) -> anyhow::Result<()> {
    let mut targets = Vec::new();
    for name in args.target.split(',').map(str::trim) {
        let target = tokio::net::lookup_host(name)
            .await
            .with_context(|| format!("resolving {name}"))?
            .next()
            .with_context(|| format!("{name} resolves to no address"))?;
        targets.push(target);
    }
    let target = targets.remove(0);
    let mode = match (args.tcp, args.pipelined) {
        (true, _) => Mode::Tcp,
        (false, true) => Mode::QuicPipelined,
        (false, false) => Mode::QuicPerStream,
    };
    let trust = match &args.ca {
        Some(path) => ClientTrust::from_ca_file(path)?,
        None => {
            if mode != Mode::Tcp {
                eprintln!(
                    "warning: no --ca given: accepting any server certificate (no protection against an impostor)"
                );
            }
            ClientTrust::AcceptAny
        }
    };
    let config = LoadConfig {
        server_name: args.server_name,
        mode,
        rate_tps: args.rate,
        duration: args.duration,
        connections: args.connections,
        cards: args.cards,
        bins: args.bins,
        terminals: args.terminals,
        seed: args.seed,
        request_timeout: args.timeout,
        max_outstanding_per_connection: args.max_outstanding,
        progress: !args.quiet,
        data: args.data,
        record: args.record,
        retransmit_for: args.retransmit_for,
        alternates: targets,
        ..LoadConfig::new(target, trust)
    };
    let report = run(config).await?;
    print!("{}", report.render());
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report)? + "\n";
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
