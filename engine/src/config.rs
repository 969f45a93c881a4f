//! The switch's configuration: a TOML file (`payswitch serve --config FILE`), or the same
//! structure built from quick-start flags.
//!
//! ```toml
//! [listen]
//! quic = "0.0.0.0:8583"
//! tcp = "0.0.0.0:8584"          # optional: plain TCP for legacy gateways
//! admin = "127.0.0.1:9583"
//!
//! [tls]                          # optional: a self-signed certificate is made without it
//! cert = "certs/switch.pem"
//! key = "certs/switch.key"
//!
//! [[acquirers]]
//! name = "north"
//! address = "10.1.0.5:8583"
//! server_name = "north.acquirer.example"
//! ca = "certs/north-ca.pem"
//! timeout_ms = 2000
//! max_in_flight = 4096
//! [acquirers.breaker]            # optional; these are the defaults
//! stall_ms = 250                 # no answer this long with requests out: skip it
//! failure_percent = 50           # or this share of the last `window` outcomes failed
//! open_ms = 1000                 # then probe with one live authorization at a time
//!
//! [[routes]]
//! bins = ["4", "222100-272099"] # BIN prefixes or inclusive ranges of equal length
//! currencies = [840, 978]       # optional
//! mccs = ["5411", "5812-5814"]  # optional
//! acquirers = ["north", "south"] # tried in order
//! ```

use std::fmt::Display;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use crate::acquirer::{AcquirerConfig, MAX_IN_FLIGHT_PER_LINK, MAX_TIMEOUT_MS};
use crate::journal::writer::{
    JournalConfig, MAX_DUPLICATES, MAX_DUPLICATE_WINDOW_S, MAX_GROUP_COMMIT_WINDOW_US,
    MAX_QUEUE_DEPTH, MAX_SEGMENT_BYTES, MIN_SEGMENT_BYTES,
};
pub use crate::routing::RouteConfig;
use crate::scoring::ENTITY_STRIPES;
use thiserror::Error;

/// Most shards accepted (`pipeline.shards`). A shard is a task with its own queue and its
/// slice of the card state and the duplicate window; more shards than the largest servers'
/// cores (a few hundred) only thin those slices.
pub const MAX_SHARDS: usize = 1024;

/// Deepest shard queue accepted (`pipeline.shard_queue_depth`): 1 Mi requests is 10 s of
/// one shard's work at 100 k TPS, so the last of them would time out at the gateway long
/// before its turn.
pub const MAX_SHARD_QUEUE_DEPTH: usize = 1 << 20;

/// Smallest frame limit accepted (`pipeline.max_frame`): an 0800 echo test is about 40
/// bytes and an authorization request with its mandatory fields over 100.
pub const MIN_FRAME_LIMIT: usize = 64;

/// Largest frame limit accepted (`pipeline.max_frame`): what the 2-byte length header can
/// say.
pub const MAX_FRAME_LIMIT: usize = u16::MAX as usize;

/// Most requests in progress on one gateway stream (`pipeline.max_in_flight_per_stream`):
/// each holds its frame, so 64 Ki of 8 KiB frames is already 512 MiB for one stream.
pub const MAX_IN_FLIGHT_PER_STREAM: usize = 1 << 16;

/// Most requests in progress on one gateway connection, over all its streams
/// (`pipeline.max_in_flight_per_connection`): the same reasoning as per stream.
pub const MAX_IN_FLIGHT_PER_CONNECTION: usize = 1 << 16;

/// Most gateway connections per listener (`pipeline.max_connections`): each holds a socket
/// and its buffers (tens of KiB); a million is beyond one host's file descriptors.
pub const MAX_CONNECTIONS: usize = 1 << 20;

/// Largest scoring budget accepted (`scoring.budget_us`). Scoring runs in line on the
/// shard's task; 100 ms is far beyond any model (a 100-tree forest scores in about 1 µs)
/// and already a large share of a gateway's timeout.
pub const MAX_BUDGET_US: u64 = 100_000;

