//! Starting a run with checkpoints: opening the store, handling the checkpoints found there
//! (refuse, discard, or resume from the newest that verifies), matching the restored instances
//! to the pipeline's, and making the coordinator.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::coordinator::{Config, Coordinator, Expected, SystemClock};
use super::state::InstanceState;
use super::store::{Manifest, Store};
use super::{CheckpointId, CheckpointOptions, CheckpointRun, InstanceId, Start};
use crate::error::Error;

/// One stage instance of the pipeline about to run.
#[derive(Debug, Clone)]
pub(crate) struct StartInstance {
    pub id: InstanceId,
    pub fingerprint: String,
    pub stateful: bool,
    pub dead_letter_side: bool,
    /// Its stage's instance count.
    pub parallelism: usize,
}

/// The file-system store on `dir` (which also takes the directory's lock: a second run on it
/// is refused with `Error::CheckpointDirLocked`).
fn default_store(opts: &CheckpointOptions) -> Result<Arc<dyn Store>, Error> {
    let store: Arc<dyn Store> =
        super::store::FsStore::open_with(&opts.dir, super::run_fs(Some(opts)))?;
    Ok(store)
}

/// Opens the store, deals with what it holds as `opts.start` says, and makes the run's
/// checkpointing part.
pub(crate) fn start(
    opts: &CheckpointOptions,
    instances: &[StartInstance],
) -> Result<CheckpointRun, Error> {
    let store = match &opts.store {
        Some(s) => Arc::clone(s),
        None => default_store(opts)?,
    };
    // Names only: a checkpoint's files are read (and verified) once, by the resume that
    // restores from it, and not at all when nothing resumes.
    let listings = store.ids()?;
    let newest_present = listings.iter().map(|l| l.0).max().unwrap_or(0);
    let mut restored = BTreeMap::new();
    let mut resumed_from = None;
    let mut skipped = Vec::new();
    let mut complete = Vec::new();
    let mut leftovers = Vec::new();
    let mut fresh_discards = None;
    // Read under the directory's lock (taken by opening the store): no other run appends.
    let spooled = super::spool::spooled_len(&opts.dir)?;
    let completed = store.completed()?;
    let mut already_completed = None;
    match opts.start {
        // The directory's run completed: what is left of it (checkpoints kept by
        // retain_on_success, or a removal a crash interrupted) is discarded at the gate.
        Start::RefuseExisting if completed.is_some() => {
            fresh_discards = Some(listings.iter().map(|l| l.0).collect());
        }
        // Nothing to resume: the run does nothing, and says so — after finishing the removal
        // a crash interrupted (unless the checkpoints are to be kept).
        Start::Resume if completed.is_some() => {
            log::info!(
                "{}: the run completed: nothing to resume",
                opts.dir.display()
            );
            if !opts.retain_on_success {
                for l in &listings {
                    store.discard(l.0)?;
                }
                super::spool::remove(&opts.dir)?;
            }
            already_completed = completed;
        }
        Start::RefuseExisting => {
            if let Some(l) = listings.last() {
                return Err(Error::CheckpointsExist {
                    dir: opts.dir.display().to_string(),
                    newest: format!("checkpoint {}", l.0),
                });
            }
            // A run that spooled stdin but crashed before its first checkpoint: its input is
            // in the spool, and a new run would read it as the start of its own.
            if let Some(n) = spooled {
                return Err(Error::CheckpointsExist {
                    dir: opts.dir.display().to_string(),
                    newest: format!("a stdin spool of {n} bytes ({})", super::spool::SPOOL_FILE),
                });
            }
        }
        Start::Fresh => {
            // Discarded when the start gate opens (`CheckpointRun::open_gate`), not here: a
            // run refused before it starts must leave them as they were.
            fresh_discards = Some(listings.iter().map(|l| l.0).collect());
        }
        Start::Resume => {
            for &(id, has_manifest) in listings.iter().rev() {
                if resumed_from.is_some() {
                    // Older than the one resumed from: not read. Retention treats one with a
                    // manifest as complete, and removes it once newer ones are.
                    match has_manifest {
                        true => complete.push(id),
                        false => leftovers.push(id),
                    }
                    continue;
                }
                let attempt = match has_manifest {
                    false => Err(
                        "incomplete: no MANIFEST (the run stopped, or the checkpoint \
                                  failed, before it completed)"
                            .to_string(),
                    ),
                    true => load(&*store, id),
                };
                match attempt {
                    Ok((manifest, states)) => {
                        check_compatible(&manifest, instances, opts)?;
                        restored = states;
                        resumed_from = Some(id);
                        complete.push(id);
                    }
                    Err(problem) => {
                        log::warn!("skipping checkpoint {id}: {problem}");
                        skipped.push((id, problem));
                        leftovers.push(id);
                    }
                }
            }
            complete.sort_unstable();
            leftovers.sort_unstable();
            match resumed_from {
                Some(id) => log::info!("resuming from checkpoint {id}"),
                None => log::info!("no checkpoint verifies: starting from the beginning"),
            }
            if let (true, Some(n)) = (opts.spool_stdin, spooled) {
                log::info!(
                    "the stdin spool holds {n} bytes of the input: this run's stdin is \
                     appended after them (give it the rest of the input, or none)"
                );
            }
        }
    }
    let expected = instances
        .iter()
        .map(|i| Expected {
            instance: i.id.clone(),
            fingerprint: i.fingerprint.clone(),
            stateful: i.stateful,
            dead_letter_side: i.dead_letter_side,
        })
        .collect();
    let coord = Coordinator::new(
        Config::from(opts),
        Arc::clone(&store),
        Arc::new(SystemClock::new()),
        expected,
        newest_present,
        complete,
        leftovers,
    )
    .with_trigger_hook(opts.trigger_hook.clone());
    // The sinks' pre-committed files are committed through the file system they were
    // written on.
    let fs = super::run_fs(Some(opts));
    let coord = coord.with_commit(move |p| crate::sink::commit_part(&*fs, std::path::Path::new(p)));
    Ok(CheckpointRun {
        coord: Arc::new(coord),
        store,
        mode: opts.mode,
        restored,
        retain_on_success: opts.retain_on_success,
        resumed_from,
        skipped,
        drop_ack: opts.drop_ack.clone(),
        fresh_discards,
        dir: opts.dir.clone(),
        spool_stdin: opts.spool_stdin,
        spool_taken: crate::sync::AtomicBool::new(false),
        already_completed,
    })
}

