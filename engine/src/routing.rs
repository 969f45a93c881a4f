//! Routing: which acquirers, in which order, may take an authorization. Pure data and
//! functions; the table is built once from the configuration and swapped whole on reload.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use payswitch_protocol::{CurrencyCode, Mcc, Pan};

use serde::Deserialize;

/// A routing rule.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// BIN prefixes (`"4"`, `"5100"`) or inclusive ranges of equal-length prefixes
    /// (`"510000-559999"`). Empty matches every card.
    #[serde(default)]
    pub bins: Vec<String>,
    /// ISO 4217 numeric currencies; empty matches all.
    #[serde(default)]
    pub currencies: Vec<u16>,
    /// MCCs or ranges (`"5812-5814"`); empty matches all.
    #[serde(default)]
    pub mccs: Vec<String>,
    /// Acquirer names, tried in order.
    pub acquirers: Vec<String>,
    /// The acquirers are of equal priority: each authorization goes first to one drawn
    /// with a probability that follows its recent success rate (squared, so a failing
    /// acquirer loses traffic quickly; none while its breaker is open), then to the
    /// others, healthiest first.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub balance: bool,
    /// Stand-in processing: what the switch may approve on the issuer's behalf when none
    /// of the route's acquirers can be reached and none has received the request.
    /// Without it such a request is answered 91.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stand_in: Option<StandIn>,
}

/// A route's stand-in rule (STIP). It applies only when every acquirer of the route was
/// unavailable (down, breaker open, drained or full) and nothing was sent to any: never
/// after a send that timed out, since that acquirer may have approved the request. A
/// request the fraud decision approved, at most `max_amount_minor`, and scored at most
/// `max_score`, is approved with an approval code of the switch's own (`S` and five
/// characters), marked `stand_in=1` in field 48 and in the journal, and owed to the
/// route's first acquirer as an advice (0120, repeated as 0121 until it answers 0130).
/// Anything else is answered 91.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct StandIn {
    /// Largest amount approved in stand-in, minor units of the request's currency
    /// (give the route `currencies` when amounts in different currencies differ).
    pub max_amount_minor: u64,
    /// Highest fraud score approved in stand-in (0 to 1). Unset: the fraud decision
    /// alone; set, a request without a score (no model) is not stood in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_score: Option<f32>,
}

impl StandIn {
    /// Whether a request of `amount_minor`, decided `approve` (`approved`) with `score`,
    /// is approved in stand-in.
    pub fn admits(&self, amount_minor: u64, approved: bool, score: Option<f32>) -> bool {
        let score_ok = match (self.max_score, score) {
            (None, _) => true,
            (Some(max), Some(score)) => score <= max,
            (Some(_), None) => false,
        };
        approved && amount_minor <= self.max_amount_minor && score_ok
    }
}

/// The acquirers an authorization may go to, in the order to try them, and what to do
/// when none can take it.
#[derive(Debug, Clone)]
pub struct Route {
    /// Acquirers, in order.
    pub acquirers: Arc<[AcquirerIndex]>,
    /// The route's stand-in rule, if it has one.
    pub stand_in: Option<StandIn>,
}

/// Each acquirer's recent health as routing weighs it: the share of its recent requests
/// answered in time, in thousandths, 0 while its circuit breaker is open. Written by the
/// links (or the simulator's), read by the shards for balanced routes.
#[derive(Debug)]
pub struct AcquirerWeights(Box<[AtomicU32]>);

impl AcquirerWeights {
    /// `n` acquirers, all healthy.
    pub fn new(n: usize) -> AcquirerWeights {
        AcquirerWeights((0..n).map(|_| AtomicU32::new(1_000)).collect())
    }

    /// Sets acquirer `index`'s success rate (thousandths; 0: skip it).
    pub fn set(&self, index: AcquirerIndex, permille: u32) {
        if let Some(w) = self.0.get(index) {
            w.store(permille.min(1_000), Ordering::Relaxed);
        }
    }

    /// Acquirer `index`'s success rate, thousandths.
    pub fn get(&self, index: AcquirerIndex) -> u32 {
        self.0.get(index).map_or(0, |w| w.load(Ordering::Relaxed))
    }
}

/// Index of an acquirer in the configuration's list.
pub type AcquirerIndex = usize;