/// Most cards whose velocity is kept (`scoring.max_cards`): about 0.8 KiB a card, so
/// 100 M ≈ 80 GiB, more than a node has to give to velocity state (and far under the
/// velocity tables' u32 slot indexes).
pub const MAX_CARDS: usize = 100_000_000;

/// Most merchants, and as many terminals, whose velocity is kept (`scoring.max_entities`):
/// about 0.8 KiB each, so 10 M of each ≈ 16 GiB together.
pub const MAX_ENTITIES: usize = 10_000_000;

/// Errors reading or checking a configuration.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this structure.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<toml::de::Error>,
    },
    /// The configuration is well formed but inconsistent.
    #[error("{0}")]
    Invalid(String),
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listening addresses.
    pub listen: ListenConfig,
    /// The switch's TLS identity; self-signed when absent.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Sizes and limits of the pipeline.
    #[serde(default)]
    pub pipeline: PipelineConfig,
    /// Fraud scoring: models, rules, budget.
    #[serde(default)]
    pub scoring: ScoringConfig,
    /// The journal, duplicate detection and reversals.
    #[serde(default)]
    pub journal: JournalConfig,
    /// Several nodes on NATS JetStream; absent: one node, its local journal alone.
    #[serde(default)]
    pub cluster: Option<crate::cluster::ClusterConfig>,
    /// Acquirers the switch forwards to.
    #[serde(default)]
    pub acquirers: Vec<AcquirerConfig>,
    /// Routing rules, first match wins. Empty: every card goes to the acquirers in order.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Bearer token for the admin API's mutating calls (model deploy). Without one they
    /// are refused. `PAYSWITCH_ADMIN_TOKEN` in the environment overrides it.
    #[serde(default)]
    pub admin_token: Option<String>,
    /// Accept any acquirer certificate. Only the quick-start flags set this; the switch
    /// prints a warning when it is on.
    #[serde(default)]
    pub insecure_acquirers: bool,
    /// The file this configuration was read from, for `POST /api/routes/reload`.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// Listening addresses.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// QUIC (UDP) ingress for gateways.
    pub quic: Option<SocketAddr>,
    /// Plain TCP ingress with the same framing.
    pub tcp: Option<SocketAddr>,
    /// Admin HTTP: `/health`. Bind to localhost unless it sits behind a proxy.
    pub admin: Option<SocketAddr>,
}

/// PEM files of the switch's certificate chain and key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
    /// CA certificate(s) (PEM) gateways' client certificates must chain to. When set,
    /// every gateway connection, QUIC and TCP, needs one, and the TCP listener speaks TLS.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// Gateway names (DNS names in their certificates) allowed to connect; empty: any
    /// certificate `client_ca` issued.
    #[serde(default)]
    pub allowed_clients: Vec<String>,
}

