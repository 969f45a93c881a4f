//! Single-row forest scoring: 100 trees × depth 8, the shape `payswitch model train` makes.
//!
//! Before criterion's own measurement it prints p50/p99 of single `Model::score` calls timed
//! one by one, as `payswitch model bench` does (the figure the latency target is set on).
//!
//! The forest is trained on a synthetic dataset by default; `PSWM_BENCH_MODEL=<file.pswm>`
//! and `PSWM_BENCH_DATA=<labeled.csv>` bench a saved model on a labeled file's rows instead.

use std::hint::black_box;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use payswitch_models::data;
use payswitch_models::features::{Features, FEATURE_COUNT};
use payswitch_models::model::{Model, ModelKind};
use payswitch_models::train::{self, Dataset, TrainOptions};

/// Synthetic rows: enough fraud rows (about 2 %) for 100 trees to reach depth 8.
const SYNTHETIC_ROWS: usize = 60_000;
/// Single calls timed for the percentiles: as many as `payswitch model bench` takes.
const PERCENTILE_SAMPLES: usize = 200_000;

/// splitmix64: a deterministic, dependency-free source of bench data.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Features on different scales (counts, logs, flags); fraud depends on a few of them
/// non-linearly, with label noise, so the trees grow to their full depth.
fn synthetic_dataset(rows: usize) -> Dataset {
    let mut rng = SplitMix(7);
    let mut data = Dataset::default();
    for _ in 0..rows {
        let mut x = [0f32; FEATURE_COUNT];
        for (i, v) in x.iter_mut().enumerate() {
            let u = rng.unit();
            *v = match i % 4 {
                0 => u * 12.0,
                1 => f32::from(u < 0.1),
                2 => (u * 40.0).floor(),
                _ => (1.0 + u * 1_000.0).ln(),
            };
        }
        let risk = 0.35 * x[0] / 12.0
            + 0.2 * x[1]
            + 0.25 * (x[2] / 40.0).powi(2)
            + 0.15 * f32::from(x[7] > 6.0 && x[12] > 3.0)
            + 0.1 * (x[13] / 7.0);
        let fraud = risk + 0.25 * rng.unit() > 0.82 || rng.unit() < 0.002;
        data.features.push(x);
        data.labels.push(fraud);
        data.amounts.push(1 + rng.next() % 100_000);
    }
    data
}

fn forest_and_rows() -> (Model, Vec<Features>) {
    if let (Ok(model), Ok(rows)) = (
        std::env::var("PSWM_BENCH_MODEL"),
        std::env::var("PSWM_BENCH_DATA"),
    ) {
        let model = Model::load_file(model.as_ref()).expect("PSWM_BENCH_MODEL loads");
        let file = std::fs::File::open(rows).expect("PSWM_BENCH_DATA opens");
        let rows = data::read_all(std::io::BufReader::new(file)).expect("PSWM_BENCH_DATA parses");
        return (model, train::replay(&rows).features);
    }
    let data = synthetic_dataset(SYNTHETIC_ROWS);
    let options = TrainOptions {
        kind: ModelKind::Forest,
        trees: 100,
        depth: 8,
        ..TrainOptions::default()
    };
    let model = train::train_on(&data, &options).expect("synthetic data trains");
    (model, data.features)
}

/// p50 and p99 in ns of single calls, each timed on its own, over distinct rows.
fn percentiles(rows: &[Features], model: &Model) -> (u64, u64) {
    let mut ns = Vec::with_capacity(PERCENTILE_SAMPLES);
    let mut sink = 0f32;
    for i in 0..PERCENTILE_SAMPLES {
        let x = black_box(&rows[i % rows.len()]);
        let start = Instant::now();
        sink += model.score(x);
        ns.push(start.elapsed().as_nanos() as u64);
    }
    black_box(sink);
    ns.sort_unstable();
    (ns[ns.len() / 2], ns[ns.len() * 99 / 100])
}

fn forest(c: &mut Criterion) {
    let (model, rows) = forest_and_rows();
    println!(
        "forest: {} trees, depth {}, max_cost {}, {} rows",
        model.trees(),
        model.depth(),
        model.max_cost(),
        rows.len()
    );
    // Three passes, to show the spread on a shared machine.
    for pass in 1..=3 {
        let (p50, p99) = percentiles(&rows, &model);
        println!("single calls, pass {pass}: p50 {p50} ns, p99 {p99} ns");
    }
    let mut i = 0;
    c.bench_function("forest/score_100x8", |b| {
        b.iter(|| {
            i = (i + 1) % rows.len();
            model.score(black_box(&rows[i]))
        })
    });
}

criterion_group!(benches, forest);
criterion_main!(benches);
