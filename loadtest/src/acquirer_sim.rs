//! The acquirer simulator: a deterministic acquirer/issuer speaking the wire contract.
//!
//! [`Issuer`] holds the decisions and is plain functions over a message and a date: expiry
//! (54), a per-card limit (51), a seeded approval rate (05), format errors (30), bad Luhn
//! (14), unsupported MTIs (12). Every choice is a hash of the seed and the request, so the
//! same request gets the same answer at any concurrency, and a seed replays a run.
//! [`start`] puts it on QUIC (and optionally TCP) with the shared serve loop of
//! `payswitch-net`, adding a simulated processing latency per request.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{ensure, Context};
use bytes::Bytes;
use payswitch_net::serve::{serve_quic, serve_tcp};
use payswitch_net::{codes, quic, Handler, Limits, Reply, ServeStats, TlsIdentity};
use payswitch_protocol::time::UtcDateTime;
use payswitch_protocol::{
    fields, AmountMinor, CurrencyCode, DecodeError, Message, Mti, Pan, ResponseCode, Rrn, Stan,
};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rustls::pki_types::CertificateDer;
use serde::Serialize;
use std::io::Write;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cards::log_normal;

/// Command-line arguments of `payswitch acquirer-sim`.
#[derive(clap::Args, Debug, Clone)]
pub struct SimArgs {
    /// QUIC listen address (UDP).
    #[arg(long, default_value = "127.0.0.1:8584")]
    pub listen: SocketAddr,
    /// Also serve plain TCP (length-prefixed frames) on this address.
    #[arg(long)]
    pub tcp_listen: Option<SocketAddr>,
    /// Seed of every decision and latency: the same seed gives the same answers.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Share of otherwise valid requests approved (the rest get 05).
    #[arg(long, default_value_t = 0.95, value_parser = parse_rate)]
    pub approval_rate: f64,
    /// Median simulated processing time, microseconds (log-normal).
    #[arg(long, default_value_t = 500)]
    pub latency_us_median: u64,
    /// Cap on the simulated processing time, microseconds.
    #[arg(long, default_value_t = 20_000)]
    pub latency_us_max: u64,
    /// Fixed extra delay on every answer, milliseconds (to provoke timeouts).
    #[arg(long, default_value_t = 0)]
    pub delay_ms: u64,
    /// PEM certificate chain; without it a self-signed certificate for localhost is made.
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// Name of this acquirer, sent back as `acquirer=NAME` in field 48.
    #[arg(long, default_value = "sim")]
    pub name: String,
    /// Append one JSON line per message answered to this file (`mti`, `stan`, `rrn`,
    /// `terminal`, `amount_minor`, `code`, `original` for reversals, `pan` masked when
    /// field 2 came): the acquirer's
    /// side of the books.
    #[arg(long)]
    pub ledger: Option<PathBuf>,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let rate: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err("must be between 0 and 1".into())
    }
}

/// Longest acquirer name: it goes into field 48 and into reports.
const MAX_NAME_LEN: usize = 32;

/// Everything [`start`] needs.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// QUIC listen address; port 0 picks a free one.
    pub quic_listen: SocketAddr,
    /// TCP listen address, if TCP is served; port 0 picks a free one.
    pub tcp_listen: Option<SocketAddr>,
    /// Seed of decisions and latencies.
    pub seed: u64,
    /// Share of otherwise valid requests approved, 0 to 1.
    pub approval_rate: f64,
    /// Median simulated processing time.
    pub latency_median: Duration,
    /// Cap on the simulated processing time.
    pub latency_max: Duration,
    /// Fixed extra delay on every answer.
    pub delay: Duration,
    /// Server certificate and key; `None` makes a self-signed one for localhost.
    pub identity: Option<TlsIdentity>,
    /// Acquirer name, in field 48 of every response.
    pub name: String,
    /// Server limits (frame size, pipelining, connections).
    pub limits: Limits,
    /// The ledger file, if one is kept.
    pub ledger: Option<PathBuf>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            quic_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tcp_listen: None,
            seed: 1,
            approval_rate: 0.95,
            latency_median: Duration::from_micros(500),
            latency_max: Duration::from_millis(20),
            delay: Duration::ZERO,
            identity: None,
            name: "sim".into(),
            limits: Limits::default(),
            ledger: None,
        }
    }
}

impl TryFrom<SimArgs> for SimConfig {
    type Error = anyhow::Error;

