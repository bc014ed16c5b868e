//! The cost of one acquire+release pair, beside the baselines a user would otherwise reach
//! for: `portpicker::pick_unused_port()` and binding port 0.
//!
//! ```text
//! cargo bench --bench acquire
//! ```

use std::hint::black_box;
use std::net::TcpListener;

use criterion::{criterion_group, criterion_main, Criterion};
use portdaddy::PortDaddy;

fn pairs(c: &mut Criterion) {
    let mut group = c.benchmark_group("pair");

    let dir = tempfile::tempdir().expect("temp dir");
    let file = PortDaddy::open(dir.path().join("registry.sqlite3")).expect("open registry");
    group.bench_function("file registry acquire+release", |b| {
        b.iter(|| black_box(file.acquire("bench").expect("acquire").port()))
    });

    let memory = PortDaddy::builder()
        .in_memory()
        .open()
        .expect("open in memory");
    group.bench_function("in-memory acquire+release", |b| {
        b.iter(|| black_box(memory.acquire("bench").expect("acquire").port()))
    });

    group.bench_function("baseline portpicker::pick_unused_port", |b| {
        b.iter(|| black_box(portpicker::pick_unused_port()))
    });

    group.bench_function("baseline bind 127.0.0.1:0 then close", |b| {
        b.iter(|| {
            let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind");
            black_box(listener.local_addr().expect("addr").port())
        })
    });
    group.finish();
}

criterion_group!(benches, pairs);
criterion_main!(benches);
