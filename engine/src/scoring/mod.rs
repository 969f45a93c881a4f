//! Fraud scoring in the switch: features from the card's shard state, the champion model's
//! score, challengers in shadow, the risk team's rules, and the decision.
//!
//! Card velocity lives in the card's shard, so it is updated without locks. Merchants and
//! terminals see cards of every shard, so their state is shared, striped over
//! [`ENTITY_STRIPES`] mutexes by hash: a lock is held for one feature update (well under a
//! microsecond), and two shards contend only when their transactions hit the same stripe at
//! the same moment.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use payswitch_models::features::{
    self, CardVelocity, EntityVelocity, Features, Transaction, FEATURE_NAMES,
};
use payswitch_models::model::{Decision, Model};
use payswitch_protocol::{fields, Message, TransmissionTime};

pub mod rules;

use crate::ingress::validate::Authorization;
use rules::{Action, RuleSet};

/// Mutex stripes for merchant and terminal state: 64 keeps contention between a handful of
/// shards negligible while each stripe's table stays large.
pub const ENTITY_STRIPES: usize = 64;

/// Cost of one unit of `Model::max_cost` (a tree node visit or a weight), in nanoseconds,
/// measured with `payswitch model bench` on the reference machine with headroom: used to
/// refuse a model whose worst case cannot meet the scoring budget.
pub const NANOS_PER_COST_UNIT: u64 = 2;

/// Reason codes given per decline or review: three fit field 48 and a screen.
pub const REASON_CODES: usize = 3;

/// Variables the rules may use besides the features.
pub const MESSAGE_VARIABLES: [&str; 7] = [
    "amount_minor",
    "currency",
    "mcc",
    "country",
    "pos_entry_mode",
    "score",
    "hour_utc",
];

/// Which clock gives a transaction its time for the velocity windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventTime {
    /// The switch's clock, for operators who do not trust their gateways' clocks: no
    /// gateway can move a card's windows. A labeled file replayed through the switch then
    /// has its days pass in seconds, and its cards look like bursts to the model.
    Clock,
    /// Field 7 (transmission date and time), the default: when the gateway sent it, the
    /// timeline the model was trained on, live or replayed. Never later than the switch's
    /// clock plus [`MAX_EVENT_TIME_AHEAD_MS`]; a missing or unparseable field 7 takes the
    /// switch's clock.
    #[default]
    Transmission,
}

/// How far ahead of the switch's clock a transaction's field 7 time is believed: gateways'
/// clocks drift by seconds to a minute or two, and five minutes honours that. Beyond it the
/// time is held at the clock plus this much, so a gateway cannot push a card's windows
/// into the future (its transaction would count in the card's windows until then).
pub const MAX_EVENT_TIME_AHEAD_MS: i64 = 5 * 60 * 1000;

/// Field 7 has no year. It is read in the latest year that puts it at most this far ahead
/// of the switch's clock: a day covers any gateway clock error (a wrong time zone included,
/// at most 14 h), which [`MAX_EVENT_TIME_AHEAD_MS`] then holds back; a date further ahead is
/// last year's (31 December seen on 1 January, or a file replayed months later).
const FIELD_7_YEAR_LOOKAHEAD_MS: i64 = 24 * 60 * 60 * 1000;

/// Counters of scoring.
#[derive(Debug, Default)]
pub struct ScoringStats {
    /// Decisions: approve, review, decline.
    pub decisions: [AtomicU64; 3],
    /// Scorings that took longer than the budget.
    pub budget_breaches: AtomicU64,
    /// Challenger scorings, and how many agreed with the champion's decision.
    pub challenger_scored: AtomicU64,
    /// Of those, agreements.
    pub challenger_agreed: AtomicU64,
    /// Champion scores (model score, before rules), summed in millionths.
    pub champion_score_micros: AtomicU64,
    /// Champion scorings.
    pub champion_scored: AtomicU64,
}