    /// Reads `--cert`/`--key` when given.
    fn try_from(args: SimArgs) -> anyhow::Result<SimConfig> {
        let identity = match (&args.cert, &args.key) {
            (Some(cert), Some(key)) => Some(TlsIdentity::from_pem_files(cert, key)?),
            _ => None,
        };
        Ok(SimConfig {
            quic_listen: args.listen,
            tcp_listen: args.tcp_listen,
            seed: args.seed,
            approval_rate: args.approval_rate,
            latency_median: Duration::from_micros(args.latency_us_median),
            latency_max: Duration::from_micros(args.latency_us_max),
            delay: Duration::from_millis(args.delay_ms),
            identity,
            name: args.name,
            limits: Limits::default(),
            ledger: args.ledger,
        })
    }
}

/// A seeded 64-bit hash of byte strings: FNV-1a over the parts (each followed by a
/// separator, so part boundaries count), then the splitmix64 finaliser for good low bits.
/// Stable across builds and platforms, unlike `std`'s `DefaultHasher`.
fn seeded_hash(seed: u64, parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for part in parts {
        for &b in part.iter().chain(std::iter::once(&0xffu8)) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// A hash as a uniform number in [0, 1).
fn unit_interval(hash: u64) -> f64 {
    (hash >> 11) as f64 / (1u64 << 53) as f64
}

/// Smallest per-card limit: 1 000.00.
pub const CARD_LIMIT_MIN_MINOR: u64 = 100_000;
/// Largest per-card limit: 10 000.00.
pub const CARD_LIMIT_MAX_MINOR: u64 = 1_000_000;

/// What kind of request an MTI is, for the simulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// 0100, 0200.
    Authorization,
    /// 0400, 0420 and their repeats 0401, 0421.
    Reversal,
    /// 0120, 0220 and their repeats: an approval the switch gave in stand-in, booked as
    /// given (answered 0130/0230 with 00, applied once per RRN and STAN).
    Advice,
    /// 0800.
    Network,
    /// Any other request MTI: answered 12.
    Unsupported,
}

fn kind(mti: Mti) -> Kind {
    // A repeat (0401, 0421) is the same request again: the same answer, applied once.
    match mti.first_transmission() {
        Mti::AUTHORIZATION_REQUEST | Mti::FINANCIAL_REQUEST => Kind::Authorization,
        Mti::REVERSAL_REQUEST | Mti::REVERSAL_ADVICE => Kind::Reversal,
        m if m.as_bytes()[1..] == *b"120" || m.as_bytes()[1..] == *b"220" => Kind::Advice,
        Mti::NETWORK_REQUEST => Kind::Network,
        _ => Kind::Unsupported,
    }
}

/// The fields of a 0100/0200 the decisions read, each well formed.
#[derive(Debug)]
struct AuthorizationRequest {
    pan: Pan,
    amount: AmountMinor,
    stan: [u8; 6],
    rrn: Rrn,
    /// Expiry as a month index (see [`UtcDateTime::month_index`]), when field 14 is there.
    expiry_month: Option<u32>,
}

/// Why a 0100/0200 cannot be decided on its merits.
fn parse_authorization(request: &Message) -> Result<AuthorizationRequest, ResponseCode> {
    let format = ResponseCode::FormatError;
    let field = |n| request.get(n).ok_or(format);
    let pan = Pan::parse(field(fields::PAN)?).map_err(|e| match e {
        payswitch_protocol::ValueError::Luhn => ResponseCode::InvalidCardNumber,
        _ => format,
    })?;
    let all_digits = |raw: &[u8]| raw.iter().all(u8::is_ascii_digit);
    if !all_digits(field(fields::PROCESSING_CODE)?)
        || !all_digits(field(fields::TRANSMISSION_TIME)?)
    {
        return Err(format);
    }
    let amount = AmountMinor::parse(field(fields::AMOUNT)?).map_err(|_| format)?;
    let stan = Stan::parse(field(fields::STAN)?).map_err(|_| format)?;
    let rrn = Rrn::parse(field(fields::RRN)?).map_err(|_| format)?;
    CurrencyCode::parse(field(fields::CURRENCY)?).map_err(|_| format)?;
    field(fields::MERCHANT)?;
    field(fields::TERMINAL)?;
    let expiry_month = match request.get(fields::EXPIRY) {
        None => None,
        Some(raw) => Some(parse_expiry(raw).ok_or(format)?),
    };
    Ok(AuthorizationRequest {
        pan,
        amount,
        stan: stan.to_digits(),
        rrn,
        expiry_month,
    })
}

/// `YYMM` (years 2000–2099) as a month index, `None` unless four digits with a real month.
fn parse_expiry(raw: &[u8]) -> Option<u32> {
    if raw.len() != 4 || !raw.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let two = |i: usize| u32::from(raw[i] - b'0') * 10 + u32::from(raw[i + 1] - b'0');
    let (year, month) = (2000 + two(0), two(2));
    (1..=12).contains(&month).then(|| year * 12 + month - 1)
}

/// The simulated issuer's decisions. Pure: no clock, no I/O.
#[derive(Debug, Clone)]
pub struct Issuer {
    seed: u64,
    approval_rate: f64,
    /// Field 48 of every response: `acquirer=NAME`.
    tag: String,
}

impl Issuer {
    /// An issuer approving `approval_rate` (0 to 1) of the valid requests it can afford.
    pub fn new(seed: u64, approval_rate: f64, name: &str) -> Issuer {
        Issuer {
            seed,
            approval_rate,
            tag: format!("acquirer={name}"),
        }
    }

    /// The card's limit per authorization, in minor units: 1 000.00 to 10 000.00, fixed by
    /// the seed and the PAN.
    pub fn card_limit_minor(&self, pan: &Pan) -> u64 {
        let span = CARD_LIMIT_MAX_MINOR - CARD_LIMIT_MIN_MINOR + 1;
        CARD_LIMIT_MIN_MINOR + seeded_hash(self.seed, &[b"limit", pan.expose()]) % span
    }

    /// The response code for a 0100/0200: 30 or 14 if malformed, then 54 expired (before
    /// `today`'s month), 51 over the card's limit, else 00 or 05 by the approval rate.
    pub fn decide(&self, request: &Message, today: UtcDateTime) -> ResponseCode {
        match parse_authorization(request) {
            Ok(auth) => self.decide_parsed(&auth, today),
            Err(code) => code,
        }
    }

    fn decide_parsed(&self, auth: &AuthorizationRequest, today: UtcDateTime) -> ResponseCode {
        if auth.expiry_month.is_some_and(|m| m < today.month_index()) {
            return ResponseCode::ExpiredCard;
        }
        if auth.amount.get() > self.card_limit_minor(&auth.pan) {
            return ResponseCode::InsufficientFunds;
        }
        let draw = seeded_hash(self.seed, &request_key(auth, b"approve"));
        if unit_interval(draw) < self.approval_rate {
            ResponseCode::Approved
        } else {
            ResponseCode::DoNotHonor
        }
    }

    /// The approval code (field 38) of an approved request: six characters `0-9A-Z`.
    fn approval_code(&self, auth: &AuthorizationRequest) -> String {
        let mut value = seeded_hash(self.seed, &request_key(auth, b"code"));
        (0..6)
            .map(|_| {
                let c = char::from(BASE36[(value % 36) as usize]);
                value /= 36;
                c
            })
            .collect()
    }

    /// The code of a request and, on an approved authorization, its approval code.
    fn outcome(
        &self,
        request: &Message,
        decode_error: Option<DecodeError>,
        today: UtcDateTime,
    ) -> (ResponseCode, Option<String>) {
        match (decode_error, kind(request.mti())) {
            (Some(_), _) => (ResponseCode::FormatError, None),
            (None, Kind::Authorization) => match parse_authorization(request) {
                Ok(auth) => {
                    let code = self.decide_parsed(&auth, today);
                    (code, code.is_approved().then(|| self.approval_code(&auth)))
                }
                Err(code) => (code, None),
            },
            (None, Kind::Reversal | Kind::Network) => (ResponseCode::Approved, None),
            // Booked as the switch approved it: its approval code is echoed.
            (None, Kind::Advice) => (
                ResponseCode::Approved,
                request.get_str(fields::APPROVAL_CODE).map(str::to_string),
            ),
            (None, Kind::Unsupported) => (ResponseCode::InvalidTransaction, None),
        }
    }

    /// The whole answer to `request` (decoded up to `decode_error`, if any) on `today`, and
    /// its response code. `None` when nothing can be answered: a response MTI.
    pub fn respond(
        &self,
        request: &Message,
        decode_error: Option<DecodeError>,
        today: UtcDateTime,
    ) -> Option<(Message, ResponseCode)> {
        let response_mti = request.mti().response()?;
        let (code, approval) = self.outcome(request, decode_error, today);
        let echoed: &[u8] = match kind(request.mti()) {
            Kind::Network => &[
                fields::TRANSMISSION_TIME,
                fields::STAN,
                fields::NETWORK_CODE,
            ],
            _ => &fields::ECHOED,
        };
        let mut builder = Message::builder(response_mti);
        // Echoed fields passed the codec's checks on the way in, and the response is no
        // bigger than the request plus a few short fields, so building fails only on a bug.
        builder.copy_from(request, echoed).ok()?;
        builder.set_str(fields::RESPONSE_CODE, code.as_str()).ok()?;
        if let Some(approval) = approval {
            builder.set_str(fields::APPROVAL_CODE, &approval).ok()?;
        }
        builder.set_str(fields::PRIVATE_DATA, &self.tag).ok()?;
        Some((builder.build(), code))
    }
}

const BASE36: &[u8; 36] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// What identifies one request for a decision: purpose, PAN, STAN, RRN.
fn request_key<'a>(auth: &'a AuthorizationRequest, purpose: &'static [u8]) -> [&'a [u8]; 4] {
    [purpose, auth.pan.expose(), &auth.stan, auth.rrn.as_bytes()]
}

