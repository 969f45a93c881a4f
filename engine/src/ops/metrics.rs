//! Latency recording: an HdrHistogram per stage (and per acquirer), written on the hot path
//! without contention, merged on read.
//!
//! Each worker thread records into its own slot (a thread-local handle to histograms
//! nobody else writes), under a mutex that only the once-a-second collector ever contends
//! for; a request's timings are recorded in one go, one lock per request. Every second
//! the collector takes each slot's histograms (leaving empty ones), merges them into the
//! second's histogram, keeps the last [`WINDOW_SECONDS`] seconds for the "last 10 s"
//! percentiles, adds them to the since-start histograms, and appends a point to the
//! series the dashboard draws ([`SERIES_SECONDS`] of them).
//!
//! Histograms hold nanoseconds from 1 ns to 100 s with two significant digits (values
//! within 1 %), 32 KiB each.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Seconds in the "last 10 s" window.
pub const WINDOW_SECONDS: usize = 10;
/// Seconds of per-second points kept for the dashboard's charts: five minutes.
pub const SERIES_SECONDS: usize = 300;
/// Largest value recorded: 100 s in nanoseconds (a request cannot take longer than the
/// acquirer timeout plus the drain; this is far beyond).
const MAX_NS: u64 = 100_000_000_000;
/// Significant digits of every histogram.
const SIGFIGS: u8 = 2;

/// The stages of an authorization that are timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Decoding the frame.
    Decode,
    /// Validating the request.
    Validate,
    /// Waiting in the card's shard queue.
    Queue,
    /// Features, models and rules.
    Score,
    /// Picking the route.
    Route,
    /// Waiting for journal appends to be durable (all of the request's).
    Journal,
    /// The acquirer's round trip.
    Acquirer,
    /// The switch's own time: end to end less the acquirer.
    Switch,
    /// End to end, acquirer included.
    Total,
}

impl Stage {
    /// Every stage, in pipeline order.
    pub const ALL: [Stage; 9] = [
        Stage::Decode,
        Stage::Validate,
        Stage::Queue,
        Stage::Score,
        Stage::Route,
        Stage::Journal,
        Stage::Acquirer,
        Stage::Switch,
        Stage::Total,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Validate => "validate",
            Stage::Queue => "queue",
            Stage::Score => "score",
            Stage::Route => "route",
            Stage::Journal => "journal",
            Stage::Acquirer => "acquirer",
            Stage::Switch => "switch",
            Stage::Total => "total",
        }
    }
}

const STAGES: usize = Stage::ALL.len();

/// The timings of one request, filled in as it goes and recorded at the end.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    ns: [Option<u64>; STAGES],
    /// The acquirer that answered, with its round trip.
    acquirer: Option<(usize, u64)>,
}

impl Timings {
    /// Sets `stage` to `elapsed`.
    pub fn set(&mut self, stage: Stage, elapsed: Duration) {
        self.ns[stage as usize] = Some(elapsed.as_nanos().min(u128::from(MAX_NS)) as u64);
    }

    /// Records the acquirer `index`'s round trip (also the `acquirer` stage).
    pub fn set_acquirer(&mut self, index: usize, elapsed: Duration) {
        self.set(Stage::Acquirer, elapsed);
        self.acquirer = Some((index, self.ns[Stage::Acquirer as usize].unwrap_or(0)));
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_NS, SIGFIGS).expect("static bounds are valid")
}

/// Histograms with exact sums (Prometheus wants `_sum`; a histogram's mean is rounded).
#[derive(Debug, Clone)]
struct Summed {
    histogram: Histogram<u64>,
    sum_ns: u64,
}

impl Summed {
    fn new() -> Summed {
        Summed {
            histogram: histogram(),
            sum_ns: 0,
        }
    }

    fn record(&mut self, ns: u64) {
        let _ = self.histogram.record(ns.max(1));
        self.sum_ns = self.sum_ns.saturating_add(ns);
    }

    fn add(&mut self, other: &Summed) {
        let _ = self.histogram.add(&other.histogram);
        self.sum_ns = self.sum_ns.saturating_add(other.sum_ns);
    }

    fn reset(&mut self) {
        self.histogram.reset();
        self.sum_ns = 0;
    }
}

/// One set of histograms: per stage and per acquirer.
#[derive(Debug, Clone)]
struct Set {
    stages: Vec<Summed>,
    acquirers: Vec<Summed>,
}

impl Set {
    fn new(acquirers: usize) -> Set {
        Set {
            stages: (0..STAGES).map(|_| Summed::new()).collect(),
            acquirers: (0..acquirers).map(|_| Summed::new()).collect(),
        }
    }

    fn add(&mut self, other: &Set) {
        for (a, b) in self.stages.iter_mut().zip(&other.stages) {
            a.add(b);
        }
        for (a, b) in self.acquirers.iter_mut().zip(&other.acquirers) {
            a.add(b);
        }
    }