/// A decision with what explains it.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// The decision.
    pub decision: Decision,
    /// The score after rules (`None` without a model).
    pub score: Option<f32>,
    /// The model that scored it.
    pub model: Option<Arc<Model>>,
    /// A rule that overrode the model's decision.
    pub rule: Option<String>,
    /// The features that pushed the score up most (reason codes), for declines and
    /// reviews only: an approval needs no explanation and costs nothing extra.
    pub reasons: Vec<&'static str>,
}

impl Verdict {
    /// The decision's name: `approve`, `review` or `decline`.
    pub fn decision_str(&self) -> &'static str {
        match self.decision {
            Decision::Approve => "approve",
            Decision::Review => "review",
            Decision::Decline => "decline",
        }
    }

    /// Field 48's tags, up to the acquirer tag.
    pub fn tags(&self) -> String {
        let decision = self.decision_str();
        let mut tags = format!("decision={decision}");
        match (&self.score, &self.model) {
            (Some(score), Some(model)) => {
                tags.push_str(&format!(";score={score:.4};model={}", model.id()));
            }
            _ => tags.push_str(";model=none"),
        }
        if let Some(rule) = &self.rule {
            tags.push_str(";rule=");
            tags.push_str(rule);
        }
        if !self.reasons.is_empty() {
            tags.push_str(";reasons=");
            tags.push_str(&self.reasons.join(","));
        }
        tags
    }
}

/// A model scored in shadow, with how often it agreed with the champion.
#[derive(Debug)]
pub struct Challenger {
    /// The model.
    pub model: Arc<Model>,
    /// Authorizations it scored.
    pub scored: AtomicU64,
    /// Of those, decisions equal to the champion's.
    pub agreed: AtomicU64,
    /// Its scores, summed in millionths.
    pub score_micros: AtomicU64,
    /// The champion's scores of the same transactions, summed in millionths.
    pub champion_score_micros: AtomicU64,
}

/// A score in millionths, for summing in an atomic counter.
fn micros(score: f32) -> u64 {
    (f64::from(score.clamp(0.0, 1.0)) * 1e6) as u64
}

/// Scoring shared by every shard.
#[derive(Debug)]
pub struct Scoring {
    champion: ArcSwapOption<Model>,
    challengers: ArcSwap<Vec<Arc<Challenger>>>,
    rules: Arc<RuleSet>,
    merchants: Vec<Mutex<EntityVelocity>>,
    terminals: Vec<Mutex<EntityVelocity>>,
    budget: Duration,
    event_time: EventTime,
    /// Counters.
    pub stats: ScoringStats,
}

/// Per-shard scoring state: the cards of that shard.
#[derive(Debug)]
pub struct ShardScoring {
    cards: CardVelocity,
    features: Features,
}

impl ShardScoring {
    /// State for at most `max_cards` cards.
    pub fn new(max_cards: usize) -> ShardScoring {
        ShardScoring {
            cards: CardVelocity::new(max_cards),
            features: [0.0; features::FEATURE_COUNT],
        }
    }
}

impl Scoring {
    /// Scoring with the given rules, no model yet; `max_entities` merchants and as many
    /// terminals, spread over the stripes.
    pub fn new(
        rules: Arc<RuleSet>,
        budget: Duration,
        event_time: EventTime,
        max_entities: usize,
    ) -> Scoring {
        // `Config::check` keeps `scoring.max_entities` at one per stripe or more.
        assert!(
            max_entities >= ENTITY_STRIPES,
            "max_entities {max_entities} below one per stripe ({ENTITY_STRIPES})"
        );
        let per_stripe = max_entities / ENTITY_STRIPES;
        Scoring {
            champion: ArcSwapOption::empty(),
            challengers: ArcSwap::from_pointee(Vec::new()),
            rules,
            merchants: (0..ENTITY_STRIPES)
                .map(|_| Mutex::new(EntityVelocity::new(per_stripe)))
                .collect(),
            terminals: (0..ENTITY_STRIPES)
                .map(|_| Mutex::new(EntityVelocity::new(per_stripe)))
                .collect(),
            budget,
            event_time,
            stats: ScoringStats::default(),
        }
    }