/// Sizes and limits of the pipeline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Number of shards; 0 means one per core.
    pub shards: usize,
    /// Requests waiting for one shard; a full queue answers 91 at once.
    pub shard_queue_depth: usize,
    /// Largest frame accepted from a gateway, in bytes.
    pub max_frame: usize,
    /// Requests one gateway stream may have in progress; more are answered 91 at once.
    pub max_in_flight_per_stream: usize,
    /// Requests one gateway connection may have in progress over all its streams; more
    /// are answered 91 at once.
    pub max_in_flight_per_connection: usize,
    /// Open gateway connections per listener.
    pub max_connections: usize,
    /// Open gateway connections per listener from one IP address.
    pub max_connections_per_peer: usize,
    /// Seconds a TCP gateway connection may stay idle (nothing in progress, no frame)
    /// before it is closed (QUIC has its transport's idle timeout and keep-alives).
    /// `tcp_idle_timeout_s`, its earlier name, is read as well.
    #[serde(alias = "tcp_idle_timeout_s")]
    pub idle_timeout_s: u64,
    /// Seconds a frame may take from its first byte to its last, and a gateway to take a
    /// write of its answers, before its stream (TCP: its connection) is closed.
    pub stall_timeout_s: u64,
    /// Requests one gateway (a client certificate, or an IP address without one) may have
    /// in progress over all its connections to a listener; more are answered 91 at once.
    pub max_in_flight_per_gateway: usize,
    /// Requests a second one gateway may start (a second's worth as a burst); more are
    /// answered 91 at once. 0: no rate bound.
    pub max_rate_per_gateway: u32,
    /// Record latency histograms per stage (turn off only to measure what they cost).
    pub metrics: bool,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        let limits = payswitch_net::Limits::default();
        PipelineConfig {
            shards: 0,
            // 4096 requests is ~40 ms of work for one shard at 100k TPS: deep enough to ride
            // out a scheduling hiccup, short enough that a request never waits long enough
            // to time out at the gateway.
            shard_queue_depth: 4096,
            max_frame: limits.max_frame,
            max_in_flight_per_stream: limits.max_in_flight_per_stream,
            max_in_flight_per_connection: limits.max_in_flight_per_connection,
            max_connections: limits.max_connections,
            max_connections_per_peer: limits.max_connections_per_peer,
            idle_timeout_s: limits.idle_timeout.as_secs(),
            stall_timeout_s: limits.stall_timeout.as_secs(),
            max_in_flight_per_gateway: limits.max_in_flight_per_gateway,
            max_rate_per_gateway: limits.max_rate_per_gateway,
            metrics: true,
        }
    }
}

impl PipelineConfig {
    /// Shard count with 0 resolved to the number of cores: never 0.
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            return self.shards;
        }
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// Fraud scoring.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScoringConfig {
    /// The champion model file; without one every authorization is approved by the model
    /// step (rules still apply).
    pub model: Option<PathBuf>,
    /// Challenger model files, scored in shadow.
    pub challengers: Vec<PathBuf>,
    /// The rules file, hot-reloaded.
    pub rules: Option<PathBuf>,
    /// A directory watched for `champion.pswm` and `challenger-*.pswm`, deployed when
    /// they appear or change.
    pub models_dir: Option<PathBuf>,
    /// Budget for features + model + rules per authorization, microseconds. A model whose
    /// worst case exceeds it is refused at load; a scoring that exceeds it is counted and
    /// decided by the rules alone.
    pub budget_us: u64,
    /// The time velocity windows use: `transmission` (field 7, the default; never more than
    /// five minutes ahead of the switch's clock, the clock when field 7 is unusable) or
    /// `clock` (the switch's clock, where gateways' clocks are not trusted).
    pub event_time: crate::scoring::EventTime,
    /// Cards whose velocity is kept, over all shards (least recently seen evicted).
    pub max_cards: usize,
    /// Merchants kept, and as many terminals.
    pub max_entities: usize,
}

impl Default for ScoringConfig {
    fn default() -> Self {
        ScoringConfig {
            model: None,
            challengers: Vec::new(),
            rules: None,
            models_dir: None,
            budget_us: 1_000,
            event_time: crate::scoring::EventTime::default(),
            // About 0.8 KiB a card: 1 M cards ≈ 0.8 GiB, the working set of a large issuer
            // portfolio's active day on one node.
            max_cards: 1_000_000,
            // Merchants and terminals: 100 k each ≈ 160 MiB together.
            max_entities: 100_000,
        }
    }
}