/// Shape of the simulated processing time (sigma of the underlying normal): the 99th
/// percentile lands near 3x the median, like a healthy issuer host.
const LATENCY_SIGMA: f64 = 0.5;

/// Simulated processing time of one request.
#[derive(Debug, Clone, Copy)]
struct LatencyModel {
    median: Duration,
    max: Duration,
    delay: Duration,
}

impl LatencyModel {
    /// The time to wait before answering the request whose hash is `request_hash`: the same
    /// request always waits the same.
    fn sample(&self, request_hash: u64) -> Duration {
        if self.median.is_zero() {
            return self.delay;
        }
        let mut rng = StdRng::seed_from_u64(request_hash);
        let median_us = self.median.as_secs_f64() * 1e6;
        let sampled = Duration::from_micros(log_normal(&mut rng, median_us, LATENCY_SIGMA) as u64);
        sampled.min(self.max) + self.delay
    }
}

/// Counters of a running simulator.
#[derive(Debug, Default)]
pub struct SimStats {
    /// 0100/0200 requests answered (any code).
    pub requests: AtomicU64,
    /// 0100/0200 answered 00.
    pub approvals: AtomicU64,
    /// 0100/0200 answered otherwise, by the code's index in `ResponseCode::ALL`.
    declines: [AtomicU64; ResponseCode::ALL.len()],
    /// 0800 answered.
    pub network: AtomicU64,
    /// 0400/0420 answered.
    pub reversals: AtomicU64,
    /// 0120/0220 (stand-in advices) answered, repeats included.
    pub advices: AtomicU64,
    /// Other request MTIs, answered 12.
    pub unsupported: AtomicU64,
    /// Frames that could not be answered (stream closed with `GARBAGE_FRAME`).
    pub unanswerable: AtomicU64,
    /// Connections, streams and frames of the serve loop.
    pub serve: Arc<ServeStats>,
}