/// An inclusive range over the first `len` digits of a PAN (or an MCC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PrefixRange {
    len: usize,
    low: u64,
    high: u64,
}

impl PrefixRange {
    /// `"4"`, `"5100"` or `"510000-559999"` (both ends of one length, at most 19 digits).
    fn parse(text: &str) -> Option<PrefixRange> {
        let (low, high) = text.split_once('-').unwrap_or((text, text));
        let (low, high) = (low.trim(), high.trim());
        let digits =
            |s: &str| !s.is_empty() && s.len() <= 19 && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(low) || !digits(high) || low.len() != high.len() {
            return None;
        }
        let (low_n, high_n) = (low.parse().ok()?, high.parse().ok()?);
        (low_n <= high_n).then_some(PrefixRange {
            len: low.len(),
            low: low_n,
            high: high_n,
        })
    }

    fn contains(&self, digits: &[u8]) -> bool {
        let Some(prefix) = digits.get(..self.len) else {
            return false;
        };
        let value = prefix
            .iter()
            .fold(0u64, |acc, &b| acc * 10 + u64::from(b - b'0'));
        (self.low..=self.high).contains(&value)
    }
}

#[derive(Debug, Clone)]
struct Rule {
    bins: Vec<PrefixRange>,
    currencies: Vec<u16>,
    mccs: Vec<PrefixRange>,
    acquirers: Arc<[AcquirerIndex]>,
    balance: bool,
    stand_in: Option<StandIn>,
}

impl Rule {
    fn matches(&self, pan: &Pan, currency: CurrencyCode, mcc: Option<Mcc>) -> bool {
        let bin_ok = self.bins.is_empty() || self.bins.iter().any(|r| r.contains(pan.expose()));
        let currency_ok = self.currencies.is_empty() || self.currencies.contains(&currency.get());
        let mcc_ok = self.mccs.is_empty()
            || mcc.is_some_and(|mcc| {
                let digits = format_mcc(mcc);
                self.mccs.iter().any(|r| r.contains(&digits))
            });
        bin_ok && currency_ok && mcc_ok
    }
}

fn format_mcc(mcc: Mcc) -> [u8; 4] {
    let v = mcc.get();
    [
        b'0' + (v / 1000 % 10) as u8,
        b'0' + (v / 100 % 10) as u8,
        b'0' + (v / 10 % 10) as u8,
        b'0' + (v % 10) as u8,
    ]
}

/// The routing table.
#[derive(Debug, Clone)]
pub struct Router {
    rules: Vec<Rule>,
    /// Used when no rule is configured: every acquirer, in configuration order.
    all: Arc<[AcquirerIndex]>,
    /// The routes as configured: the one copy, swapped with the table on reload.
    routes: Vec<RouteConfig>,
}

impl Router {
    /// Builds the table from `routes`, resolving their names among `acquirers` (whose
    /// positions are the indexes routes give); the reason when a route is invalid.
    pub fn new(acquirers: &[&str], routes: &[RouteConfig]) -> Result<Router, String> {
        let index_of = |name: &str| acquirers.iter().position(|a| *a == name);
        let mut rules = Vec::with_capacity(routes.len());
        for (i, route) in routes.iter().enumerate() {
            let ranges = |list: &[String], what: &str| {
                list.iter()
                    .map(|text| {
                        PrefixRange::parse(text)
                            .ok_or_else(|| format!("route {i}: bad {what} {text:?}"))
                    })
                    .collect::<Result<Vec<_>, _>>()
            };
            let indexes = route
                .acquirers
                .iter()
                .map(|name| {
                    index_of(name).ok_or_else(|| format!("route {i}: unknown acquirer {name:?}"))
                })
                .collect::<Result<Arc<[_]>, _>>()?;
            if let Some(max) = route.stand_in.and_then(|s| s.max_score) {
                if !(0.0..=1.0).contains(&max) {
                    return Err(format!(
                        "route {i}: stand_in.max_score {max} is not between 0 and 1"
                    ));
                }
            }
            rules.push(Rule {
                bins: ranges(&route.bins, "BIN")?,
                currencies: route.currencies.clone(),
                mccs: ranges(&route.mccs, "MCC")?,
                acquirers: indexes,
                balance: route.balance,
                stand_in: route.stand_in,
            });
        }
        Ok(Router {
            rules,
            all: (0..acquirers.len()).collect(),
            routes: routes.to_vec(),
        })
    }

