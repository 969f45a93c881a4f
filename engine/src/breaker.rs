//! An acquirer's health, judged by what it does rather than by its socket: a circuit
//! breaker that performs no I/O and reads no clock.
//!
//! A connected acquirer can still be useless: answering after the timeout, or not at all.
//! Every authorization sent to it is then answered 91 and reversed, while a healthy
//! acquirer of the same route sits idle. The breaker watches three things and opens
//! (routing then skips the acquirer, and the route's next acquirer takes the traffic):
//! - **a stall**: requests outstanding and no answer for [`BreakerConfig::stall_ms`], or
//!   four times the acquirer's usual latency if that is longer (a slow-but-steady acquirer
//!   is not a stalled one). This is what notices an acquirer that stops answering, or a
//!   killed one whose connection has not timed out yet, within a fraction of a second
//!   instead of one request timeout;
//! - **failures**: of the last [`BreakerConfig::window`] outcomes, at least
//!   [`BreakerConfig::failure_percent`] timed out or were lost;
//! - while half-open, any probe that fails or stalls.
//!
//! Open, the breaker admits nothing for [`BreakerConfig::open_ms`] (doubling after each
//! failed probe, up to [`BreakerConfig::max_open_ms`]); then it is half-open and admits a
//! trickle of real traffic, one authorization at a time; [`BreakerConfig::probes`] answers
//! in a row, each quicker than the stall threshold, close it again.
//!
//! A probe is a real authorization: one that times out is answered 91 and reversed like
//! any other, so a probe costs at most one customer per open period, and only when no
//! other acquirer of its route would take it (routing tries closed acquirers first).
//!
//! Times are monotonic microseconds from the driver: the switch's own process clock, or
//! the simulator's.

use std::collections::VecDeque;

use serde::Deserialize;

/// Outcomes remembered for the failure ratio, at most: a ratio over more than this says
/// nothing more recent.
pub const MAX_WINDOW: usize = 1_000;

/// The breaker's settings (`[acquirers.breaker]`).
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// `false` turns the breaker off: the acquirer is used whenever it is connected.
    pub enabled: bool,
    /// Requests outstanding with no answer for this long (or four times the usual
    /// latency, if longer) open the breaker.
    pub stall_ms: u64,
    /// Outcomes the failure ratio is taken over (1..=1000).
    pub window: usize,
    /// Fewest outcomes in the window before the ratio is judged.
    pub min_samples: usize,
    /// Failures (timeouts, lost connections) in the window, in percent, that open it.
    pub failure_percent: u8,
    /// How long it stays open before the first probe.
    pub open_ms: u64,
    /// Longest open period, after repeated failed probes.
    pub max_open_ms: u64,
    /// Probes answered in a row, each quicker than the stall threshold, that close it.
    pub probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            enabled: true,
            stall_ms: 250,
            window: 50,
            min_samples: 10,
            failure_percent: 50,
            open_ms: 1_000,
            max_open_ms: 30_000,
            probes: 3,
        }
    }
}

impl BreakerConfig {
    /// The reason the settings make no sense, if they do not.
    pub fn check(&self) -> Result<(), String> {
        if !(1..=MAX_WINDOW).contains(&self.window) {
            return Err(format!("breaker.window must be 1..={MAX_WINDOW}"));
        }
        if self.min_samples == 0 || self.min_samples > self.window {
            return Err("breaker.min_samples must be 1..=window".into());
        }
        if !(1..=100).contains(&self.failure_percent) {
            return Err("breaker.failure_percent must be 1..=100".into());
        }
        if self.stall_ms == 0 || self.open_ms == 0 || self.probes == 0 {
            return Err("breaker.stall_ms, open_ms and probes must be above 0".into());
        }
        if self.max_open_ms < self.open_ms {
            return Err("breaker.max_open_ms must be at least open_ms".into());
        }
        Ok(())
    }
}

/// Where the breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Traffic flows.
    Closed,
    /// Nothing is admitted until `until`.
    Open {
        /// When the first probe may go.
        until: u64,
    },
    /// One probe at a time; `passed` answered in a row so far.
    HalfOpen {
        /// Probes answered in a row.
        passed: u32,
    },
}

impl State {
    /// `closed`, `open` or `half-open`.
    pub fn name(&self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open { .. } => "open",
            State::HalfOpen { .. } => "half-open",
        }
    }
}

/// Why the breaker opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trip {
    /// Requests outstanding and no answer for this many milliseconds.
    Stalled {
        /// Milliseconds without an answer.
        ms: u64,
    },
    /// Failures in the window, in percent.
    Failing {
        /// The failure ratio in percent.
        percent: u8,
    },
    /// A half-open probe failed or stalled.
    ProbeFailed,
}

