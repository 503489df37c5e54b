//! What `--all-netns` pays at every poll to find the namespaces only a
//! process holds: the walk of /proc (`process_namespaces`: each PID's
//! `ns/net` inode), with PROCESSES (default 1000) more processes running
//! than the machine had, `sleep`s this bench starts and stops.
//!
//! Run: `make bench-netns-scan` (`cargo bench --bench netns_scan`).

use std::process::{Child, Command, Stdio};

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use xtcp::pipeline::netns::process_namespaces;

fn scan(c: &mut Criterion) {
    let extra: usize = std::env::var("PROCESSES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1000);
    let mut sleepers: Vec<Child> = (0..extra)
        .map(|_| {
            Command::new("sleep")
                .arg("600")
                .stdin(Stdio::null())
                .spawn()
                .expect("start sleep")
        })
        .collect();
    let processes = process_namespaces().len();
    c.bench_function(&format!("netns_scan_{processes}_processes"), |b| {
        b.iter(|| black_box(process_namespaces()))
    });
    for sleeper in &mut sleepers {
        let _ = sleeper.kill();
        let _ = sleeper.wait();
    }
}

criterion_group!(benches, scan);
criterion_main!(benches);
