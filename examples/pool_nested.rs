//! The seed's nested-acquisition deadlock, handled: ten workers share a pool of ten
//! connections, and each one's plugin runs a sub-task that wants a connection too.
//!
//! First the naive way (the sub-task acquires a second connection): instead of every worker
//! blocking until a 60 s timeout, the request that would close the cycle fails at once with
//! `WouldDeadlock`, and the other workers carry on. Then the correct way: the sub-task borrows
//! the connection its parent already holds.
//!
//! ```text
//! cargo run --example pool_nested
//! ```
// An example drives the engine from outside with std's threads and atomics: the `crate::sync`
// rule (clippy.toml) is for the engine's own code.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use millrace::{Pool, PoolError, PoolMetrics};

/// A stand-in for a database connection.
struct Conn {
    id: usize,
    queries: usize,
}

impl Conn {
    fn query(&mut self, what: &str) -> String {
        self.queries += 1;
        format!("conn {} ran {what}", self.id)
    }
}

/// The plugin's sub-task, written to use whatever connection it is given.
fn run_subtask(conn: &mut Conn, job: usize) -> String {
    conn.query(&format!("subtask of job {job}"))
}

fn main() {
    let next_id = std::sync::atomic::AtomicUsize::new(0);
    let pool = Pool::new("db", 10, move || {
        let id = next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok::<_, std::io::Error>(Conn { id, queries: 0 })
    });

    println!("naive: each sub-task acquires a second connection");
    let start = Instant::now();
    let refused = run_workers(&pool, |pool, job, _conn| {
        // The seed's bug: nested acquisition from a full pool.
        match pool.acquire_timeout(Duration::from_secs(60)) {
            Ok(mut second) => {
                run_subtask(&mut second, job);
                false
            }
            Err(e @ PoolError::WouldDeadlock { .. }) => {
                println!("  job {job}: {e}");
                true
            }
            Err(e) => panic!("job {job}: {e}"),
        }
    });
    println!(
        "  {refused} request(s) refused, all workers done in {:?} (not 60 s)",
        start.elapsed()
    );

    println!("correct: each sub-task borrows its parent's connection");
    let refused = run_workers(&pool, |_pool, job, conn| {
        conn.subtask(|c| run_subtask(c, job));
        false
    });
    println!("  {refused} request(s) refused");

    println!("\n{}\n{}", PoolMetrics::HEADER, pool.metrics());
}

/// Runs ten workers that each hold a connection (all at once, to reproduce the seed) and call
/// `work`; returns how many of them reported a refused request.
fn run_workers(
    pool: &Pool<Conn>,
    work: impl Fn(&Pool<Conn>, usize, &mut millrace::Lease<Conn>) -> bool + Sync,
) -> usize {
    let barrier = Arc::new(Barrier::new(10));
    thread::scope(|s| {
        let workers: Vec<_> = (0..10)
            .map(|job| {
                let (barrier, work) = (barrier.clone(), &work);
                s.spawn(move || {
                    let mut conn = pool.acquire().expect("first connection");
                    conn.query("main task");
                    barrier.wait(); // every connection is now held
                    work(pool, job, &mut conn)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("worker panicked"))
            .filter(|&refused| refused)
            .count()
    })
}