    /// The routes the table was built from, as configured (for `GET /api/routes`).
    pub fn routes(&self) -> &[RouteConfig] {
        &self.routes
    }

    /// The acquirers to try, in order; `None` when no rule matches (response 92). Shared,
    /// not copied: a verdict carries its route at the cost of a reference count.
    pub fn route(
        &self,
        pan: &Pan,
        currency: CurrencyCode,
        mcc: Option<Mcc>,
    ) -> Option<Arc<[AcquirerIndex]>> {
        if self.rules.is_empty() {
            return Some(Arc::clone(&self.all));
        }
        self.rules
            .iter()
            .find(|rule| rule.matches(pan, currency, mcc))
            .map(|rule| Arc::clone(&rule.acquirers))
    }

    /// As [`Router::route`], ordering a balanced route's acquirers for this request:
    /// the first drawn with `draw` (uniform over `u64`) weighted by the square of each
    /// one's success rate in `weights`, the rest healthiest first. A route that is not
    /// balanced keeps its configured order (and costs no allocation).
    pub fn route_weighted(
        &self,
        pan: &Pan,
        currency: CurrencyCode,
        mcc: Option<Mcc>,
        weights: &AcquirerWeights,
        draw: u64,
    ) -> Option<Route> {
        if self.rules.is_empty() {
            return Some(Route {
                acquirers: Arc::clone(&self.all),
                stand_in: None,
            });
        }
        let rule = self
            .rules
            .iter()
            .find(|rule| rule.matches(pan, currency, mcc))?;
        let acquirers = if rule.balance && rule.acquirers.len() > 1 {
            balanced(&rule.acquirers, weights, draw)
        } else {
            Arc::clone(&rule.acquirers)
        };
        Some(Route {
            acquirers,
            stand_in: rule.stand_in,
        })
    }
}