impl std::fmt::Display for Trip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trip::Stalled { ms } => write!(f, "no answer for {ms} ms with requests outstanding"),
            Trip::Failing { percent } => write!(f, "{percent}% of recent requests failed"),
            Trip::ProbeFailed => write!(f, "a probe failed"),
        }
    }
}

/// A change of state the driver should report (WARN when it opens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Closed or half-open → open; `open_ms` is how long before the next probe.
    Opened {
        /// Why.
        trip: Trip,
        /// How long it stays open.
        open_ms: u64,
    },
    /// Open → half-open: the first probe is admitted.
    HalfOpened,
    /// Half-open → closed.
    Closed,
}

/// What the breaker says to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Send it.
    Yes,
    /// Send it as the half-open probe.
    Probe,
    /// Skip this acquirer.
    No,
}

/// One acquirer's circuit breaker.
#[derive(Debug, Clone)]
pub struct Breaker {
    config: BreakerConfig,
    state: State,
    /// Requests sent and not yet answered, failed or given up.
    outstanding: u32,
    /// Whether the half-open probe is out.
    probe_out: bool,
    /// When the half-open probe left.
    probe_sent: Option<u64>,
    /// When `outstanding` last went from 0 to 1.
    busy_since: u64,
    /// When the last answer came.
    last_answer: u64,
    /// The last outcomes, `true` for a failure; at most `config.window`.
    outcomes: VecDeque<bool>,
    failures: usize,
    /// Usual latency, microseconds (exponential average of answers while closed); 0
    /// until the first answer.
    latency_us: u64,
    /// The acquirer's timeout: no stall is judged longer than this.
    timeout_ms: u64,
    /// The next open period, doubling after a failed probe.
    next_open_ms: u64,
    /// Times it opened.
    pub opened: u64,
}

impl Breaker {
    /// A closed breaker for an acquirer whose requests time out after `timeout_ms`.
    pub fn new(config: BreakerConfig, timeout_ms: u64) -> Breaker {
        Breaker {
            config,
            state: State::Closed,
            outstanding: 0,
            probe_out: false,
            probe_sent: None,
            busy_since: 0,
            last_answer: 0,
            outcomes: VecDeque::with_capacity(config.window.min(MAX_WINDOW)),
            failures: 0,
            latency_us: 0,
            timeout_ms: timeout_ms.max(1),
            next_open_ms: config.open_ms,
            opened: 0,
        }
    }

    /// The state, after noticing a stall or the end of an open period due by `now`.
    pub fn state(&mut self, now: u64) -> (State, Option<Transition>) {
        let transition = self.tick(now);
        (self.state, transition)
    }

    /// The share of recent requests answered in time, thousandths, as balanced routes
    /// weigh it: 0 while open, a trickle (50) while half-open so probes still come.
    pub fn success_permille(&self) -> u32 {
        match self.state {
            State::Open { .. } if self.config.enabled => 0,
            State::HalfOpen { .. } if self.config.enabled => 50,
            _ if self.outcomes.is_empty() => 1_000,
            _ => {
                let len = self.outcomes.len();
                ((len - self.failures) * 1_000 / len) as u32
            }
        }
    }

    /// The state as last seen, without looking at the clock.
    pub fn last_state(&self) -> State {
        self.state
    }

    /// Whether a request may go now. A `Yes` or `Probe` must be followed by
    /// [`Breaker::sent`] or [`Breaker::not_sent`].
    pub fn admit(&mut self, now: u64) -> (Admit, Option<Transition>) {
        let transition = self.tick(now);
        let admit = if !self.config.enabled {
            Admit::Yes
        } else {
            match self.state {
                State::Closed => Admit::Yes,
                State::Open { .. } => Admit::No,
                State::HalfOpen { .. } if self.probe_out => Admit::No,
                State::HalfOpen { .. } => {
                    self.probe_out = true;
                    Admit::Probe
                }
            }
        };
        (admit, transition)
    }

    /// An admitted request was not sent after all (journal refused, link went down).
    pub fn not_sent(&mut self, admit: Admit) {
        if admit == Admit::Probe {
            self.probe_out = false;
        }
    }

    /// An admitted request left at `now`.
    pub fn sent(&mut self, now: u64) {
        if self.probe_out && self.probe_sent.is_none() {
            self.probe_sent = Some(now);
        }
        if self.outstanding == 0 {
            self.busy_since = now;
        }
        self.outstanding = self.outstanding.saturating_add(1);
    }

