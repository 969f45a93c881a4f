//! Tallies of one load run and the report made from them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use payswitch_protocol::{fields, Message};
use serde::Serialize;

use super::data::{Label, LabelTally, SentSummary};
use super::Mode;

/// Largest latency the histogram tells apart: 60 s. Requests time out well before, but
/// latency counts from the intended send time, so a sender that fell behind can see more;
/// those saturate at this value instead of being lost.
const HISTOGRAM_MAX_US: u64 = 60_000_000;
/// Significant figures kept: 0.1 % error at about 200 KiB per histogram.
const HISTOGRAM_SIGFIGS: u8 = 3;

/// Field 48 value when a response names no acquirer.
const NO_ACQUIRER: &str = "none";
/// Field 39 value when a response carries none.
const NO_CODE: &str = "none";

/// Why a request ended without a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// No response within the request timeout.
    Timeout,
    /// The connection already had the maximum outstanding requests; not sent.
    Overload,
    /// The stream or connection failed.
    Transport,
    /// What came back is not a message.
    BadResponse,
    /// The request could not be built (a bug; counted so the totals still add up).
    Build,
}

impl Failure {
    fn as_str(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Overload => "overload",
            Failure::Transport => "transport",
            Failure::BadResponse => "bad_response",
            Failure::Build => "build",
        }
    }
}

/// Counts and latencies of one connection (merged into the run's at the end).
#[derive(Debug)]
pub(crate) struct Tally {
    latency_us: Histogram<u64>,
    answered: u64,
    errors: BTreeMap<&'static str, u64>,
    late: u64,
    unmatched: u64,
    codes: BTreeMap<String, u64>,
    by_acquirer: BTreeMap<String, BTreeMap<String, u64>>,
    labels: LabelTally,
}

fn bump(map: &mut BTreeMap<String, u64>, key: &str, by: u64) {
    match map.get_mut(key) {
        Some(count) => *count += by,
        None => {
            map.insert(key.to_owned(), by);
        }
    }
}

/// The `acquirer=NAME` tag of field 48 (`key=value;key=value`).
pub(crate) fn acquirer_tag(field48: Option<&str>) -> Option<&str> {
    field48?
        .split(';')
        .find_map(|pair| pair.trim().strip_prefix("acquirer="))
}

impl Tally {
    pub(crate) fn new() -> Tally {
        Tally {
            latency_us: Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, HISTOGRAM_SIGFIGS)
                .expect("constant bounds are valid"),
            answered: 0,
            errors: BTreeMap::new(),
            late: 0,
            unmatched: 0,
            codes: BTreeMap::new(),
            by_acquirer: BTreeMap::new(),
            labels: LabelTally::default(),
        }
    }

    /// A response to a request, `latency` after its intended send time; `label` when the
    /// request came from a labeled file.
    pub(crate) fn answered(&mut self, latency: Duration, response: &Message, label: Option<Label>) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_us.saturating_record(us.max(1));
        self.answered += 1;
        let code = response.get_str(fields::RESPONSE_CODE).unwrap_or(NO_CODE);
        bump(&mut self.codes, code, 1);
        if let Some(label) = label {
            self.labels.answered(label, code);
        }
        let acquirer = acquirer_tag(response.get_str(fields::PRIVATE_DATA)).unwrap_or(NO_ACQUIRER);
        match self.by_acquirer.get_mut(acquirer) {
            Some(codes) => bump(codes, code, 1),
            None => {
                let codes = BTreeMap::from([(code.to_owned(), 1)]);
                self.by_acquirer.insert(acquirer.to_owned(), codes);
            }
        }
    }

    /// A request that ended without a response.
    pub(crate) fn failed(&mut self, failure: Failure) {
        *self.errors.entry(failure.as_str()).or_default() += 1;
    }

    /// A response for a request that had already timed out.
    pub(crate) fn late(&mut self) {
        self.late += 1;
    }

    /// A response that matches no request sent on its stream.
    pub(crate) fn unmatched(&mut self) {
        self.unmatched += 1;
    }

    /// Adds `other`'s counts to this one.
    pub(crate) fn merge(&mut self, other: &Tally) {
        // Same bounds on both sides, so adding cannot go out of range.
        let _ = self.latency_us.add(&other.latency_us);
        self.answered += other.answered;
        for (kind, n) in &other.errors {
            *self.errors.entry(kind).or_default() += n;
        }
        self.late += other.late;
        self.labels.merge(&other.labels);
        self.unmatched += other.unmatched;
        for (code, n) in &other.codes {
            bump(&mut self.codes, code, *n);
        }
        for (acquirer, codes) in &other.by_acquirer {
            let mine = self.by_acquirer.entry(acquirer.clone()).or_default();
            for (code, n) in codes {
                bump(mine, code, *n);
            }
        }
    }
}