impl Config {
    /// Reads and checks a TOML file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let config = Config::read_file(path)?;
        config.check()?;
        Ok(config)
    }

    /// Reads the file without checking it as a whole: for a caller that completes it
    /// (command-line flags over the file) and checks it then.
    pub fn read_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        Ok(Config {
            source: Some(path.to_owned()),
            ..config
        })
    }

    /// Checks that every acquirer has a CA to verify it with, unless the quick-start
    /// `insecure_acquirers` is on. (Kept apart from `check` so that tests and the demo can
    /// hand in certificates they made in memory.)
    pub fn check_acquirer_trust(&self) -> Result<(), ConfigError> {
        match self.acquirers.iter().find(|a| a.ca.is_none()) {
            Some(a) if !self.insecure_acquirers => Err(ConfigError::Invalid(format!(
                "acquirer {:?}: no `ca` to verify its certificate with",
                a.name
            ))),
            _ => Ok(()),
        }
    }

    /// Checks what serde cannot: names are unique and resolve, and every limit is within
    /// its range. The code that uses a limit asserts what this guarantees; it never clamps.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.listen.quic.is_none() && self.listen.tcp.is_none() {
            return invalid("no listener: set listen.quic or listen.tcp");
        }
        // The admin API speaks plain HTTP with a bearer token: off the loopback interface
        // the token would cross the network in clear. A TLS-terminating proxy on the same
        // host is the way to reach it from elsewhere.
        if let Some(admin) = self.listen.admin {
            if !admin.ip().is_loopback() {
                return invalid(format!(
                    "listen.admin = {admin}: the admin API is plain HTTP, so it binds a loopback address only; put a TLS-terminating proxy in front of it to reach it from elsewhere"
                ));
            }
        }
        self.check_acquirers()?;
        self.check_routes()?;
        self.pipeline.check()?;
        if let Some(cluster) = &self.cluster {
            if !self.journal.enabled {
                return invalid("[cluster] needs the journal: journal.enabled = true");
            }
            cluster.check().map_err(ConfigError::Invalid)?;
        }
        let shards = self.pipeline.shard_count();
        self.scoring.check(shards)?;
        check_journal(&self.journal, shards)?;
        self.router().map(|_| ())
    }

    fn check_acquirers(&self) -> Result<(), ConfigError> {
        if self.acquirers.is_empty() {
            return invalid("no acquirer configured");
        }
        for (i, a) in self.acquirers.iter().enumerate() {
            if self.acquirers[..i].iter().any(|b| b.name == a.name) {
                return invalid(format!("acquirer {:?} is defined twice", a.name));
            }
            let key = |name: &str| format!("acquirer {:?}: {name}", a.name);
            within(&key("timeout_ms"), a.timeout_ms, 1..=MAX_TIMEOUT_MS)?;
            within_because(
                &key("max_in_flight"),
                a.max_in_flight,
                1..=MAX_IN_FLIGHT_PER_LINK,
                "beyond it a switch STAN could come round while its request is open",
            )?;
            if let Err(reason) = a.breaker.check() {
                return invalid(key(&reason));
            }
        }
        Ok(())
    }

    fn check_routes(&self) -> Result<(), ConfigError> {
        for (i, route) in self.routes.iter().enumerate() {
            if route.acquirers.is_empty() {
                return invalid(format!("route {i}: no acquirers"));
            }
            for name in &route.acquirers {
                if !self.acquirers.iter().any(|a| &a.name == name) {
                    return invalid(format!("route {i}: unknown acquirer {name:?}"));
                }
            }
        }
        Ok(())
    }

    /// The routing table of this configuration's acquirers and routes.
    pub fn router(&self) -> Result<crate::routing::Router, ConfigError> {
        let names: Vec<&str> = self.acquirers.iter().map(|a| a.name.as_str()).collect();
        crate::routing::Router::new(&names, &self.routes).map_err(ConfigError::Invalid)
    }
}

