//! Codec micro-benchmarks (issue 2): decode and encode of the DESIGN.md 0100 example, and
//! decode of a response-sized 0110 that needs the secondary bitmap. Figures, the commands
//! that produced them and the pyiso8583 comparison are in bench/RESULTS.md.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use payswitch_protocol::{Message, Mti};

/// The 0100 example of DESIGN.md (109 bytes, no frame header).
const DESIGN_EXAMPLE_HEX: &str = "303130307220440008c0800031363431313131313131313131313131313130303030303030303030303030313235303031313235313233303435303030303031353431313035313533333031323030303030315445524d303030314d45524348414e5430303030303031383430";

fn design_example() -> Bytes {
    Bytes::from(hex::decode(DESIGN_EXAMPLE_HEX).expect("the DESIGN.md example is hex"))
}

/// A 0110 as the switch answers the example: the echoed fields, 38, 39, the tagged text of
/// 48, and field 100 (receiving institution), which puts the secondary bitmap on the wire.
fn response_with_secondary_bitmap() -> Bytes {
    let request = Message::decode(design_example()).expect("the DESIGN.md example decodes");
    let mut builder = Message::builder(Mti::AUTHORIZATION_RESPONSE);
    builder
        .copy_from(&request, &[2, 3, 4, 7, 11, 37, 41, 42, 49])
        .and_then(|b| b.set_str(38, "A1B2C3"))
        .and_then(|b| b.set_str(39, "00"))
        .and_then(|b| {
            b.set_str(
                48,
                "decision=approve;score=0.0132;model=rf-2026-11-01;acquirer=acq-east",
            )
        })
        .and_then(|b| b.set_str(100, "00000012345"))
        .expect("the response fields fit the spec");
    builder.build().to_bytes()
}

fn codec(c: &mut Criterion) {
    let example = design_example();
    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Bytes(example.len() as u64));

    group.bench_function("decode_0100_design_example", |b| {
        b.iter(|| Message::decode(black_box(example.clone())))
    });

    let message = Message::decode(example.clone()).expect("the DESIGN.md example decodes");
    // Reused across iterations, as a connection's send buffer is.
    let mut out = BytesMut::with_capacity(1024);
    group.bench_function("encode_0100_design_example", |b| {
        b.iter(|| {
            out.clear();
            black_box(&message).encode(&mut out);
            black_box(out.len())
        })
    });

    let response = response_with_secondary_bitmap();
    group.throughput(Throughput::Bytes(response.len() as u64));
    group.bench_function("decode_0110_secondary_bitmap", |b| {
        b.iter(|| Message::decode(black_box(response.clone())))
    });
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