/// What a load run measured. Every request the schedule called for ends either answered
/// or as an error: `sent == answered + errors`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The target address.
    pub target: String,
    /// Requests sent again for want of an answer (`--retransmit-for`).
    pub retransmissions: u64,
    /// How requests were carried.
    pub mode: Mode,
    /// Connections used.
    pub connections: usize,
    /// Configured duration of the schedule, seconds.
    pub duration_s: f64,
    /// From the first intended send to the end of the last request, seconds.
    pub elapsed_s: f64,
    /// The configured arrival rate.
    pub offered_tps: f64,
    /// Answers per second of elapsed time.
    pub achieved_tps: f64,
    /// Requests the schedule called for (including those refused at the outstanding cap).
    pub sent: u64,
    /// Requests that got a response.
    pub answered: u64,
    /// Requests that got no response.
    pub errors: u64,
    /// `errors` by cause: timeout, overload, transport, bad_response, build.
    pub errors_by_kind: BTreeMap<String, u64>,
    /// Responses that came after their request had timed out (not counted as answered).
    pub late_responses: u64,
    /// Responses matching no outstanding request.
    pub unmatched_responses: u64,
    /// Latency percentiles from the intended send time, microseconds.
    pub p50_us: u64,
    /// 90th percentile, microseconds.
    pub p90_us: u64,
    /// 99th percentile, microseconds.
    pub p99_us: u64,
    /// 99.9th percentile, microseconds.
    pub p999_us: u64,
    /// Largest latency, microseconds.
    pub max_us: u64,
    /// Mean latency, microseconds.
    pub mean_us: f64,
    /// Response codes (field 39) of the answers.
    pub codes: BTreeMap<String, u64>,
    /// Response codes by the `acquirer=` tag of field 48 ("none" when absent).
    pub codes_by_acquirer: BTreeMap<String, BTreeMap<String, u64>>,
    /// What became of labeled rows: only with `--data` (its keys then sit at the top
    /// level of the JSON).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub labels: Option<LabelReport>,
}

/// Fraud figures of a `--data` run. "Caught" is a 59 (suspected fraud) answer.
#[derive(Debug, Clone, Serialize)]
pub struct LabelReport {
    /// The labeled file replayed.
    pub data_file: String,
    /// Rows in the file.
    pub data_rows: u64,
    /// Why the run stopped: `end_of_file` (every row sent) or `duration` (rate × duration
    /// rows, fewer than the file has).
    pub ended_by: String,
    /// Fraud rows among the rows sent (answered or not).
    pub fraud_sent: u64,
    /// Fraud rows answered 59.
    pub fraud_caught: u64,
    /// Legitimate rows answered 59.
    pub legit_declined: u64,
    /// Amount of the fraud rows sent, minor units (currencies added as numbers).
    pub fraud_amount_minor: u64,
    /// Amount of the fraud rows answered 59, minor units.
    pub fraud_amount_caught_minor: u64,
    /// Fraud rows sent, by scenario.
    pub fraud_sent_by_scenario: BTreeMap<String, u64>,
    /// Fraud rows answered 59, by scenario (every scenario sent is listed).
    pub fraud_caught_by_scenario: BTreeMap<String, u64>,
}