impl PipelineConfig {
    fn check(&self) -> Result<(), ConfigError> {
        within_because(
            "pipeline.shards",
            self.shards,
            0..=MAX_SHARDS,
            "0: one per core",
        )?;
        within(
            "pipeline.shard_queue_depth",
            self.shard_queue_depth,
            1..=MAX_SHARD_QUEUE_DEPTH,
        )?;
        within(
            "pipeline.max_frame",
            self.max_frame,
            MIN_FRAME_LIMIT..=MAX_FRAME_LIMIT,
        )?;
        within(
            "pipeline.max_in_flight_per_stream",
            self.max_in_flight_per_stream,
            1..=MAX_IN_FLIGHT_PER_STREAM,
        )?;
        within(
            "pipeline.max_in_flight_per_connection",
            self.max_in_flight_per_connection,
            1..=MAX_IN_FLIGHT_PER_CONNECTION,
        )?;
        within(
            "pipeline.max_connections",
            self.max_connections,
            1..=MAX_CONNECTIONS,
        )?;
        within(
            "pipeline.max_connections_per_peer",
            self.max_connections_per_peer,
            1..=self.max_connections,
        )?;
        within(
            "pipeline.max_in_flight_per_gateway",
            self.max_in_flight_per_gateway,
            1..=MAX_IN_FLIGHT_PER_CONNECTION * MAX_CONNECTIONS,
        )?;
        within(
            "pipeline.max_rate_per_gateway",
            self.max_rate_per_gateway,
            0..=10_000_000,
        )?;
        within("pipeline.idle_timeout_s", self.idle_timeout_s, 1..=86_400)?;
        within("pipeline.stall_timeout_s", self.stall_timeout_s, 1..=3_600)
    }
}

impl ScoringConfig {
    /// Checks the limits, the per-shard ones against `shards` shards.
    fn check(&self, shards: usize) -> Result<(), ConfigError> {
        within("scoring.budget_us", self.budget_us, 1..=MAX_BUDGET_US)?;
        within_because(
            "scoring.max_cards",
            self.max_cards,
            shards..=MAX_CARDS,
            &format!("at least one per shard, {shards} shards"),
        )?;
        within_because(
            "scoring.max_entities",
            self.max_entities,
            ENTITY_STRIPES..=MAX_ENTITIES,
            "at least one per lock stripe",
        )
    }
}

/// Checks the journal's limits, the per-shard ones against `shards` shards. Checked even
/// when the journal is off: the duplicate window is kept in memory regardless, and a typo
/// should not wait for the day the journal is turned on.
fn check_journal(journal: &JournalConfig, shards: usize) -> Result<(), ConfigError> {
    if let Some(key_file) = &journal.pan_key_file {
        // Inside the journal's directory, a copy of the journal would take its key along.
        let dir = std::path::absolute(&journal.dir).unwrap_or_else(|_| journal.dir.clone());
        let file = std::path::absolute(key_file).unwrap_or_else(|_| key_file.clone());
        if file.starts_with(&dir) {
            return invalid(format!(
                "journal.pan_key_file {} is inside the journal directory {}: keep it apart",
                key_file.display(),
                journal.dir.display()
            ));
        }
    }
    within(
        "journal.group_commit_window_us",
        journal.group_commit_window_us,
        0..=MAX_GROUP_COMMIT_WINDOW_US,
    )?;
    within(
        "journal.segment_bytes",
        journal.segment_bytes,
        MIN_SEGMENT_BYTES..=MAX_SEGMENT_BYTES,
    )?;
    within(
        "journal.queue_depth",
        journal.queue_depth,
        1..=MAX_QUEUE_DEPTH,
    )?;
    within(
        "journal.duplicate_window_s",
        journal.duplicate_window_s,
        1..=MAX_DUPLICATE_WINDOW_S,
    )?;
    within_because(
        "journal.max_duplicates",
        journal.max_duplicates,
        shards..=MAX_DUPLICATES,
        &format!("at least one per shard, {shards} shards"),
    )?;
    if journal.retention_days > 0 {
        within_because(
            "journal.retention_days",
            journal.retention_days,
            1..=36_500,
            "0 keeps everything; otherwise at least a day, longer than the duplicate window and the velocity a start replays",
        )?;
    }
    Ok(())
}

fn invalid(message: impl Into<String>) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid(message.into()))
}

/// `Ok` when `value`, the value of `key`, is within `range`; else an error naming the key,
/// the value and the range.
fn within<T: PartialOrd + Display>(
    key: &str,
    value: T,
    range: RangeInclusive<T>,
) -> Result<(), ConfigError> {
    within_because(key, value, range, "")
}