impl SimStats {
    /// 0100/0200 answered with `code` (declines and approvals alike).
    pub fn answered_with(&self, code: ResponseCode) -> u64 {
        if code.is_approved() {
            return self.approvals.load(Ordering::Relaxed);
        }
        ResponseCode::ALL
            .iter()
            .position(|c| *c == code)
            .map_or(0, |i| self.declines[i].load(Ordering::Relaxed))
    }

    /// Declined 0100/0200 by code (only codes that occurred).
    pub fn declines(&self) -> std::collections::BTreeMap<&'static str, u64> {
        ResponseCode::ALL
            .iter()
            .zip(&self.declines)
            .map(|(code, n)| (code.as_str(), n.load(Ordering::Relaxed)))
            .filter(|&(_, n)| n > 0)
            .collect()
    }

    fn record(&self, kind: Kind, code: ResponseCode) {
        let counter = match kind {
            Kind::Authorization => {
                self.requests.fetch_add(1, Ordering::Relaxed);
                if code.is_approved() {
                    &self.approvals
                } else {
                    let index = ResponseCode::ALL.iter().position(|c| *c == code);
                    match index {
                        Some(i) => &self.declines[i],
                        None => return,
                    }
                }
            }
            Kind::Network => &self.network,
            Kind::Reversal => &self.reversals,
            Kind::Advice => &self.advices,
            Kind::Unsupported => &self.unsupported,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The simulator as a serve-loop handler: decide at once, answer after the latency.
struct SimHandler {
    issuer: Issuer,
    seed: u64,
    latency: LatencyModel,
    stats: Arc<SimStats>,
    ledger: Option<mpsc::Sender<Vec<u8>>>,
    /// Delay added on top of the latency model, microseconds; changed while running by
    /// [`RunningSim::set_delay`] (an acquirer that slows down and recovers).
    extra_delay_us: Arc<AtomicU64>,
}

/// Ledger lines waiting for the writer. The writer drains them as fast as the disk takes
/// appends; when it falls this far behind, answers wait for it (the books must be whole).
const LEDGER_QUEUE: usize = 65_536;

/// One message the simulator answered, as a ledger line.
#[derive(Serialize)]
struct LedgerLine<'a> {
    mti: &'a str,
    stan: &'a str,
    rrn: &'a str,
    terminal: &'a str,
    amount_minor: u64,
    code: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    approval_code: Option<&'a str>,
    /// Field 90 of a reversal: original MTI, STAN, transmission time, …
    #[serde(skip_serializing_if = "Option::is_none")]
    original: Option<&'a str>,
    /// Field 2 when the message carried it, masked (first six, last four): never the PAN.
    #[serde(skip_serializing_if = "Option::is_none")]
    pan: Option<String>,
}

fn ledger_line(request: &Message, response: &Message) -> Option<Vec<u8>> {
    let mti = request.mti();
    let line = LedgerLine {
        mti: mti.as_str(),
        stan: request.get_str(fields::STAN).unwrap_or(""),
        rrn: request.get_str(fields::RRN).unwrap_or(""),
        terminal: request.get_str(fields::TERMINAL).unwrap_or(""),
        amount_minor: request
            .get(fields::AMOUNT)
            .and_then(|a| AmountMinor::parse(a).ok())
            .map_or(0, |a| a.get()),
        code: response.get_str(fields::RESPONSE_CODE).unwrap_or(""),
        approval_code: response.get_str(fields::APPROVAL_CODE),
        original: request.get_str(fields::ORIGINAL_DATA),
        pan: request
            .get(fields::PAN)
            .and_then(|p| Pan::parse(p).ok())
            .map(|p| p.to_string()),
    };
    let mut text = serde_json::to_vec(&line).ok()?;
    text.push(b'\n');
    Some(text)
}

/// Appends ledger lines to `path` until every sender is gone, flushing whenever the queue
/// is empty (so a reader sees lines within moments of the answer).
fn start_ledger(path: &std::path::Path) -> anyhow::Result<(mpsc::Sender<Vec<u8>>, JoinHandle<()>)> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening the ledger {}", path.display()))?;
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(LEDGER_QUEUE);
    let writer = tokio::task::spawn_blocking(move || {
        let mut out = std::io::BufWriter::new(file);
        while let Some(line) = rx.blocking_recv() {
            let mut ok = out.write_all(&line).is_ok();
            while let Ok(more) = rx.try_recv() {
                ok &= out.write_all(&more).is_ok();
            }
            if !ok || out.flush().is_err() {
                eprintln!("acquirer-sim: cannot write the ledger");
                return;
            }
        }
    });
    Ok((tx, writer))
}