/// What a `--data` run knows besides its tallies.
pub(crate) struct DataFacts {
    pub(crate) file: String,
    pub(crate) rows: u64,
    pub(crate) ended_by_file: bool,
    pub(crate) sent: SentSummary,
    pub(crate) scenarios: Vec<String>,
}

impl LabelReport {
    fn new(facts: DataFacts, tally: &LabelTally) -> LabelReport {
        let mut caught: BTreeMap<String, u64> = facts
            .sent
            .fraud_sent_by_scenario
            .keys()
            .map(|k| (k.clone(), 0))
            .collect();
        for (s, n) in &tally.caught_by_scenario {
            if let Some(name) = facts.scenarios.get(usize::from(*s)) {
                bump(&mut caught, name, *n);
            }
        }
        LabelReport {
            data_file: facts.file,
            data_rows: facts.rows,
            ended_by: if facts.ended_by_file {
                "end_of_file"
            } else {
                "duration"
            }
            .into(),
            fraud_sent: facts.sent.fraud_sent,
            fraud_caught: tally.fraud_caught,
            legit_declined: tally.legit_declined,
            fraud_amount_minor: facts.sent.fraud_amount_minor,
            fraud_amount_caught_minor: tally.fraud_amount_caught_minor,
            fraud_sent_by_scenario: facts.sent.fraud_sent_by_scenario,
            fraud_caught_by_scenario: caught,
        }
    }

    fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "  data      {} ({} rows), ended by {}",
            self.data_file, self.data_rows, self.ended_by
        );
        let _ = writeln!(
            out,
            "  fraud     {} sent, {} caught (59), amount {} of {} minor caught; {} legitimate declined (59)",
            self.fraud_sent,
            self.fraud_caught,
            self.fraud_amount_caught_minor,
            self.fraud_amount_minor,
            self.legit_declined
        );
        for (scenario, sent) in &self.fraud_sent_by_scenario {
            let caught = self
                .fraud_caught_by_scenario
                .get(scenario)
                .copied()
                .unwrap_or(0);
            let _ = writeln!(out, "  scenario  {scenario}: {caught} of {sent} caught");
        }
    }
}

/// What the report says about the run besides the tallies.
pub(crate) struct RunFacts {
    pub(crate) target: String,
    pub(crate) mode: Mode,
    pub(crate) connections: usize,
    pub(crate) duration: Duration,
    pub(crate) elapsed: Duration,
    pub(crate) offered_tps: f64,
    pub(crate) sent: u64,
    pub(crate) data: Option<DataFacts>,
}

impl Report {
    pub(crate) fn new(facts: RunFacts, tally: &Tally) -> Report {
        let errors: u64 = tally.errors.values().sum();
        let h = &tally.latency_us;
        let at = |q: f64| {
            if h.is_empty() {
                0
            } else {
                h.value_at_quantile(q)
            }
        };
        let elapsed_s = facts.elapsed.as_secs_f64();
        Report {
            retransmissions: 0,
            target: facts.target,
            mode: facts.mode,
            connections: facts.connections,
            duration_s: facts.duration.as_secs_f64(),
            elapsed_s,
            offered_tps: facts.offered_tps,
            achieved_tps: if elapsed_s > 0.0 {
                tally.answered as f64 / elapsed_s
            } else {
                0.0
            },
            sent: facts.sent,
            answered: tally.answered,
            errors,
            errors_by_kind: tally
                .errors
                .iter()
                .map(|(k, n)| ((*k).to_owned(), *n))
                .collect(),
            late_responses: tally.late,
            unmatched_responses: tally.unmatched,
            p50_us: at(0.5),
            p90_us: at(0.9),
            p99_us: at(0.99),
            p999_us: at(0.999),
            max_us: if h.is_empty() { 0 } else { h.max() },
            mean_us: if h.is_empty() { 0.0 } else { h.mean() },
            codes: tally.codes.clone(),
            codes_by_acquirer: tally.by_acquirer.clone(),
            labels: facts.data.map(|d| LabelReport::new(d, &tally.labels)),
        }
    }