    /// A request sent was answered at `now`, `latency_us` after it left.
    pub fn answered(&mut self, now: u64, latency_us: u64, admit: Admit) -> Option<Transition> {
        self.outstanding = self.outstanding.saturating_sub(1);
        self.last_answer = now;
        self.record(false);
        match self.state {
            State::Closed => {
                // An average over ~16 answers: quick to follow a change, steady enough
                // that one slow answer does not move the stall threshold much.
                let latency_us = latency_us.max(1);
                self.latency_us = if self.latency_us == 0 {
                    latency_us
                } else {
                    (self.latency_us * 15 + latency_us) / 16
                };
                None
            }
            State::HalfOpen { passed } if admit == Admit::Probe => {
                self.probe_out = false;
                self.probe_sent = None;
                if latency_us / 1_000 >= self.stall_threshold_ms() {
                    return self.open(now, Trip::ProbeFailed);
                }
                let passed = passed + 1;
                if passed >= self.config.probes {
                    self.state = State::Closed;
                    // Requests outstanding from before are judged from now on.
                    self.busy_since = now;
                    self.next_open_ms = self.config.open_ms;
                    self.outcomes.clear();
                    self.failures = 0;
                    self.latency_us = latency_us.max(1);
                    Some(Transition::Closed)
                } else {
                    self.state = State::HalfOpen { passed };
                    None
                }
            }
            _ => None,
        }
    }

    /// A request sent timed out or was lost with the connection at `now`.
    pub fn failed(&mut self, now: u64, admit: Admit) -> Option<Transition> {
        self.outstanding = self.outstanding.saturating_sub(1);
        self.record(true);
        if admit == Admit::Probe {
            self.probe_out = false;
            self.probe_sent = None;
            if matches!(self.state, State::HalfOpen { .. }) {
                return self.open(now, Trip::ProbeFailed);
            }
            return None;
        }
        if self.state != State::Closed || !self.config.enabled {
            return None;
        }
        let samples = self.outcomes.len();
        if samples >= self.config.min_samples {
            let percent = (self.failures * 100 / samples) as u8;
            if percent >= self.config.failure_percent {
                return self.open(now, Trip::Failing { percent });
            }
        }
        None
    }

    /// The connection was lost and came back: requests outstanding on it are gone.
    pub fn reset_outstanding(&mut self) {
        self.outstanding = 0;
    }

    /// How long requests may be outstanding with no answer before it is a stall: the
    /// configured floor, or four times the usual latency if longer, and never beyond the
    /// timeout. Until the acquirer has answered once its usual latency is unknown, and
    /// only the timeout counts.
    pub fn stall_threshold_ms(&self) -> u64 {
        if self.latency_us == 0 {
            return self.timeout_ms;
        }
        self.config
            .stall_ms
            .max(self.latency_us.saturating_mul(4) / 1_000)
            .min(self.timeout_ms)
    }

    fn record(&mut self, failure: bool) {
        if self.outcomes.len() >= self.config.window && self.outcomes.pop_front() == Some(true) {
            self.failures -= 1;
        }
        self.outcomes.push_back(failure);
        self.failures += usize::from(failure);
    }

    fn tick(&mut self, now: u64) -> Option<Transition> {
        if !self.config.enabled {
            return None;
        }
        match self.state {
            State::Open { until } if now >= until => {
                self.state = State::HalfOpen { passed: 0 };
                self.probe_out = false;
                self.probe_sent = None;
                Some(Transition::HalfOpened)
            }
            // Half-open, only the probe is judged: requests from before it opened may
            // still be outstanding, and fail on their own.
            State::HalfOpen { .. } => {
                let sent = self.probe_sent?;
                let quiet_ms = now.saturating_sub(sent.max(self.last_answer)) / 1_000;
                (quiet_ms >= self.stall_threshold_ms())
                    .then(|| self.open(now, Trip::ProbeFailed))
                    .flatten()
            }
            State::Closed if self.outstanding > 0 => {
                let quiet_us = now.saturating_sub(self.busy_since.max(self.last_answer));
                let quiet_ms = quiet_us / 1_000;
                (quiet_ms >= self.stall_threshold_ms())
                    .then(|| self.open(now, Trip::Stalled { ms: quiet_ms }))
                    .flatten()
            }
            _ => None,
        }
    }