impl SimHandler {
    fn answer(&self, frame: &Bytes) -> Option<(Message, Duration, Option<Vec<u8>>)> {
        let (request, error) = Message::decode_prefix(frame.clone()).ok()?;
        let (response, code) = self.issuer.respond(
            &request,
            error,
            UtcDateTime::from_system_time(SystemTime::now()),
        )?;
        self.stats.record(kind(request.mti()), code);
        let delay = self
            .latency
            .sample(seeded_hash(self.seed, &[b"latency", frame]))
            + Duration::from_micros(self.extra_delay_us.load(Ordering::Relaxed));
        let line = self
            .ledger
            .as_ref()
            .and_then(|_| ledger_line(&request, &response));
        Some((response, delay, line))
    }
}

impl Handler for SimHandler {
    fn handle(
        self: Arc<Self>,
        frame: Bytes,
    ) -> impl std::future::Future<Output = Reply> + Send + 'static {
        let answer = self.answer(&frame);
        if answer.is_none() {
            self.stats.unanswerable.fetch_add(1, Ordering::Relaxed);
        }
        let ledger = self.ledger.clone();
        async move {
            match answer {
                Some((response, delay, line)) => {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    // In the books before the answer leaves.
                    if let (Some(ledger), Some(line)) = (ledger, line) {
                        let _ = ledger.send(line).await;
                    }
                    Reply::Message(response)
                }
                None => Reply::Close(codes::GARBAGE_FRAME),
            }
        }
    }
}