/// `within`, with `why` the range is what it is (when it depends on other keys) added to
/// the error.
fn within_because<T: PartialOrd + Display>(
    key: &str,
    value: T,
    range: RangeInclusive<T>,
    why: &str,
) -> Result<(), ConfigError> {
    if range.contains(&value) {
        return Ok(());
    }
    let why = if why.is_empty() {
        String::new()
    } else {
        format!(" ({why})")
    };
    invalid(format!(
        "{key} = {value} is out of range: allowed {}..={}{why}",
        range.start(),
        range.end()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "test.toml".into(),
            source: Box::new(e),
        })?;
        config.check()?;
        Ok(config)
    }

    const EXAMPLE: &str = r#"
        [listen]
        quic = "127.0.0.1:8583"
        admin = "127.0.0.1:9583"
        [[acquirers]]
        name = "north"
        address = "127.0.0.1:9001"
        ca = "north.pem"
        [[acquirers]]
        name = "south"
        address = "127.0.0.1:9002"
        ca = "south.pem"
        timeout_ms = 500
        [[routes]]
        bins = ["4", "222100-272099"]
        acquirers = ["north", "south"]
    "#;

    #[test]
    fn example_parses_with_defaults() {
        let config = parse(EXAMPLE).unwrap();
        assert_eq!(config.acquirers[0].timeout_ms, 2_000);
        assert_eq!(config.acquirers[1].timeout(), Duration::from_millis(500));
        assert_eq!(config.pipeline.shard_queue_depth, 4096);
        assert!(config.pipeline.shard_count() >= 1);
    }

    #[test]
    fn unknown_acquirer_in_route_is_refused() {
        let text = EXAMPLE.replace(
            r#"acquirers = ["north", "south"]"#,
            r#"acquirers = ["west"]"#,
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("unknown acquirer \"west\""), "{err}");
    }

    #[test]
    fn acquirer_without_ca_is_refused_outside_quick_start() {
        let text = EXAMPLE.replace("ca = \"south.pem\"", "");
        let err = parse(&text)
            .unwrap()
            .check_acquirer_trust()
            .unwrap_err()
            .to_string();
        assert!(err.contains("no `ca`"), "{err}");
    }

    #[test]
    fn the_admin_api_binds_loopback_only() {
        let exposed = EXAMPLE.replace("admin = \"127.0.0.1:9583\"", "admin = \"0.0.0.0:9583\"");
        let err = parse(&exposed).unwrap_err().to_string();
        assert!(err.contains("listen.admin = 0.0.0.0:9583"), "{err}");
        let v6 = EXAMPLE.replace("admin = \"127.0.0.1:9583\"", "admin = \"[::1]:9583\"");
        assert!(parse(&v6).is_ok());
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let text = include_str!("../../config/payswitch.example.toml");
        let config = parse(text).unwrap();
        assert_eq!(config.acquirers.len(), 2);
        assert_eq!(config.routes.len(), 2);
    }

    #[test]
    fn event_time_is_field_7_unless_the_clock_is_asked_for() {
        use crate::scoring::EventTime;
        let config = parse(EXAMPLE).unwrap();
        assert_eq!(config.scoring.event_time, EventTime::Transmission);
        let clock = parse(&format!("{EXAMPLE}\n[scoring]\nevent_time = \"clock\"\n")).unwrap();
        assert_eq!(clock.scoring.event_time, EventTime::Clock);
    }

    /// The error of `EXAMPLE` with `key = value` set in `[section]`.
    fn refusal(section: &str, key: &str, value: impl Display) -> String {
        let text = format!("{EXAMPLE}\n[{section}]\n{key} = {value}\n");
        parse(&text).unwrap_err().to_string()
    }

    /// Asserts that `section.key = value` is refused with an error naming the key, the value
    /// and `allowed` (the range, and why where it depends on other keys).
    fn assert_refused(section: &str, key: &str, value: impl Display, allowed: &str) {
        let err = refusal(section, key, &value);
        let expected = format!("{section}.{key} = {value} is out of range: allowed {allowed}");
        assert_eq!(err, expected);
    }

    #[test]
    fn pipeline_limits_out_of_range_are_refused() {
        let shards = format!("0..={MAX_SHARDS} (0: one per core)");
        assert_refused("pipeline", "shards", MAX_SHARDS + 1, &shards);
        let depth = format!("1..={MAX_SHARD_QUEUE_DEPTH}");
        assert_refused("pipeline", "shard_queue_depth", 0, &depth);
        assert_refused(
            "pipeline",
            "shard_queue_depth",
            MAX_SHARD_QUEUE_DEPTH + 1,
            &depth,
        );
        let frame = format!("{MIN_FRAME_LIMIT}..={MAX_FRAME_LIMIT}");
        assert_refused("pipeline", "max_frame", MIN_FRAME_LIMIT - 1, &frame);
        assert_refused("pipeline", "max_frame", MAX_FRAME_LIMIT + 1, &frame);
        let stream = format!("1..={MAX_IN_FLIGHT_PER_STREAM}");
        assert_refused("pipeline", "max_in_flight_per_stream", 0, &stream);
        let above = MAX_IN_FLIGHT_PER_STREAM + 1;
        assert_refused("pipeline", "max_in_flight_per_stream", above, &stream);
        let connections = format!("1..={MAX_CONNECTIONS}");
        assert_refused("pipeline", "max_connections", 0, &connections);
        assert_refused(
            "pipeline",
            "max_connections",
            MAX_CONNECTIONS + 1,
            &connections,
        );
    }

    #[test]
    fn scoring_limits_out_of_range_are_refused() {
        let budget = format!("1..={MAX_BUDGET_US}");
        assert_refused("scoring", "budget_us", 0, &budget);
        assert_refused("scoring", "budget_us", MAX_BUDGET_US + 1, &budget);
        let entities = format!("{ENTITY_STRIPES}..={MAX_ENTITIES} (at least one per lock stripe)");
        assert_refused("scoring", "max_entities", ENTITY_STRIPES - 1, &entities);
        assert_refused("scoring", "max_entities", MAX_ENTITIES + 1, &entities);
        let shards = parse(EXAMPLE).unwrap().pipeline.shard_count();
        let cards = format!("{shards}..={MAX_CARDS} (at least one per shard, {shards} shards)");
        assert_refused("scoring", "max_cards", 0, &cards);
        assert_refused("scoring", "max_cards", MAX_CARDS + 1, &cards);
    }

    #[test]
    fn journal_limits_out_of_range_are_refused() {
        let window = format!("0..={MAX_GROUP_COMMIT_WINDOW_US}");
        let above = MAX_GROUP_COMMIT_WINDOW_US + 1;
        assert_refused("journal", "group_commit_window_us", above, &window);
        let segment = format!("{MIN_SEGMENT_BYTES}..={MAX_SEGMENT_BYTES}");
        assert_refused("journal", "segment_bytes", MIN_SEGMENT_BYTES - 1, &segment);
        assert_refused("journal", "segment_bytes", MAX_SEGMENT_BYTES + 1, &segment);
        let depth = format!("1..={MAX_QUEUE_DEPTH}");
        assert_refused("journal", "queue_depth", 0, &depth);
        assert_refused("journal", "queue_depth", MAX_QUEUE_DEPTH + 1, &depth);
        let duplicates = format!("1..={MAX_DUPLICATE_WINDOW_S}");
        assert_refused("journal", "duplicate_window_s", 0, &duplicates);
        let above = MAX_DUPLICATE_WINDOW_S + 1;
        assert_refused("journal", "duplicate_window_s", above, &duplicates);
        let shards = parse(EXAMPLE).unwrap().pipeline.shard_count();
        let remembered =
            format!("{shards}..={MAX_DUPLICATES} (at least one per shard, {shards} shards)");
        assert_refused("journal", "max_duplicates", 0, &remembered);
        assert_refused("journal", "max_duplicates", MAX_DUPLICATES + 1, &remembered);
    }

    #[test]
    fn per_shard_limits_are_checked_against_the_configured_shards() {
        let eight_shards = format!("{EXAMPLE}\n[pipeline]\nshards = 8\n");
        let with = |section: &str, key: &str, value: usize| {
            parse(&format!("{eight_shards}[{section}]\n{key} = {value}\n"))
        };
        assert!(with("scoring", "max_cards", 8).is_ok());
        assert!(with("journal", "max_duplicates", 8).is_ok());
        let err = with("scoring", "max_cards", 7).unwrap_err().to_string();
        assert!(err.contains("(at least one per shard, 8 shards)"), "{err}");
        let err = with("journal", "max_duplicates", 7)
            .unwrap_err()
            .to_string();
        assert!(err.contains("journal.max_duplicates = 7"), "{err}");
    }

    #[test]
    fn acquirer_limits_out_of_range_are_refused() {
        let south = |key: &str, value: u64| {
            let text = EXAMPLE.replace("timeout_ms = 500", &format!("{key} = {value}"));
            parse(&text).unwrap_err().to_string()
        };
        let timeout = format!("1..={MAX_TIMEOUT_MS}");
        for value in [0, MAX_TIMEOUT_MS + 1] {
            let expected = format!(
                "acquirer \"south\": timeout_ms = {value} is out of range: allowed {timeout}"
            );
            assert_eq!(south("timeout_ms", value), expected);
        }
        for value in [0, MAX_IN_FLIGHT_PER_LINK as u64 + 1] {
            let err = south("max_in_flight", value);
            let expected = format!("acquirer \"south\": max_in_flight = {value} is out of range: allowed 1..={MAX_IN_FLIGHT_PER_LINK}");
            assert!(err.starts_with(&expected), "{err}");
        }
    }

    #[test]
    fn every_limit_at_its_bounds_is_accepted() {
        let text = format!(
            "{}\n[pipeline]\nshards = 1\nshard_queue_depth = {MAX_SHARD_QUEUE_DEPTH}\n\
             max_frame = {MIN_FRAME_LIMIT}\nmax_in_flight_per_stream = 1\n\
             max_connections = {MAX_CONNECTIONS}\n\
             [scoring]\nbudget_us = {MAX_BUDGET_US}\nmax_cards = 1\n\
             max_entities = {ENTITY_STRIPES}\n\
             [journal]\ngroup_commit_window_us = {MAX_GROUP_COMMIT_WINDOW_US}\n\
             segment_bytes = {MIN_SEGMENT_BYTES}\nqueue_depth = 1\n\
             duplicate_window_s = {MAX_DUPLICATE_WINDOW_S}\nmax_duplicates = 1\n",
            EXAMPLE
                .replace(
                    "timeout_ms = 500",
                    &format!("timeout_ms = {MAX_TIMEOUT_MS}")
                )
                .replace(
                    "ca = \"south.pem\"",
                    &format!("ca = \"south.pem\"\nmax_in_flight = {MAX_IN_FLIGHT_PER_LINK}")
                ),
        );
        let config = parse(&text).unwrap();
        assert_eq!(config.acquirers[1].max_in_flight, MAX_IN_FLIGHT_PER_LINK);
        assert_eq!(config.scoring.max_cards, 1);
    }

    #[test]
    fn the_defaults_pass_even_with_the_most_shards() {
        PipelineConfig::default().check().unwrap();
        ScoringConfig::default().check(MAX_SHARDS).unwrap();
        check_journal(&JournalConfig::default(), MAX_SHARDS).unwrap();
    }

    #[test]
    fn unknown_keys_are_refused() {
        let text = EXAMPLE.replace("timeout_ms = 500", "timeout = 500");
        assert!(matches!(parse(&text), Err(ConfigError::Parse { .. })));
    }
}