/// Checkpoint `id`'s manifest and every instance's decoded state, or why not.
type Loaded = (Manifest, BTreeMap<InstanceId, InstanceState>);

/// Reads each file once (`Store::load_files` verifies it on the bytes it returns).
fn load(store: &dyn Store, id: CheckpointId) -> Result<Loaded, String> {
    let (manifest, files) = store.load_files(id).map_err(|e| match e {
        Error::Checkpoint { message } => message,
        e => e.to_string(),
    })?;
    if manifest.format != super::store::FORMAT {
        return Err(format!(
            "format {} (this build reads format {})",
            manifest.format,
            super::store::FORMAT
        ));
    }
    let mut states = BTreeMap::new();
    for (e, bytes) in manifest.instances.iter().zip(files) {
        let state =
            InstanceState::decode(&bytes).map_err(|err| format!("{}: {err}", e.instance))?;
        states.insert(e.instance.clone(), state);
    }
    Ok((manifest, states))
}

/// Refuses a resume whose pipeline changed a stateful stage (its fingerprint or its instance
/// count), or changed `max_parallelism`.
fn check_compatible(
    manifest: &Manifest,
    instances: &[StartInstance],
    opts: &CheckpointOptions,
) -> Result<(), Error> {
    if manifest.max_parallelism != opts.max_parallelism {
        return Err(Error::Checkpoint {
            message: format!(
                "checkpoint {} was taken with max_parallelism = {}, this run has {}: it is fixed for the life of a checkpoint directory",
                manifest.id, manifest.max_parallelism, opts.max_parallelism
            ),
        });
    }
    let mut old: BTreeMap<&str, (usize, &str, bool)> = BTreeMap::new();
    for e in &manifest.instances {
        let o = old
            .entry(&e.instance.stage)
            .or_insert((0, &e.fingerprint, e.stateful));
        o.0 += 1;
    }
    let mut new: BTreeMap<&str, &StartInstance> = BTreeMap::new();
    for i in instances {
        new.entry(&i.id.stage).or_insert(i);
    }
    for (stage, i) in &new {
        let Some((count, fp, was_stateful)) = old.get(stage) else {
            continue;
        };
        if !(i.stateful || *was_stateful) {
            continue;
        }
        if *fp != i.fingerprint {
            return Err(Error::Checkpoint {
                message: format!(
                    "cannot resume from checkpoint {}: stateful stage `{stage}` changed (was `{fp}`, now `{}`)",
                    manifest.id, i.fingerprint
                ),
            });
        }
        if *count != i.parallelism {
            return Err(Error::Checkpoint {
                message: format!(
                    "cannot resume from checkpoint {}: stateful stage `{stage}` had {count} instances, now {}",
                    manifest.id, i.parallelism
                ),
            });
        }
    }
    for stage in old.keys() {
        if !new.contains_key(stage) {
            log::warn!(
                "checkpoint {}: stage `{stage}` is no longer in the pipeline; its state is dropped",
                manifest.id
            );
        }
    }
    Ok(())
}