/// A simulator serving in the background. Dropping it stops it too (without waiting).
#[derive(Debug)]
pub struct RunningSim {
    /// Where QUIC is served.
    pub quic_addr: SocketAddr,
    /// Where TCP is served, if it is.
    pub tcp_addr: Option<SocketAddr>,
    /// The server's certificate (leaf), for clients to trust with `ClientTrust::Roots`.
    pub certificate: CertificateDer<'static>,
    /// Counters.
    pub stats: Arc<SimStats>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    ledger_writer: Option<JoinHandle<()>>,
    extra_delay_us: Arc<AtomicU64>,
}

/// How long a stopping simulator waits for its ledger's last lines to be written.
const LEDGER_DRAIN: Duration = Duration::from_secs(5);

impl RunningSim {
    /// Adds `delay` to every answer from now on (on top of the configured latency).
    pub fn set_delay(&self, delay: Duration) {
        self.extra_delay_us
            .store(delay.as_micros() as u64, Ordering::Relaxed);
    }

    /// Stops accepting, closes connections, waits for the accept loops to end and for the
    /// ledger to be written out.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
        if let Some(writer) = self.ledger_writer.take() {
            let _ = tokio::time::timeout(LEDGER_DRAIN, writer).await;
        }
    }
}

impl Drop for RunningSim {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn check_config(config: &SimConfig) -> anyhow::Result<()> {
    let name_ok = config
        .name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    ensure!(
        !config.name.is_empty() && config.name.len() <= MAX_NAME_LEN && name_ok,
        "acquirer name must be 1 to {MAX_NAME_LEN} of A-Z a-z 0-9 - _ ."
    );
    ensure!(
        (0.0..=1.0).contains(&config.approval_rate),
        "approval rate must be between 0 and 1"
    );
    Ok(())
}

/// Binds the listeners and serves in the background.
pub async fn start(mut config: SimConfig) -> anyhow::Result<RunningSim> {
    check_config(&config)?;
    let identity = match config.identity.take() {
        Some(identity) => identity,
        None => TlsIdentity::self_signed(&["localhost", "127.0.0.1"])?,
    };
    let certificate = identity
        .certs
        .first()
        .cloned()
        .context("the identity has no certificate")?;
    let listeners = Listeners::bind(&config, identity).await?;
    let stats = Arc::new(SimStats::default());
    let (ledger, ledger_writer) = match &config.ledger {
        Some(path) => {
            let (tx, writer) = start_ledger(path)?;
            (Some(tx), Some(writer))
        }
        None => (None, None),
    };
    let extra_delay_us = Arc::new(AtomicU64::new(0));
    let handler = SimHandler {
        ledger,
        extra_delay_us: Arc::clone(&extra_delay_us),
        issuer: Issuer::new(config.seed, config.approval_rate, &config.name),
        seed: config.seed,
        latency: LatencyModel {
            median: config.latency_median,
            max: config.latency_max,
            delay: config.delay,
        },
        stats: Arc::clone(&stats),
    };
    let shutdown = CancellationToken::new();
    let (quic_addr, tcp_addr) = (listeners.quic_addr, listeners.tcp_addr);
    let tasks = listeners.serve(Arc::new(handler), config.limits, &stats, &shutdown);
    Ok(RunningSim {
        quic_addr,
        tcp_addr,
        certificate,
        stats,
        shutdown,
        tasks,
        ledger_writer,
        extra_delay_us,
    })
}

/// The simulator's bound listeners: QUIC, and TCP when asked for.
struct Listeners {
    endpoint: quinn::Endpoint,
    quic_addr: SocketAddr,
    tcp: Option<tokio::net::TcpListener>,
    tcp_addr: Option<SocketAddr>,
}

impl Listeners {
    async fn bind(config: &SimConfig, identity: TlsIdentity) -> anyhow::Result<Listeners> {
        let endpoint = quic::server_endpoint(config.quic_listen, identity)
            .with_context(|| format!("QUIC listen on {}", config.quic_listen))?;
        let quic_addr = endpoint.local_addr()?;
        let tcp = match config.tcp_listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("TCP listen on {addr}"))?,
            ),
            None => None,
        };
        let tcp_addr = tcp.as_ref().map(|l| l.local_addr()).transpose()?;
        Ok(Listeners {
            endpoint,
            quic_addr,
            tcp,
            tcp_addr,
        })
    }

    /// Serves each listener with `handler` until `shutdown`: the accept loops' tasks.
    fn serve(
        self,
        handler: Arc<SimHandler>,
        limits: Limits,
        stats: &SimStats,
        shutdown: &CancellationToken,
    ) -> Vec<JoinHandle<()>> {
        let mut tasks = vec![tokio::spawn(serve_quic(
            self.endpoint,
            Arc::clone(&handler),
            limits,
            Arc::clone(&stats.serve),
            shutdown.clone(),
        ))];
        if let Some(listener) = self.tcp {
            tasks.push(tokio::spawn(serve_tcp(
                listener,
                handler,
                limits,
                Arc::clone(&stats.serve),
                shutdown.clone(),
            )));
        }
        tasks
    }
}