    fn open(&mut self, now: u64, trip: Trip) -> Option<Transition> {
        let open_ms = self.next_open_ms;
        if trip == Trip::ProbeFailed {
            self.next_open_ms = (self.next_open_ms * 2).min(self.config.max_open_ms);
        }
        self.state = State::Open {
            until: now.saturating_add(open_ms * 1_000),
        };
        self.probe_out = false;
        self.probe_sent = None;
        self.opened += 1;
        // Requests still outstanding fail on their own; a stall is not judged again until
        // something new is sent.
        self.busy_since = now;
        self.last_answer = now;
        Some(Transition::Opened { trip, open_ms })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000;

    fn breaker() -> Breaker {
        Breaker::new(BreakerConfig::default(), 2_000)
    }

    fn send(b: &mut Breaker, now: u64) -> Admit {
        let (admit, _) = b.admit(now);
        if admit != Admit::No {
            b.sent(now);
        }
        admit
    }

    #[test]
    fn a_healthy_acquirer_stays_closed() {
        let mut b = breaker();
        for i in 0..1_000 {
            let t = i * MS;
            assert_eq!(send(&mut b, t), Admit::Yes);
            assert_eq!(b.answered(t + 5 * MS, 5 * MS, Admit::Yes), None);
        }
        assert_eq!(b.state(2_000 * MS).0, State::Closed);
    }

    #[test]
    fn a_stall_opens_it_within_the_threshold_and_probes_close_it() {
        let mut b = breaker();
        for i in 0..100 {
            send(&mut b, i * MS);
            b.answered(i * MS + MS, MS, Admit::Yes);
        }
        // The acquirer stops answering at 100 ms.
        let mut t = 100 * MS;
        let mut opened_at = None;
        while t < 2_000 * MS {
            match b.admit(t) {
                (Admit::Yes, _) => b.sent(t),
                (Admit::No, Some(Transition::Opened { trip, .. })) => {
                    assert!(matches!(trip, Trip::Stalled { .. }), "{trip:?}");
                    opened_at = Some(t);
                    break;
                }
                other => panic!("{other:?}"),
            }
            t += MS;
        }
        let opened_at = opened_at.expect("opened");
        assert!(opened_at <= 100 * MS + 260 * MS, "{opened_at}");
        // Open for 1 s: nothing admitted.
        assert_eq!(b.admit(opened_at + 500 * MS).0, Admit::No);
        // Half-open: one probe at a time; three quick answers close it.
        let t = opened_at + 1_000 * MS;
        for i in 0..3 {
            let now = t + i * 10 * MS;
            let (admit, _) = b.admit(now);
            assert_eq!(admit, Admit::Probe);
            b.sent(now);
            assert_eq!(b.admit(now).0, Admit::No, "one probe at a time");
            let tr = b.answered(now + MS, MS, Admit::Probe);
            assert_eq!(tr.is_some(), i == 2);
        }
        assert_eq!(b.last_state(), State::Closed);
    }

    #[test]
    fn a_failed_probe_doubles_the_open_period() {
        let mut b = breaker();
        for i in 0..10 {
            send(&mut b, i * MS);
            b.answered(i * MS + MS, MS, Admit::Yes);
        }
        for i in 10..20 {
            send(&mut b, i * MS);
            b.failed(i * MS + 2_000 * MS, Admit::Yes);
        }
        let State::Open { until } = b.last_state() else {
            panic!("{:?}", b.last_state());
        };
        assert_eq!(send(&mut b, until), Admit::Probe);
        let tr = b.failed(until + 2_000 * MS, Admit::Probe);
        assert_eq!(
            tr,
            Some(Transition::Opened {
                trip: Trip::ProbeFailed,
                open_ms: 1_000
            })
        );
        let State::Open { until } = b.last_state() else {
            panic!()
        };
        assert_eq!(send(&mut b, until), Admit::Probe);
        // The probe stalls: noticed at the stall threshold, not at the timeout.
        let (_, tr) = b.state(until + 300 * MS);
        assert_eq!(
            tr,
            Some(Transition::Opened {
                trip: Trip::ProbeFailed,
                open_ms: 2_000
            })
        );
    }

    #[test]
    fn a_slow_but_steady_acquirer_is_not_a_stall() {
        let mut b = Breaker::new(BreakerConfig::default(), 5_000);
        // Answers take 800 ms; one request at a time.
        let mut t = 0;
        for _ in 0..50 {
            assert_eq!(send(&mut b, t), Admit::Yes);
            assert_eq!(b.state(t + 700 * MS).1, None);
            t += 800 * MS;
            assert_eq!(b.answered(t, 800 * MS, Admit::Yes), None);
        }
        assert!(b.stall_threshold_ms() >= 3_000);
    }

    #[test]
    fn failures_under_the_ratio_do_not_open_it() {
        let mut b = breaker();
        for i in 0..200 {
            let t = i * 10 * MS;
            send(&mut b, t);
            if i % 3 == 0 {
                assert_eq!(b.failed(t + MS, Admit::Yes), None);
            } else {
                b.answered(t + MS, MS, Admit::Yes);
            }
        }
        assert_eq!(b.last_state(), State::Closed);
    }

    #[test]
    fn disabled_admits_everything() {
        let mut b = Breaker::new(
            BreakerConfig {
                enabled: false,
                ..BreakerConfig::default()
            },
            2_000,
        );
        for i in 0..100 {
            assert_eq!(send(&mut b, i * MS), Admit::Yes);
            b.failed(i * MS + 1, Admit::Yes);
        }
        assert_eq!(b.state(10_000 * MS).0, State::Closed);
    }
}
