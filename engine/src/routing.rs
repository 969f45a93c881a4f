//! Routing: which acquirers, in which order, may take an authorization. Pure data and
//! functions; the table is built once from the configuration and swapped whole on reload.

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
            rules.push(Rule {
                bins: ranges(&route.bins, "BIN")?,
                currencies: route.currencies.clone(),
                mccs: ranges(&route.mccs, "MCC")?,
                acquirers: indexes,
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
    fn malformed_ranges_are_refused() {
        for bad in ["\"\"", "\"4x\"", "\"55-4\"", "\"51-5599\""] {
            let c = config(&format!("[[routes]]\nbins = [{bad}]\nacquirers = [\"a\"]"));
            assert!(c.router().is_err(), "{bad}");
        }
    }
}
