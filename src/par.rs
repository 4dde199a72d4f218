//! Data parallelism inside one stage: the run's rayon pool and the head of a
//! [`map_par`](crate::Stream::map_par) step.
//!
//! A `map_par` stage hands each batch its head produced to a rayon pool, which maps the batch's
//! records on the pool's threads (work stealing, so an uneven batch still balances) and
//! collects the results in the batch's order. The stage's own thread waits meanwhile; the rest
//! of the stage (the operators after the step, the tail) then runs on it as usual.
//!
//! **One pool per run, not rayon's global pool.** [`ParPool`] is made on the first batch of the
//! first `map_par` instance (every `map_par` instance of the run shares it), its threads are
//! spawned through [`crate::sync::thread`], and `runtime::run` drops it after joining the
//! stage threads: dropping it terminates the pool and joins each of its threads, so none
//! outlives [`Pipeline::run`](crate::Pipeline::run) — the promise every engine thread keeps.
//! rayon's global pool would keep its threads for the life of the process, and share them with
//! whatever else in the process uses rayon. The size is
//! [`Options::par_threads`](crate::Options::par_threads) (default: rayon's, `RAYON_NUM_THREADS`
//! or one thread per CPU).
//!
//! **Panics, cancellation, early stop.** A panic in the mapped function is carried by rayon to
//! the stage thread once the batch's other jobs have finished (rayon does not abort), where the
//! worker's `catch_unwind` turns it into [`Error::Panic`](crate::Error::Panic) naming the stage.
//! Each record first checks the run's cancel flag (one load), so a cancelled or failing run
//! stops the batch after the records already started, not after the whole batch. A `limit` or a
//! consumer that is gone downstream stops the stage between batches, as in any stage: at most
//! one batch is mapped for nothing.

use std::marker::PhantomData;
use std::sync::Arc;

use rayon::prelude::*;

use crate::error::Error;
use crate::operator::Halt;
use crate::runtime::{Cx, Head, Pull};
use crate::sync::thread;

/// A rayon pool whose threads are joined when it is dropped.
///
/// Invariant: `threads` holds the handle of every thread the pool spawned, and `pool` is `Some`
/// until `drop`, which terminates the pool before joining them (a rayon thread leaves its loop
/// once its pool is terminated and it is idle).
pub(crate) struct ParPool {
    pool: Option<rayon::ThreadPool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl std::fmt::Debug for ParPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParPool")
            .field("threads", &self.threads.len())
            .finish()
    }
}

impl ParPool {
    /// A pool of `threads` threads (`None`: rayon's default), for the `map_par` steps of stage
    /// `stage` and the others of its run. A thread that cannot be spawned fails with
    /// [`Error::Spawn`] naming the stage, after joining the threads already started.
    pub(crate) fn new(threads: Option<usize>, stage: &str) -> Result<ParPool, Error> {
        let mut handles = Vec::new();
        let built = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.unwrap_or(0))
            .thread_name(|i| format!("millrace:rayon#{i}"))
            .spawn_handler(|t| {
                let mut b = thread::Builder::new();
                if let Some(name) = t.name() {
                    b = b.name(name.to_string());
                }
                handles.push(b.spawn(move || t.run())?);
                Ok(())
            })
            .build();
        match built {
            Ok(pool) => Ok(ParPool {
                pool: Some(pool),
                threads: handles,
            }),
            Err(e) => {
                // rayon has terminated the threads it started; wait for them.
                for h in handles {
                    let _ = h.join();
                }
                Err(Error::Spawn {
                    what: format!("the rayon pool of stage `{stage}`"),
                    stage: Some(stage.to_string()),
                    source: std::io::Error::other(e.to_string()),
                })
            }
        }
    }

    /// Runs `op` in the pool (its parallel iterators use the pool's threads); the calling
    /// thread waits. A panic in `op` is resumed here.
    pub(crate) fn install<R: Send>(&self, op: impl FnOnce() -> R + Send) -> R {
        self.pool
            .as_ref()
            .expect("the pool lives until dropped")
            .install(op)
    }
}

impl Drop for ParPool {
    fn drop(&mut self) {
        // Terminate first: each thread ends its loop once idle, and only then can be joined.
        drop(self.pool.take());
        for h in self.threads.drain(..) {
            // A thread's panic was caught by rayon and resumed in `install`'s caller.
            let _ = h.join();
        }
    }
}

/// The head of a `map_par` step: pulls a batch from `inner` (the stage's head with the
/// operators before the step) and maps its records with `f` on the run's pool, in order.
pub(crate) struct ParMapHead<I, U, F> {
    inner: Box<dyn Head<I>>,
    f: Arc<F>,
    /// The batch being mapped (drained by each pull, its capacity kept).
    tmp: Vec<I>,
    /// The run's pool, fetched on the first batch.
    pool: Option<Arc<ParPool>>,
    out: PhantomData<fn() -> U>,
}

impl<I, U, F> ParMapHead<I, U, F> {
    pub(crate) fn new(inner: Box<dyn Head<I>>, f: Arc<F>) -> Self {
        ParMapHead {
            inner,
            f,
            tmp: Vec::new(),
            pool: None,
            out: PhantomData,
        }
    }
}

impl<I, U, F> Head<U> for ParMapHead<I, U, F>
where
    I: Send,
    U: Send,
    F: Fn(I) -> U + Send + Sync,
{
    fn counts_input(&self) -> bool {
        self.inner.counts_input()
    }

    fn pull(&mut self, cx: &Cx, buf: &mut Vec<U>, flush_at: Option<u64>) -> Result<Pull, Halt> {
        let pull = self.inner.pull(cx, &mut self.tmp, flush_at)?;
        if self.tmp.is_empty() {
            return Ok(pull);
        }
        let pool = match self.pool.take() {
            Some(p) => p,
            None => cx.run.par_pool(&cx.stage)?,
        };
        let pool = &*self.pool.insert(pool);
        let n = self.tmp.len();
        let (run, f, tmp) = (&*cx.run, &*self.f, &mut self.tmp);
        // `buf` is empty: the mapped batch goes straight into it, in input order. A record
        // that finds the run cancelled is not mapped, and ends the batch.
        pool.install(|| {
            buf.par_extend(
                tmp.par_drain(..)
                    .map(|x| (!run.is_cancelled()).then(|| f(x)))
                    .while_some(),
            )
        });
        if buf.len() < n {
            buf.clear();
            return Err(Halt::Done);
        }
        Ok(pull)
    }

    fn state_support(&self) -> crate::checkpoint::StateSupport {
        self.inner.state_support()
    }

    fn snapshot(
        &mut self,
        cx: &Cx,
        state: &mut crate::checkpoint::state::InstanceState,
    ) -> Result<(), Halt> {
        self.inner.snapshot(cx, state)
    }

    fn restore(
        &mut self,
        cx: &Cx,
        state: &crate::checkpoint::state::InstanceState,
    ) -> Result<(), Halt> {
        self.inner.restore(cx, state)
    }
}