/// `acquirers` in the order a balanced route tries them for one request.
fn balanced(
    acquirers: &[AcquirerIndex],
    weights: &AcquirerWeights,
    draw: u64,
) -> Arc<[AcquirerIndex]> {
    let weight = |a: AcquirerIndex| u64::from(weights.get(a)).pow(2);
    let mut order: Vec<AcquirerIndex> = acquirers.to_vec();
    // Healthiest first, configured order among equals.
    order.sort_by_key(|&a| std::cmp::Reverse(weight(a)));
    let total: u64 = order.iter().map(|&a| weight(a)).sum();
    if total > 0 {
        let mut point = draw % total;
        if let Some(pick) = order.iter().position(|&a| {
            let w = weight(a);
            let hit = point < w;
            point = point.saturating_sub(w);
            hit
        }) {
            let first = order.remove(pick);
            order.insert(0, first);
        }
    }
    order.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn config(routes: &str) -> Config {
        let text = format!(
            r#"
            insecure_acquirers = true
            [listen]
            quic = "127.0.0.1:0"
            [[acquirers]]
            name = "a"
            address = "127.0.0.1:1"
            [[acquirers]]
            name = "b"
            address = "127.0.0.1:2"
            {routes}
            "#
        );
        toml::from_str(&text).unwrap()
    }

    fn pan(s: &str) -> Pan {
        Pan::parse(s.as_bytes()).unwrap()
    }

    const USD: &[u8] = b"840";

    #[test]
    fn no_rules_means_every_acquirer_in_order() {
        let router = config("").router().unwrap();
        let usd = CurrencyCode::parse(USD).unwrap();
        assert_eq!(
            router.route(&pan("4111111111111111"), usd, None).as_deref(),
            Some(&[0, 1][..])
        );
    }

    #[test]
    fn first_matching_rule_wins_by_bin_range_currency_and_mcc() {
        let router = config(
            r#"
            [[routes]]
            bins = ["4"]
            mccs = ["5812-5814"]
            acquirers = ["b"]
            [[routes]]
            bins = ["4", "510000-559999"]
            currencies = [840]
            acquirers = ["a", "b"]
            "#,
        )
        .router()
        .unwrap();
        let usd = CurrencyCode::parse(USD).unwrap();
        let eur = CurrencyCode::parse(b"978").unwrap();
        let restaurant = Mcc::parse(b"5812").ok();
        let grocery = Mcc::parse(b"5411").ok();
        assert_eq!(
            router
                .route(&pan("4111111111111111"), usd, restaurant)
                .as_deref(),
            Some(&[1][..])
        );
        assert_eq!(
            router
                .route(&pan("4111111111111111"), usd, grocery)
                .as_deref(),
            Some(&[0, 1][..])
        );
        assert_eq!(
            router.route(&pan("5500000000000004"), usd, None).as_deref(),
            Some(&[0, 1][..])
        );
        assert_eq!(
            router.route(&pan("5500000000000004"), eur, None).as_deref(),
            None
        );
        assert_eq!(
            router.route(&pan("6011000000000004"), usd, None).as_deref(),
            None
        );
    }

    #[test]
    fn a_balanced_route_shares_by_success_rate_and_skips_an_open_breaker() {
        let router = config(
            r#"
            [[routes]]
            acquirers = ["a", "b"]
            balance = true
            "#,
        )
        .router()
        .unwrap();
        let usd = CurrencyCode::parse(USD).unwrap();
        let card = pan("4111111111111111");
        let weights = AcquirerWeights::new(2);
        let firsts = |weights: &AcquirerWeights| {
            let mut firsts = [0u32; 2];
            let mut draw = 0x9E37_79B9_7F4A_7C15u64;
            for _ in 0..10_000 {
                draw ^= draw << 13;
                draw ^= draw >> 7;
                draw ^= draw << 17;
                let order = router
                    .route_weighted(&card, usd, None, weights, draw)
                    .unwrap()
                    .acquirers;
                assert_eq!(order.len(), 2);
                firsts[order[0]] += 1;
            }
            firsts
        };
        let even = firsts(&weights);
        assert!((4_500..=5_500).contains(&even[0]), "{even:?}");
        // b answers half its requests in time: (0.5)^2 against 1 -> a fifth of the traffic.
        weights.set(1, 500);
        let skewed = firsts(&weights);
        assert!((1_700..=2_300).contains(&skewed[1]), "{skewed:?}");
        // b's breaker is open: it is only ever the fallback.
        weights.set(1, 0);
        assert_eq!(firsts(&weights), [10_000, 0]);
        // An unbalanced route keeps its order whatever the weights.
        let plain = config("").router().unwrap();
        assert_eq!(
            plain
                .route_weighted(&card, usd, None, &weights, 1)
                .map(|route| route.acquirers)
                .as_deref(),
            Some(&[0, 1][..])
        );
    }

    #[test]
    fn stand_in_admits_approved_small_low_score_requests_only() {
        let router = config(
            r#"
            [[routes]]
            bins = ["4"]
            acquirers = ["a"]
            stand_in = { max_amount_minor = 5000, max_score = 0.3 }
            [[routes]]
            acquirers = ["b"]
            "#,
        )
        .router()
        .unwrap();
        let usd = CurrencyCode::parse(USD).unwrap();
        let weights = AcquirerWeights::new(2);
        let visa = router
            .route_weighted(&pan("4111111111111111"), usd, None, &weights, 1)
            .unwrap();
        let rule = visa.stand_in.expect("the first route stands in");
        assert!(rule.admits(5_000, true, Some(0.3)));
        assert!(!rule.admits(5_001, true, Some(0.1)), "over the amount");
        assert!(!rule.admits(100, true, Some(0.31)), "over the score");
        assert!(
            !rule.admits(100, true, None),
            "unscored, with a score bound"
        );
        assert!(
            !rule.admits(100, false, Some(0.0)),
            "the fraud decision was not approve"
        );
        let other = router
            .route_weighted(&pan("5500000000000004"), usd, None, &weights, 1)
            .unwrap();
        assert!(other.stand_in.is_none());
        let any_score = StandIn {
            max_amount_minor: 10,
            max_score: None,
        };
        assert!(any_score.admits(10, true, None));
    }

    #[test]
    fn malformed_ranges_are_refused() {
        for bad in ["\"\"", "\"4x\"", "\"55-4\"", "\"51-5599\""] {
            let c = config(&format!("[[routes]]\nbins = [{bad}]\nacquirers = [\"a\"]"));
            assert!(c.router().is_err(), "{bad}");
        }
    }
}