/// Until Ctrl-C or, on Unix, SIGTERM.
async fn wait_for_stop() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C"),
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")
}

/// Runs the simulator until Ctrl-C or SIGTERM.
pub async fn run(args: SimArgs) -> anyhow::Result<()> {
    let config = SimConfig::try_from(args)?;
    let certificate = if config.identity.is_some() {
        "certificate from --cert"
    } else {
        "self-signed certificate for localhost"
    };
    let settings = format!(
        "seed {}, approval rate {}, latency median {} us (max {} us) + {} ms, {certificate}",
        config.seed,
        config.approval_rate,
        config.latency_median.as_micros(),
        config.latency_max.as_micros(),
        config.delay.as_millis(),
    );
    let name = config.name.clone();
    let sim = start(config).await?;
    let tcp = sim
        .tcp_addr
        .map(|addr| format!(" and TCP {addr}"))
        .unwrap_or_default();
    println!(
        "acquirer-sim {name}: listening on QUIC {}{tcp}; {settings}",
        sim.quic_addr
    );
    wait_for_stop().await?;
    sim.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use rand::Rng;

    use super::*;
    use crate::cards::{
        authorization, CardPool, RrnGenerator, StanCounter, Terminal, DEFAULT_BINS,
    };

    fn today() -> UtcDateTime {
        UtcDateTime::from_unix_seconds(1_795_609_845) // 2026-11-25
    }

    /// A builder holding all of `request`'s fields, to change some.
    fn rebuild(request: &Message) -> payswitch_protocol::MessageBuilder {
        let numbers: Vec<u8> = request.field_numbers().collect();
        let mut builder = Message::builder(request.mti());
        builder.copy_from(request, &numbers).unwrap();
        builder
    }

    fn requests(n: usize) -> Vec<Message> {
        let pool = CardPool::new(50, &DEFAULT_BINS, 9, today()).unwrap();
        let terminal = Terminal::synthetic(1);
        let mut stans = StanCounter::new();
        let mut rrns = RrnGenerator::new();
        let mut rng = StdRng::seed_from_u64(5);
        (0..n)
            .map(|_| {
                let card = pool.pick(&mut rng);
                let amount = rng.gen_range(100..200_000);
                let rrn = rrns.next_rrn();
                authorization(card, amount, &terminal, stans.next_stan(), &rrn, today()).unwrap()
            })
            .collect()
    }

    #[test]
    fn same_request_same_decision_whatever_the_order() {
        let requests = requests(500);
        let a = Issuer::new(7, 0.7, "a");
        let b = Issuer::new(7, 0.7, "b");
        let forward: Vec<_> = requests.iter().map(|r| a.decide(r, today())).collect();
        let mut backward: Vec<_> = requests
            .iter()
            .rev()
            .map(|r| b.decide(r, today()))
            .collect();
        backward.reverse();
        assert_eq!(forward, backward);
        let approved = forward.iter().filter(|c| c.is_approved()).count();
        assert!((250..450).contains(&approved), "{approved} of 500 at 0.7");
        let other_seed: Vec<_> = requests
            .iter()
            .map(|r| Issuer::new(8, 0.7, "a").decide(r, today()))
            .collect();
        assert_ne!(forward, other_seed);
    }

    #[test]
    fn approval_rate_bounds_are_exact() {
        let requests = requests(200);
        let never = Issuer::new(1, 0.0, "x");
        let always = Issuer::new(1, 1.0, "x");
        for r in &requests {
            assert_ne!(never.decide(r, today()), ResponseCode::Approved);
            let limit = always.card_limit_minor(&Pan::parse(r.get(2).unwrap()).unwrap());
            let amount = AmountMinor::parse(r.get(4).unwrap()).unwrap().get();
            let expected = if amount > limit {
                ResponseCode::InsufficientFunds
            } else {
                ResponseCode::Approved
            };
            assert_eq!(always.decide(r, today()), expected);
        }
    }

    #[test]
    fn card_limits_stay_in_range_and_depend_on_the_seed() {
        let pool = CardPool::new(200, &DEFAULT_BINS, 3, today()).unwrap();
        let (a, b) = (Issuer::new(1, 1.0, "x"), Issuer::new(2, 1.0, "x"));
        let mut differ = 0;
        for card in pool.cards() {
            let limit = a.card_limit_minor(&card.pan);
            assert!((CARD_LIMIT_MIN_MINOR..=CARD_LIMIT_MAX_MINOR).contains(&limit));
            assert_eq!(limit, a.card_limit_minor(&card.pan));
            differ += usize::from(limit != b.card_limit_minor(&card.pan));
        }
        assert!(differ > 150);
    }

    #[test]
    fn expiry_is_compared_by_month() {
        assert_eq!(parse_expiry(b"2611"), Some(2026 * 12 + 10));
        assert_eq!(parse_expiry(b"2613"), None);
        assert_eq!(parse_expiry(b"2600"), None);
        assert_eq!(parse_expiry(b"26A1"), None);
        let request = &requests(1)[0];
        let issuer = Issuer::new(1, 1.0, "x");
        let with_expiry = |yymm: &str| {
            let mut b = rebuild(request);
            b.set_str(fields::EXPIRY, yymm).unwrap();
            b.set_str(fields::AMOUNT, "000000000100").unwrap();
            issuer.decide(&b.build(), today())
        };
        assert_eq!(with_expiry("2610"), ResponseCode::ExpiredCard);
        assert_eq!(
            with_expiry("2611"),
            ResponseCode::Approved,
            "valid through its month"
        );
        assert_eq!(with_expiry("2613"), ResponseCode::FormatError);
    }

    #[test]
    fn responses_echo_fields_and_tag_the_acquirer() {
        let request = &requests(1)[0];
        let issuer = Issuer::new(1, 1.0, "acq-a");
        let mut b = rebuild(request);
        b.set_str(fields::AMOUNT, "000000000100").unwrap();
        let request = b.build();
        let (response, code) = issuer.respond(&request, None, today()).unwrap();
        assert_eq!(code, ResponseCode::Approved);
        assert_eq!(response.mti(), Mti::AUTHORIZATION_RESPONSE);
        for n in fields::ECHOED {
            assert_eq!(response.get(n), request.get(n), "field {n}");
        }
        assert_eq!(response.get_str(39), Some("00"));
        assert_eq!(response.get(38).map(<[u8]>::len), Some(6));
        assert_eq!(response.get_str(48), Some("acquirer=acq-a"));
        let again = issuer.respond(&request, None, today()).unwrap().0;
        assert_eq!(again.get(38), response.get(38));
    }

    #[test]
    fn malformed_and_unsupported_requests() {
        let request = &requests(1)[0];
        let issuer = Issuer::new(1, 1.0, "x");
        let mut missing = Message::builder(Mti::AUTHORIZATION_REQUEST);
        missing
            .copy_from(request, &[2, 3, 4, 7, 11, 37, 41, 42])
            .unwrap();
        assert_eq!(
            issuer.decide(&missing.build(), today()),
            ResponseCode::FormatError
        );
        let mut bad_luhn = rebuild(request);
        bad_luhn.set_str(2, "4000000000000001").unwrap();
        assert_eq!(
            issuer.decide(&bad_luhn.build(), today()),
            ResponseCode::InvalidCardNumber
        );
        let mut other = Message::builder(Mti::parse(b"0300").unwrap());
        other.copy_from(request, &fields::ECHOED).unwrap();
        let (response, code) = issuer.respond(&other.build(), None, today()).unwrap();
        assert_eq!(
            (response.mti().as_str(), code),
            ("0310", ResponseCode::InvalidTransaction)
        );
        let response_mti = Message::builder(Mti::AUTHORIZATION_RESPONSE).build();
        assert!(issuer.respond(&response_mti, None, today()).is_none());
    }

    #[test]
    fn latency_is_deterministic_and_capped() {
        let model = LatencyModel {
            median: Duration::from_micros(500),
            max: Duration::from_millis(2),
            delay: Duration::from_millis(10),
        };
        for hash in 0..1000u64 {
            let d = model.sample(hash);
            assert_eq!(d, model.sample(hash));
            assert!(d >= model.delay && d <= model.delay + model.max);
        }
    }
}
