//! What latency recording costs a request: one `Metrics::record` of a full set of stage
//! timings (the thread's slot lookup, its uncontended lock, nine histogram records and the
//! acquirer's), against the same with recording turned off.

use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use payswitch::ops::metrics::{Metrics, Stage, Timings};

fn timings(i: u64) -> Timings {
    let mut t = Timings::default();
    for (k, stage) in Stage::ALL.iter().enumerate() {
        t.set(
            *stage,
            Duration::from_nanos(200 + (i * 7919 + k as u64 * 104_729) % 2_000_000),
        );
    }
    t.set_acquirer((i % 2) as usize, Duration::from_micros(500 + i % 700));
    t
}

fn bench(c: &mut Criterion) {
    let on = Metrics::new(2, true);
    let off = Metrics::new(2, false);
    let samples: Vec<Timings> = (0..1024).map(timings).collect();
    let mut i = 0;
    c.bench_function("metrics_record_on", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            on.record(black_box(&samples[i]));
        })
    });
    c.bench_function("metrics_record_off", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            off.record(black_box(&samples[i]));
        })
    });
    c.bench_function("metrics_collect_one_thread", |b| b.iter(|| on.collect()));
}

criterion_group!(benches, bench);
criterion_main!(benches);