    fn reset(&mut self) {
        self.stages.iter_mut().for_each(Summed::reset);
        self.acquirers.iter_mut().for_each(Summed::reset);
    }
}

/// One worker thread's histograms since the last collection.
struct Slot {
    set: Mutex<Set>,
}

/// Source of ids telling apart the `Metrics` of several switches in one process.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's slot in each live `Metrics` (one, outside tests).
    static SLOTS: RefCell<Vec<(u64, Arc<Slot>)>> = const { RefCell::new(Vec::new()) };
}

/// Percentiles of one histogram, microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    /// Values recorded.
    pub count: u64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest.
    pub max_us: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let us = |ns: u64| ns as f64 / 1_000.0;
        Percentiles {
            count: h.len(),
            p50_us: us(h.value_at_quantile(0.5)),
            p90_us: us(h.value_at_quantile(0.9)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }
}

/// What the collector keeps.
struct Collected {
    /// The last seconds, newest last, at most `WINDOW_SECONDS`.
    seconds: VecDeque<Set>,
    since_start: Set,
    /// Per-second points, newest last, at most `SERIES_SECONDS`.
    series: VecDeque<Point>,
}

/// One second of the dashboard's charts.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// Unix seconds at the end of the second.
    pub t: u64,
    /// Requests timed in that second.
    pub count: u64,
    /// p99 per stage, microseconds, in `Stage::ALL` order (0 when nothing was timed).
    pub p99_us: [f64; STAGES],
}

/// The switch's latency recording.
pub struct Metrics {
    id: u64,
    enabled: bool,
    acquirers: usize,
    slots: Mutex<Vec<Arc<Slot>>>,
    collected: Mutex<Collected>,
    started: Instant,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("enabled", &self.enabled)
            .finish()
    }
}

/// Bucket bounds of the Prometheus histograms, seconds: 10 µs to 10 s, 1-2.5-5 steps.
pub const BUCKETS_S: [f64; 19] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A since-start histogram as Prometheus buckets: cumulative counts at each bound of
/// [`BUCKETS_S`], the count and the sum in seconds.
#[derive(Debug, Clone)]
pub struct Buckets {
    /// Cumulative count at or below each bound.
    pub cumulative: [u64; BUCKETS_S.len()],
    /// All values (the `+Inf` bucket).
    pub count: u64,
    /// Sum of the values, seconds.
    pub sum_s: f64,
}

impl Buckets {
    /// No value recorded.
    pub fn empty() -> Buckets {
        Buckets {
            cumulative: [0; BUCKETS_S.len()],
            count: 0,
            sum_s: 0.0,
        }
    }

    fn of(s: &Summed) -> Buckets {
        let h = &s.histogram;
        let mut cumulative = [0; BUCKETS_S.len()];
        for (c, bound) in cumulative.iter_mut().zip(BUCKETS_S) {
            let ns = (bound * 1e9) as u64;
            // Values within the histogram's precision of the bound count as below it.
            *c = h.count_between(0, ns);
        }
        Buckets {
            cumulative,
            count: h.len(),
            sum_s: s.sum_ns as f64 / 1e9,
        }
    }
}

impl Metrics {
    /// Recording for a switch with `acquirers` acquirers; `enabled: false` records nothing
    /// (to measure what recording costs).
    pub fn new(acquirers: usize, enabled: bool) -> Metrics {
        Metrics {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            enabled,
            acquirers,
            slots: Mutex::new(Vec::new()),
            collected: Mutex::new(Collected {
                seconds: VecDeque::with_capacity(WINDOW_SECONDS),
                since_start: Set::new(acquirers),
                series: VecDeque::with_capacity(SERIES_SECONDS),
            }),
            started: Instant::now(),
        }
    }

    /// Whether recording is on.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Time since the switch started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Runs `f` on this thread's histograms, registering them the first time.
    fn with_slot(&self, f: impl FnOnce(&mut Set)) {
        SLOTS.with(|slots| {
            let mut slots = slots.borrow_mut();
            let slot = match slots.iter().find(|(id, _)| *id == self.id) {
                Some((_, slot)) => slot,
                None => {
                    let slot = Arc::new(Slot {
                        set: Mutex::new(Set::new(self.acquirers)),
                    });
                    self.slots
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(Arc::clone(&slot));
                    slots.push((self.id, slot));
                    &slots.last().expect("just pushed").1
                }
            };
            f(&mut slot.set.lock().unwrap_or_else(|e| e.into_inner()));
        });
    }

    /// Records one request's timings.
    pub fn record(&self, timings: &Timings) {
        if !self.enabled {
            return;
        }
        self.with_slot(|set| {
            for (stage, ns) in timings.ns.iter().enumerate() {
                if let Some(ns) = ns {
                    set.stages[stage].record(*ns);
                }
            }
            if let Some((index, ns)) = timings.acquirer {
                if let Some(h) = set.acquirers.get_mut(index) {
                    h.record(ns);
                }
            }
        });
    }