    /// Checks a model against the budget: its worst case must fit.
    pub fn admit(&self, model: &Model) -> Result<(), String> {
        let worst = Duration::from_nanos(model.max_cost().saturating_mul(NANOS_PER_COST_UNIT));
        if worst > self.budget {
            return Err(format!(
                "model {} may take {:?} per score, over the scoring budget {:?}",
                model.id(),
                worst,
                self.budget
            ));
        }
        Ok(())
    }

    /// Makes `model` the champion (after `admit`). Transactions already scoring finish on
    /// the model they loaded.
    pub fn set_champion(&self, model: Arc<Model>) -> Result<(), String> {
        self.admit(&model)?;
        tracing::info!(model = model.id(), "champion model deployed");
        self.champion.store(Some(model));
        Ok(())
    }

    /// Adds a challenger, scored in shadow.
    pub fn add_challenger(&self, model: Arc<Model>) -> Result<(), String> {
        self.admit(&model)?;
        tracing::info!(model = model.id(), "challenger model deployed");
        let mut next = (**self.challengers.load()).clone();
        next.retain(|c| c.model.id() != model.id());
        next.push(Arc::new(Challenger {
            model,
            scored: AtomicU64::new(0),
            agreed: AtomicU64::new(0),
            score_micros: AtomicU64::new(0),
            champion_score_micros: AtomicU64::new(0),
        }));
        self.challengers.store(Arc::new(next));
        Ok(())
    }

    /// Makes the challenger `id` the champion; the champion it replaces is dropped.
    pub fn promote(&self, id: &str) -> Result<(), String> {
        let current = self.challengers.load_full();
        let Some(challenger) = current.iter().find(|c| c.model.id() == id) else {
            return Err(format!("no challenger {id:?}"));
        };
        self.set_champion(Arc::clone(&challenger.model))?;
        let rest = current
            .iter()
            .filter(|c| c.model.id() != id)
            .cloned()
            .collect();
        self.challengers.store(Arc::new(rest));
        tracing::info!(model = id, "challenger promoted to champion");
        Ok(())
    }

    /// Keeps only the challengers whose ids are in `ids` (a cluster's deployment, where
    /// another node promoted or dropped one).
    pub fn retain_challengers(&self, ids: &[String]) {
        let current = self.challengers.load_full();
        if current
            .iter()
            .all(|c| ids.iter().any(|id| id == c.model.id()))
        {
            return;
        }
        let kept = current
            .iter()
            .filter(|c| ids.iter().any(|id| id == c.model.id()))
            .cloned()
            .collect();
        self.challengers.store(Arc::new(kept));
    }

    /// The champion, if any.
    pub fn champion(&self) -> Option<Arc<Model>> {
        self.champion.load_full()
    }

    /// The challengers and their agreement counts.
    pub fn challengers(&self) -> Arc<Vec<Arc<Challenger>>> {
        self.challengers.load_full()
    }

    /// The rules.
    pub fn rules(&self) -> &Arc<RuleSet> {
        &self.rules
    }

    /// The model input of an authorization whose keyed PAN hash is `pan_hash`.
    pub fn transaction(
        &self,
        request: &Message,
        auth: &Authorization,
        pan_hash: u128,
        now_ms: i64,
    ) -> Transaction {
        let number = |n: u8| {
            request
                .get(n)
                .filter(|raw| raw.iter().all(u8::is_ascii_digit) && !raw.is_empty())
                .map_or(0, |raw| {
                    raw.iter().fold(0u16, |acc, &b| {
                        acc.wrapping_mul(10).wrapping_add(u16::from(b - b'0'))
                    })
                })
        };
        let timestamp_ms = event_time_ms(self.event_time, request, now_ms);
        let merchant = request.get(fields::MERCHANT).unwrap_or_default();
        Transaction {
            timestamp_ms,
            card: features::card_key(pan_hash),
            amount_minor: auth.amount.get(),
            currency: auth.currency.get(),
            mcc: auth.mcc.map_or(0, |m| m.get()),
            merchant: features::entity_hash(merchant),
            terminal: features::entity_hash(request.get(fields::TERMINAL).unwrap_or_default()),
            country: number(19),
            pos_entry_mode: number(fields::POS_ENTRY_MODE),
        }
    }

