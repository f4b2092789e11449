//! Directory lookup and registration cost versus the number of registered targets.
//!
//! For each N the directory is built once, outside the timed loops, with two key-set
//! groups:
//!
//! * `{app, pod}`: nine targets in ten, `app = app-{i % APPS}`, `pod = pod-{i}`;
//! * `{app, pod, zone}`: every tenth target (`i % 10 == 9`), with `zone = zone-{i % 3}`.
//!
//! `APPS` is 100, capped at N / 2 so that an `app`-only lookup is ambiguous even at
//! N = 10. Both groups have `app` and `pod`, so a lookup probes the groups carrying its
//! rarest pair (one group by `pod`, both by `app`).
//!
//! Projection indexes are built lazily on the first lookup that uses a projection
//! (an O(group size) one-off), then maintained on every insert and remove. Each N
//! warms the three projections used here (`{app, pod}`, `{pod}`, `{app}`) before
//! measuring, so lookups see hot indexes and registrations pay for maintaining all
//! three. The one-off costs (building the directory, the first lookup of each
//! projection) are printed to stderr, not benchmarked.
//!
//! Lookups cycle through precomputed queries (up to `QUERIES` targets spread evenly
//! over the directory; for the ambiguous case, every app value) so that at large N
//! they do not always hit the same cache lines.
//!
//! Run with `cargo bench -p flower-switchboard --bench directory`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use flower_proto::Labels;
use flower_switchboard::directory::{Directory, Lookup};

const SIZES: [usize; 3] = [10, 1_000, 100_000];
const QUERIES: usize = 1024;

fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn apps(n: usize) -> usize {
    (n / 2).clamp(1, 100)
}

/// Whether target `i` is in the `{app, pod, zone}` group.
fn zoned(i: usize) -> bool {
    i % 10 == 9
}

fn target_labels(i: usize, apps: usize) -> Labels {
    let mut l = labels(&[
        ("app", format!("app-{}", i % apps)),
        ("pod", format!("pod-{i}")),
    ]);
    if zoned(i) {
        l.insert("zone".into(), format!("zone-{}", i % 3));
    }
    l
}

/// Indices of up to `QUERIES` targets of the `{app, pod}` group, spread over 0..n.
fn sample(n: usize) -> Vec<usize> {
    let step = (n / QUERIES).max(1);
    (0..n)
        .step_by(step)
        .filter(|&i| !zoned(i))
        .take(QUERIES)
        .collect()
}

fn build(n: usize) -> Directory<()> {
    let apps = apps(n);
    let mut dir = Directory::new();
    for i in 0..n {
        dir.insert(target_labels(i, apps), ())
            .expect("benchmark targets do not conflict");
    }
    assert_eq!(dir.len(), n);
    dir
}

/// Times one call, for the one-off costs reported on stderr.
fn once<R>(f: impl FnOnce() -> R) -> (R, Duration) {
    let start = Instant::now();
    let r = f();
    (r, start.elapsed())
}

/// Loops over `queries`, asserting each answer once before it is timed.
fn bench_lookups(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    n: usize,
    dir: &mut Directory<()>,
    queries: &[(Labels, Lookup)],
) {
    for (q, expect) in queries {
        assert_eq!(&dir.lookup(q), expect, "{name} N={n} query {q:?}");
    }
    let mut next = queries.iter().map(|(q, _)| q).cycle();
    group.bench_function(BenchmarkId::new(name, n), |b| {
        b.iter(|| dir.lookup(black_box(next.next().unwrap())))
    });
}

/// Registers `fresh` (cloned in the untimed setup) and removes it again.
fn bench_insert_remove(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    n: usize,
    dir: &mut Directory<()>,
    fresh: &Labels,
) {
    group.bench_function(BenchmarkId::new(name, n), |b| {
        b.iter_batched(
            || fresh.clone(),
            |l| {
                let id = dir.insert(l, ()).expect("fresh target does not conflict");
                dir.remove(id)
            },
            BatchSize::SmallInput,
        )
    });
}