    /// Takes what every thread recorded since the last call into the window, the
    /// since-start histograms and the series. Called once a second by [`Metrics::run`].
    pub fn collect(&self) {
        let mut second = Set::new(self.acquirers);
        let slots: Vec<Arc<Slot>> = self.slots.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for slot in slots {
            let mut set = slot.set.lock().unwrap_or_else(|e| e.into_inner());
            second.add(&set);
            set.reset();
        }
        let mut collected = self.collected();
        collected.since_start.add(&second);
        let mut p99_us = [0.0; STAGES];
        for (p, s) in p99_us.iter_mut().zip(&second.stages) {
            *p = Percentiles::of(&s.histogram).p99_us;
        }
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let count = second.stages[Stage::Total as usize].histogram.len();
        if collected.series.len() == SERIES_SECONDS {
            collected.series.pop_front();
        }
        collected.series.push_back(Point { t, count, p99_us });
        if collected.seconds.len() == WINDOW_SECONDS {
            collected.seconds.pop_front();
        }
        collected.seconds.push_back(second);
    }

    /// Collects every second until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => self.collect(),
            }
        }
    }

    fn collected(&self) -> std::sync::MutexGuard<'_, Collected> {
        self.collected.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The last `WINDOW_SECONDS` merged.
    fn window(&self, collected: &Collected) -> Set {
        let mut window = Set::new(self.acquirers);
        for second in &collected.seconds {
            window.add(second);
        }
        window
    }

    /// Percentiles per stage over the last `WINDOW_SECONDS` and since start.
    pub fn stage_percentiles(&self) -> Vec<(Stage, Percentiles, Percentiles)> {
        let collected = self.collected();
        let window = self.window(&collected);
        Stage::ALL
            .iter()
            .map(|&stage| {
                (
                    stage,
                    Percentiles::of(&window.stages[stage as usize].histogram),
                    Percentiles::of(&collected.since_start.stages[stage as usize].histogram),
                )
            })
            .collect()
    }

    /// Percentiles per acquirer over the last `WINDOW_SECONDS`.
    pub fn acquirer_percentiles(&self) -> Vec<Percentiles> {
        let collected = self.collected();
        self.window(&collected)
            .acquirers
            .iter()
            .map(|s| Percentiles::of(&s.histogram))
            .collect()
    }

    /// The per-second points, oldest first.
    pub fn series(&self) -> Vec<Point> {
        self.collected().series.iter().cloned().collect()
    }

    /// Since-start buckets per stage, in `Stage::ALL` order.
    pub fn stage_buckets(&self) -> Vec<Buckets> {
        self.collected()
            .since_start
            .stages
            .iter()
            .map(Buckets::of)
            .collect()
    }

    /// Since-start buckets per acquirer.
    pub fn acquirer_buckets(&self) -> Vec<Buckets> {
        self.collected()
            .since_start
            .acquirers
            .iter()
            .map(Buckets::of)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_on_several_threads_merged_on_read() {
        let metrics = Arc::new(Metrics::new(2, true));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let metrics = Arc::clone(&metrics);
                std::thread::spawn(move || {
                    for i in 1..=1_000u64 {
                        let mut timings = Timings::default();
                        timings.set(Stage::Switch, Duration::from_micros(i));
                        timings.set_acquirer((t % 2) as usize, Duration::from_millis(1));
                        metrics.record(&timings);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        metrics.collect();
        let stages = metrics.stage_percentiles();
        let (_, window, since) = stages[Stage::Switch as usize];
        assert_eq!(window.count, 4_000);
        assert_eq!(since.count, 4_000);
        assert!((window.p50_us - 500.0).abs() <= 5.0, "{window:?}");
        assert!((window.p99_us - 990.0).abs() <= 10.0, "{window:?}");
        let acquirers = metrics.acquirer_percentiles();
        assert_eq!(acquirers[0].count + acquirers[1].count, 4_000);
        let buckets = &metrics.stage_buckets()[Stage::Switch as usize];
        assert_eq!(buckets.count, 4_000);
        assert!(buckets.cumulative.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(buckets.cumulative[BUCKETS_S.len() - 1], 4_000);
        // 0.25 ms: each thread's first 250 values (1..=250 µs), within the precision.
        let at_250us = buckets.cumulative[4];
        assert!((980..=1_020).contains(&at_250us), "{at_250us}");
        let exact_sum_s: f64 = 4.0 * (1..=1_000).map(|i| i as f64 * 1e-6).sum::<f64>();
        assert!((buckets.sum_s - exact_sum_s).abs() < 1e-9);
        // Collected: the next second starts empty.
        metrics.collect();
        assert_eq!(metrics.series().last().unwrap().count, 0);
    }

    #[test]
    fn disabled_records_nothing() {
        let metrics = Metrics::new(1, false);
        let mut timings = Timings::default();
        timings.set(Stage::Total, Duration::from_micros(5));
        metrics.record(&timings);
        metrics.collect();
        assert_eq!(
            metrics.stage_percentiles()[Stage::Total as usize].2.count,
            0
        );
    }
}