    /// The report for people, several lines.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counts = |map: &BTreeMap<String, u64>| {
            map.iter()
                .map(|(k, n)| format!("{k}: {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            out,
            "load on {} ({}, {} connection{})",
            self.target,
            self.mode.as_str(),
            self.connections,
            if self.connections == 1 { "" } else { "s" }
        );
        let _ = writeln!(
            out,
            "  offered   {:.1} TPS for {:.1} s: {} requests",
            self.offered_tps, self.duration_s, self.sent
        );
        let _ = writeln!(
            out,
            "  achieved  {:.1} TPS: {} answered in {:.2} s, {} errors",
            self.achieved_tps, self.answered, self.elapsed_s, self.errors
        );
        let _ = writeln!(
            out,
            "  latency   p50 {} us, p90 {} us, p99 {} us, p99.9 {} us, max {} us (mean {:.0} us)",
            self.p50_us, self.p90_us, self.p99_us, self.p999_us, self.max_us, self.mean_us
        );
        let _ = writeln!(out, "  codes     {}", counts(&self.codes));
        for (acquirer, codes) in &self.codes_by_acquirer {
            let _ = writeln!(out, "  acquirer  {acquirer}: {}", counts(codes));
        }
        if let Some(labels) = &self.labels {
            labels.render(&mut out);
        }
        if self.errors > 0 {
            let _ = writeln!(out, "  errors    {}", counts(&self.errors_by_kind));
        }
        if self.late_responses + self.unmatched_responses > 0 {
            let _ = writeln!(
                out,
                "  stray     {} late responses, {} unmatched",
                self.late_responses, self.unmatched_responses
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use payswitch_protocol::Mti;

    use super::*;

    fn response(code: &str, field48: Option<&str>) -> Message {
        let mut b = Message::builder(Mti::AUTHORIZATION_RESPONSE);
        b.set_str(39, code).unwrap();
        if let Some(text) = field48 {
            b.set_str(48, text).unwrap();
        }
        b.build()
    }

    #[test]
    fn acquirer_tag_is_read_from_tagged_text() {
        assert_eq!(
            acquirer_tag(Some("decision=approve;score=0.01;acquirer=visa-a")),
            Some("visa-a")
        );
        assert_eq!(acquirer_tag(Some("acquirer=b;model=m1")), Some("b"));
        assert_eq!(acquirer_tag(Some("decision=decline")), None);
        assert_eq!(acquirer_tag(None), None);
    }

    #[test]
    fn tallies_merge_and_report_adds_up() {
        let mut a = Tally::new();
        a.answered(
            Duration::from_micros(100),
            &response("00", Some("acquirer=x")),
            None,
        );
        a.answered(Duration::from_micros(300), &response("05", None), None);
        a.failed(Failure::Timeout);
        let mut b = Tally::new();
        b.answered(
            Duration::from_millis(2),
            &response("00", Some("acquirer=x")),
            None,
        );
        b.failed(Failure::Overload);
        a.merge(&b);
        let facts = RunFacts {
            target: "127.0.0.1:1".into(),
            mode: Mode::Tcp,
            connections: 2,
            duration: Duration::from_secs(1),
            elapsed: Duration::from_secs(2),
            offered_tps: 5.0,
            sent: 5,
            data: None,
        };
        let report = Report::new(facts, &a);
        assert_eq!((report.sent, report.answered, report.errors), (5, 3, 2));
        assert_eq!(report.codes["00"], 2);
        assert_eq!(report.codes_by_acquirer["x"]["00"], 2);
        assert_eq!(report.codes_by_acquirer["none"]["05"], 1);
        assert_eq!(report.errors_by_kind["timeout"], 1);
        assert!(report.p50_us <= report.p90_us && report.p99_us <= report.max_us);
        assert!((report.achieved_tps - 1.5).abs() < 1e-9);
        let text = report.render();
        assert!(text.contains("acquirer  x: 00: 2"), "{text}");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["mode"], "tcp");
        assert_eq!(json["codes"]["05"], 1);
        assert!(json.get("fraud_sent").is_none(), "{json}");
    }
}