fn directory(c: &mut Criterion) {
    let mut group = c.benchmark_group("directory");
    group
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));

    for n in SIZES {
        let apps = apps(n);
        let (mut dir, built) = once(|| build(n));
        let sample = sample(n);

        // Warm the lazily built projection indexes and report what that cost.
        let i = sample[sample.len() / 2];
        let (_, exact_cold) = once(|| dir.lookup(&target_labels(i, apps)));
        let (_, pod_cold) = once(|| dir.lookup(&labels(&[("pod", format!("pod-{i}"))])));
        let (_, app_cold) = once(|| dir.lookup(&labels(&[("app", "app-0".into())])));
        eprintln!(
            "N={n}: build {built:?}; first lookup by {{app,pod}} {exact_cold:?}, \
             by {{pod}} {pod_cold:?}, by {{app}} {app_cold:?}"
        );

        // 1. Exact lookup of an existing target.
        let queries: Vec<_> = sample
            .iter()
            .map(|&i| (target_labels(i, apps), Lookup::Found(i as u64 + 1)))
            .collect();
        bench_lookups(&mut group, "lookup_exact", n, &mut dir, &queries);

        // 2. Lookup by pod only: the {pod} projection index of each group.
        let queries: Vec<_> = sample
            .iter()
            .map(|&i| {
                let q = labels(&[("pod", format!("pod-{i}"))]);
                (q, Lookup::Found(i as u64 + 1))
            })
            .collect();
        bench_lookups(&mut group, "lookup_pod", n, &mut dir, &queries);

        // 3a. Ambiguous: each app value is shared by N / APPS targets across both
        //     groups; the two oldest are targets `a` and `a + APPS`.
        let queries: Vec<_> = (0..apps)
            .map(|a| {
                let q = labels(&[("app", format!("app-{a}"))]);
                (q, Lookup::Ambiguous(a as u64 + 1, (a + apps) as u64 + 1))
            })
            .collect();
        bench_lookups(&mut group, "lookup_ambiguous", n, &mut dir, &queries);

        // 3b. NotFound: an existing pod with an existing app that is not its own.
        let queries: Vec<_> = sample
            .iter()
            .map(|&i| {
                let q = labels(&[
                    ("app", format!("app-{}", (i + 1) % apps)),
                    ("pod", format!("pod-{i}")),
                ]);
                (q, Lookup::NotFound)
            })
            .collect();
        bench_lookups(&mut group, "lookup_not_found", n, &mut dir, &queries);

        // 4. Registration: insert a fresh, non-conflicting target, then remove it. The
        //    labels are cloned in the untimed setup; the insert checks for conflicts
        //    (one lookup) and updates all three warmed indexes of the {app, pod} group.
        let fresh = labels(&[("app", "app-3".into()), ("pod", "pod-fresh".into())]);
        bench_insert_remove(&mut group, "insert_remove", n, &mut dir, &fresh);
        assert_eq!(dir.len(), n);
    }
    group.finish();
}

/// Many distinct key sets (hardening finding 5): `KEY_SETS` targets of one registrant,
/// each with a key set of its own (`{app, id, k<i>}`, `app = evil`), beside a
/// bystander's two targets `{app = web, pod}`. Every target has `app`, so a bystander's
/// lookup touches only the groups holding `app = web`. `split` adds two targets that
/// leave out `app` and `pod` in turn (`{pod, id, j}` and `{app, id, j}`): then no key of
/// the lookup is on every target, and the lookup also asks which key sets leave out
/// both of its keys (a bitmap difference over all groups).
fn key_sets(c: &mut Criterion) {
    const KEY_SETS: usize = 10_000;
    let mut group = c.benchmark_group("key_sets");
    group
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for split in [false, true] {
        let mut dir = Directory::new();
        let (_, built) = once(|| {
            for i in 0..KEY_SETS {
                let l = labels(&[
                    ("app", "evil".into()),
                    ("id", i.to_string()),
                    (&format!("k{i}"), "x".into()),
                ]);
                dir.insert(l, ())
                    .expect("attacker targets contradict each other");
            }
        });
        let web = |pod: &str| labels(&[("app", "web".into()), ("pod", pod.into())]);
        let one = dir.insert(web("1"), ()).unwrap();
        dir.insert(web("2"), ()).unwrap();
        if split {
            dir.insert(
                labels(&[("pod", "9".into()), ("id", "a".into()), ("j", "1".into())]),
                (),
            )
            .unwrap();
            dir.insert(
                labels(&[("app", "db".into()), ("id", "b".into()), ("j", "2".into())]),
                (),
            )
            .unwrap();
        }
        let name = if split { "split" } else { "common_key" };
        eprintln!("key_sets {name}: {KEY_SETS} key sets built in {built:?}");
        let queries = vec![(web("1"), Lookup::Found(one))];
        bench_lookups(
            &mut group,
            &format!("{name}_lookup"),
            KEY_SETS,
            &mut dir,
            &queries,
        );
        let fresh = web("fresh");
        let name = format!("{name}_insert_remove");
        bench_insert_remove(&mut group, &name, KEY_SETS, &mut dir, &fresh);
    }
    group.finish();
}

criterion_group!(benches, directory, key_sets);
criterion_main!(benches);