    /// Records `tx` into the velocity state (the shard's cards, the shared merchants and
    /// terminals) as scoring it would, without scoring: a restart replaying the journal.
    pub fn warm(&self, shard: &mut ShardScoring, tx: &Transaction) {
        let stripe = |hash: u64| (hash % ENTITY_STRIPES as u64) as usize;
        let mut merchants = lock(&self.merchants[stripe(tx.merchant)]);
        let mut terminals = lock(&self.terminals[stripe(tx.terminal)]);
        features::extract(
            tx,
            &mut shard.cards,
            &mut merchants,
            &mut terminals,
            &mut shard.features,
        );
    }

    /// Scores and decides one transaction, updating the shard's and the shared state.
    pub fn decide(&self, shard: &mut ShardScoring, tx: &Transaction) -> Verdict {
        let started = Instant::now();
        // The features, and the velocity state updated (the entity locks are released
        // before the model runs).
        self.warm(shard, tx);
        let champion = self.champion.load_full();
        let model_score = champion.as_ref().map(|m| m.score(&shard.features));
        let rules = self.rules.current();
        let outcome = rules.evaluate(|name| self.variable(name, tx, &shard.features, model_score));
        let score = model_score.map(|s| (s + outcome.score_delta).clamp(0.0, 1.0));
        let mut decision = match (&champion, score) {
            (Some(model), Some(score)) => model.decide(score),
            _ => Decision::Approve,
        };
        if started.elapsed() > self.budget {
            // Over budget: the model's decision is not trusted to have been worth the wait;
            // the rules alone decide, as the design says.
            self.stats.budget_breaches.fetch_add(1, Ordering::Relaxed);
            decision = Decision::Approve;
        }
        let rule = outcome.decision.map(|(action, name)| {
            decision = match action {
                Action::Decline => Decision::Decline,
                Action::Review => Decision::Review,
                _ => Decision::Approve,
            };
            name.to_owned()
        });
        if let Some(score) = model_score {
            self.stats.champion_scored.fetch_add(1, Ordering::Relaxed);
            self.stats
                .champion_score_micros
                .fetch_add(micros(score), Ordering::Relaxed);
        }
        self.shadow(&shard.features, decision, model_score);
        let slot = match decision {
            Decision::Approve => 0,
            Decision::Review => 1,
            Decision::Decline => 2,
        };
        self.stats.decisions[slot].fetch_add(1, Ordering::Relaxed);
        let reasons = match (&champion, decision) {
            (Some(model), Decision::Decline | Decision::Review) => model
                .contributions(&shard.features, REASON_CODES)
                .into_iter()
                .filter(|(_, weight)| *weight > 0.0)
                .map(|(name, _)| name)
                .collect(),
            _ => Vec::new(),
        };
        Verdict {
            decision,
            score,
            model: champion,
            rule,
            reasons,
        }
    }

