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
//!
//! [[routes]]
//! bins = ["4", "222100-272099"] # BIN prefixes or inclusive ranges of equal length
//! currencies = [840, 978]       # optional
//! mccs = ["5411", "5812-5814"]  # optional
//! acquirers = ["north", "south"] # tried in order
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use crate::acquirer::{AcquirerConfig, MAX_IN_FLIGHT_PER_LINK};
pub use crate::routing::RouteConfig;
use thiserror::Error;

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
    pub journal: crate::journal::JournalConfig,
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
    /// Requests one gateway stream may have in progress.
    pub max_in_flight_per_stream: usize,
    /// Open gateway connections per listener.
    pub max_connections: usize,
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
            max_connections: limits.max_connections,
            metrics: true,
        }
    }
}

impl PipelineConfig {
    /// Shard count with 0 resolved to the number of cores.
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
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        config.check()?;
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

    /// Checks what serde cannot: names are unique and resolve, limits are positive.
    pub fn check(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.listen.quic.is_none() && self.listen.tcp.is_none() {
            return invalid("no listener: set listen.quic or listen.tcp".into());
        }
        if self.acquirers.is_empty() {
            return invalid("no acquirer configured".into());
        }
        for (i, a) in self.acquirers.iter().enumerate() {
            if self.acquirers[..i].iter().any(|b| b.name == a.name) {
                return invalid(format!("acquirer {:?} is defined twice", a.name));
            }
            if a.timeout_ms == 0 || a.max_in_flight == 0 {
                return invalid(format!(
                    "acquirer {:?}: timeout_ms and max_in_flight must be > 0",
                    a.name
                ));
            }
            if a.max_in_flight > MAX_IN_FLIGHT_PER_LINK {
                return invalid(format!(
                    "acquirer {:?}: max_in_flight above {}",
                    a.name, MAX_IN_FLIGHT_PER_LINK
                ));
            }
        }
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
        let p = &self.pipeline;
        if p.shard_queue_depth == 0 || p.max_in_flight_per_stream == 0 || p.max_connections == 0 {
            return invalid("pipeline limits must be > 0".into());
        }
        if p.max_frame < 64 || p.max_frame > usize::from(u16::MAX) {
            return invalid("pipeline.max_frame must be within 64..=65535".into());
        }
        self.router().map(|_| ())
    }

    /// The routing table of this configuration's acquirers and routes.
    pub fn router(&self) -> Result<crate::routing::Router, ConfigError> {
        let names: Vec<&str> = self.acquirers.iter().map(|a| a.name.as_str()).collect();
        crate::routing::Router::new(&names, &self.routes).map_err(ConfigError::Invalid)
    }
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

    #[test]
    fn unknown_keys_are_refused() {
        let text = EXAMPLE.replace("timeout_ms = 500", "timeout = 500");
        assert!(matches!(parse(&text), Err(ConfigError::Parse { .. })));
    }
}