    fn shadow(&self, features: &Features, champion_decision: Decision, champion: Option<f32>) {
        let challengers = self.challengers.load();
        for challenger in challengers.iter() {
            let model = &challenger.model;
            let score = model.score(features);
            let decision = model.decide(score);
            self.stats.challenger_scored.fetch_add(1, Ordering::Relaxed);
            challenger.scored.fetch_add(1, Ordering::Relaxed);
            challenger
                .score_micros
                .fetch_add(micros(score), Ordering::Relaxed);
            challenger
                .champion_score_micros
                .fetch_add(micros(champion.unwrap_or(0.0)), Ordering::Relaxed);
            if decision == champion_decision {
                self.stats.challenger_agreed.fetch_add(1, Ordering::Relaxed);
                challenger.agreed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn variable(
        &self,
        name: &str,
        tx: &Transaction,
        features: &Features,
        score: Option<f32>,
    ) -> Option<cel_interpreter::Value> {
        use cel_interpreter::Value;
        Some(match name {
            "amount_minor" => Value::Int(i64::try_from(tx.amount_minor).unwrap_or(i64::MAX)),
            "currency" => Value::Int(i64::from(tx.currency)),
            "mcc" => Value::Int(i64::from(tx.mcc)),
            "country" => Value::Int(i64::from(tx.country)),
            "pos_entry_mode" => Value::Int(i64::from(tx.pos_entry_mode)),
            "score" => Value::Float(f64::from(score.unwrap_or(0.0))),
            "hour_utc" => Value::Int(tx.timestamp_ms.rem_euclid(86_400_000) / 3_600_000),
            feature => {
                let index = FEATURE_NAMES.iter().position(|n| *n == feature)?;
                Value::Float(f64::from(features[index]))
            }
        })
    }
}

/// How often a watched models directory is scanned.
pub const MODELS_DIR_INTERVAL: Duration = Duration::from_secs(1);

/// Most model files a watched directory may hold: each is loaded into memory.
pub const MAX_WATCHED_MODELS: usize = 64;

/// Watches `dir` for model files dropped by risk teams: `champion.pswm` becomes the
/// champion and `challenger-*.pswm` challengers, whenever one appears or changes. A file
/// that fails to load or fit the budget is logged and left alone; the models in force stay.
/// Write the file elsewhere and rename it into the directory, so it is never read half
/// written (a torn file would fail its checksum and be ignored until it changes again).
pub async fn watch_models_dir(
    scoring: Arc<Scoring>,
    dir: std::path::PathBuf,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut seen: std::collections::HashMap<std::path::PathBuf, std::time::SystemTime> =
        Default::default();
    loop {
        for (path, modified) in model_files(&dir) {
            if seen.get(&path) == Some(&modified) {
                continue;
            }
            seen.insert(path.clone(), modified);
            let challenger = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("challenger-"));
            let load_path = path.clone();
            let loaded = tokio::task::spawn_blocking(move || Model::load_file(&load_path)).await;
            let result = match loaded {
                Ok(Ok(model)) if challenger => scoring.add_challenger(Arc::new(model)),
                Ok(Ok(model)) => scoring.set_champion(Arc::new(model)),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = result {
                tracing::error!(path = %path.display(), error = %e, "model file refused; the models in force stay");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(MODELS_DIR_INTERVAL) => {}
        }
    }
}

/// `champion.pswm` and `challenger-*.pswm` in `dir` with their modification times.
fn model_files(dir: &std::path::Path) -> Vec<(std::path::PathBuf, std::time::SystemTime)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name().to_str().is_some_and(|n| {
                n == "champion.pswm" || (n.starts_with("challenger-") && n.ends_with(".pswm"))
            })
        })
        .filter_map(|e| Some((e.path(), e.metadata().ok()?.modified().ok()?)))
        .take(MAX_WATCHED_MODELS)
        .collect()
}

/// The variables rules may use: message variables and every feature name.
pub fn rule_variables() -> &'static [&'static str] {
    static NAMES: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    NAMES.get_or_init(|| {
        MESSAGE_VARIABLES
            .iter()
            .chain(FEATURE_NAMES.iter())
            .copied()
            .collect()
    })
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a stripe leaves velocity counts possibly half-updated, which
    // only skews features a little; keep scoring rather than fail every later request.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The time of `request` for the velocity windows, Unix ms, by `source`; `now_ms` is the
/// switch's clock.
fn event_time_ms(source: EventTime, request: &Message, now_ms: i64) -> i64 {
    match source {
        EventTime::Clock => now_ms,
        EventTime::Transmission => request
            .get(fields::TRANSMISSION_TIME)
            .and_then(|raw| transmission_time_ms(raw, now_ms))
            .map_or(now_ms, |t| {
                t.min(now_ms.saturating_add(MAX_EVENT_TIME_AHEAD_MS))
            }),
    }
}

/// Field 7 (MMDDhhmmss, UTC) as Unix ms, in the latest year that puts it at most
/// [`FIELD_7_YEAR_LOOKAHEAD_MS`] ahead of `now_ms`; `None` when it is not a date and time
/// (29 February only in a leap year).
fn transmission_time_ms(raw: &[u8], now_ms: i64) -> Option<i64> {
    TransmissionTime::parse(raw)
        .ok()?
        .unix_ms_latest_until(now_ms.saturating_add(FIELD_7_YEAR_LOOKAHEAD_MS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_rules_compile_against_the_switch_variables() {
        let text = include_str!("../../../config/rules.example.toml");
        let rules = crate::scoring::rules::Rules::parse(text, rule_variables()).unwrap();
        assert_eq!(rules.names().count(), 3);
    }

    fn utc(text: &str) -> i64 {
        payswitch_models::data::parse_rfc3339_utc_ms(text).unwrap()
    }

    #[test]
    fn transmission_time_takes_the_latest_year_not_ahead_of_the_clock() {
        let now = utc("2026-11-25T13:45:00Z");
        let t = transmission_time_ms(b"1125123045", now);
        assert_eq!(t, Some(utc("2026-11-25T12:30:45Z")));
        let new_year = utc("2027-01-01T00:00:10Z");
        let t = transmission_time_ms(b"1231235959", new_year);
        assert_eq!(t, Some(utc("2026-12-31T23:59:59Z")));
        // A date months ahead is last year's: a file replayed later keeps its timeline.
        let t = transmission_time_ms(b"0701080000", utc("2027-03-01T00:00:00Z"));
        assert_eq!(t, Some(utc("2026-07-01T08:00:00Z")));
        // Hours ahead (a gateway's clock off) stays in this year, for the guard to hold.
        let t = transmission_time_ms(b"1125200000", now);
        assert_eq!(t, Some(utc("2026-11-25T20:00:00Z")));
        // 29 February: the latest leap year.
        let t = transmission_time_ms(b"0229120000", now);
        assert_eq!(t, Some(utc("2024-02-29T12:00:00Z")));
        for bad in [
            &b"11251230"[..],
            b"1325123045",
            b"0000123045",
            b"1125243045",
            b"0231000000",
        ] {
            assert_eq!(transmission_time_ms(bad, now), None, "{bad:?}");
        }
    }

    fn with_field_7(value: Option<&str>) -> Message {
        let mut builder = Message::builder(payswitch_protocol::Mti::AUTHORIZATION_REQUEST);
        builder.set_str(fields::STAN, "000001").unwrap();
        if let Some(value) = value {
            builder.set_str(fields::TRANSMISSION_TIME, value).unwrap();
        }
        builder.build()
    }

    #[test]
    fn event_time_is_field_7_never_far_ahead_of_the_clock() {
        let now = utc("2026-11-25T13:45:00Z");
        let at =
            |value: Option<&str>| event_time_ms(EventTime::Transmission, &with_field_7(value), now);
        assert_eq!(EventTime::default(), EventTime::Transmission);
        // The gateway's time, earlier or a little ahead.
        assert_eq!(at(Some("1120080000")), utc("2026-11-20T08:00:00Z"));
        assert_eq!(at(Some("1125134700")), utc("2026-11-25T13:47:00Z"));
        // Further ahead: held at the clock plus the allowed skew.
        assert_eq!(at(Some("1125180000")), now + MAX_EVENT_TIME_AHEAD_MS);
        // Missing or not a time: the clock.
        assert_eq!(at(None), now);
        assert_eq!(at(Some("1199999999")), now);
        // `clock` ignores field 7.
        let clock = event_time_ms(EventTime::Clock, &with_field_7(Some("1120080000")), now);
        assert_eq!(clock, now);
    }
}
