//! The library side of `millrace checkpoint list DIR` and `millrace checkpoint verify DIR`.
//!
//! Both open the directory read-only and without its lock (a running job's directory may be
//! inspected: nothing is written or removed). [`list`] is every checkpoint with its size and
//! whether it is complete and verifies; [`verify`] checks, beyond every checksum:
//! - for each stage with keyed state (`key_groups`), that its instances' ranges cover
//!   `0..max_parallelism` completely and disjointly;
//! - that no source instance's position in a part is behind the same instance's position in
//!   that part in the previous complete checkpoint;
//! - that every sink file pre-committed is present, either under its pre-commit name or under
//!   its committed one (the name with its leading `.` and trailing `.pending` removed). A
//!   relative path is taken relative to the current directory: sinks record absolute paths;
//! - that the stdin spool, if there is one, reads: every frame's checksum (a torn last frame
//!   is what a crash leaves, and is not a problem).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::store::{FsStore, Listing, Manifest, Store};
use super::CheckpointId;
use crate::error::Error;
use std::sync::Arc;

/// One thing wrong with a checkpoint directory.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Problem {
    /// The checkpoint it is in.
    pub checkpoint: CheckpointId,
    /// What is wrong, naming the file, stage or part.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "checkpoint {}: {}", self.checkpoint, self.message)
    }
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Verification {
    /// How many checkpoints the directory holds (complete or not).
    pub checkpoints: usize,
    /// Every problem found (none: all verify).
    pub problems: Vec<Problem>,
    /// The stdin spool's payload bytes, or why it does not read (a frame that fails its
    /// checksum with data after it); `None` when the directory has no spool.
    pub spool: Option<Result<u64, String>>,
}

fn open(dir: &Path) -> Result<Arc<FsStore>, Error> {
    FsStore::open_read_only(dir, Arc::new(super::fs::RealFs))
}

/// Every checkpoint in `dir`, ascending, each verified (`problem` says why one is not
/// complete or does not verify).
pub fn list(dir: impl AsRef<Path>) -> Result<Vec<Listing>, Error> {
    open(dir.as_ref())?.list()
}

/// Every problem of every checkpoint in `dir` (none: all verify); see the module docs for
/// what is checked.
pub fn verify(dir: impl AsRef<Path>) -> Result<Verification, Error> {
    let store = open(dir.as_ref())?;
    let mut v = verify_store(&*store)?;
    v.spool = super::spool::spooled_len(dir.as_ref())
        .map_err(|e| e.to_string())
        .transpose();
    Ok(v)
}

/// [`verify`] over any store.
#[doc(hidden)]
pub fn verify_store(store: &dyn Store) -> Result<Verification, Error> {
    let mut problems = Vec::new();
    let mut previous: Option<Manifest> = None;
    let listings = store.list()?;
    let checkpoints = listings.len();
    for listing in listings {
        let id = listing.id;
        if let Some(message) = listing.problem {
            problems.push(Problem {
                checkpoint: id,
                message,
            });
            continue;
        }
        let manifest = match store.load(id) {
            Ok(m) => m,
            // Changed since it was listed (a running job's retention).
            Err(e) => {
                problems.push(Problem {
                    checkpoint: id,
                    message: e.to_string(),
                });
                continue;
            }
        };
        let mut found = Vec::new();
        key_group_problems(&manifest, &mut found);
        if let Some(prev) = &previous {
            position_problems(prev, &manifest, &mut found);
        }
        precommit_problems(&manifest, &mut found);
        problems.extend(found.into_iter().map(|message| Problem {
            checkpoint: id,
            message,
        }));
        previous = Some(manifest);
    }
    Ok(Verification {
        checkpoints,
        problems,
        spool: None,
    })
}

/// Each keyed stage's instances' ranges must tile `0..max_parallelism`.
fn key_group_problems(m: &Manifest, out: &mut Vec<String>) {
    /// Per stage: each instance's name and key-group range.
    type Groups = Vec<(String, Option<(u16, u16)>)>;
    let mut stages: BTreeMap<&str, Groups> = BTreeMap::new();
    for inst in &m.instances {
        stages
            .entry(&inst.instance.stage)
            .or_default()
            .push((inst.instance.to_string(), inst.key_groups));
    }
    for (stage, instances) in stages {
        if instances.iter().all(|(_, g)| g.is_none()) {
            continue;
        }
        let mut ranges = Vec::new();
        for (name, groups) in &instances {
            match groups {
                None => out.push(format!(
                    "stage `{stage}`: instance {name} has no key groups while others have"
                )),
                Some((s, e)) if s >= e || *e > m.max_parallelism => out.push(format!(
                    "stage `{stage}`: instance {name} has key groups {s}..{e}, not a range \
                     within 0..{}",
                    m.max_parallelism
                )),
                Some(r) => ranges.push((*r, name.as_str())),
            }
        }
        ranges.sort();
        let mut next = 0u16;
        for ((s, e), name) in ranges {
            if s > next {
                out.push(format!(
                    "stage `{stage}`: key groups {next}..{s} are not covered by any instance"
                ));
            } else if s < next {
                out.push(format!(
                    "stage `{stage}`: key groups {s}..{} of instance {name} overlap another \
                     instance's",
                    next.min(e)
                ));
            }
            next = next.max(e);
        }
        if next < m.max_parallelism {
            out.push(format!(
                "stage `{stage}`: key groups {next}..{} are not covered by any instance",
                m.max_parallelism
            ));
        }
    }
}

/// No source instance may be behind where it was in the previous complete checkpoint.
fn position_problems(prev: &Manifest, m: &Manifest, out: &mut Vec<String>) {
    for inst in &m.instances {
        let Some(before) = prev.instances.iter().find(|p| p.instance == inst.instance) else {
            continue;
        };
        for (part, offset) in &inst.positions {
            if let Some((_, was)) = before.positions.iter().find(|(p, _)| p == part) {
                if offset < was {
                    out.push(format!(
                        "source {}: position in `{part}` is {offset}, behind {was} in \
                         checkpoint {}",
                        inst.instance, prev.id
                    ));
                }
            }
        }
    }
}

/// The committed name of a pre-committed file: `.<name>.pending` → `<name>` (same
/// directory); `None` when the name is not of that form.
fn committed_name(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?.to_str()?;
    let base = name.strip_prefix('.')?.strip_suffix(".pending")?;
    (!base.is_empty()).then(|| path.with_file_name(base))
}

/// Every pre-committed sink file must be there, pending or committed.
fn precommit_problems(m: &Manifest, out: &mut Vec<String>) {
    for inst in &m.instances {
        for file in &inst.precommitted {
            let path = Path::new(file);
            if path.exists() || committed_name(path).is_some_and(|p| p.exists()) {
                continue;
            }
            out.push(format!(
                "sink {}: pre-committed file {file} is missing (neither pending nor committed)",
                inst.instance
            ));
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn committed_names_drop_the_dot_and_pending() {
        assert_eq!(
            committed_name(Path::new("/o/.part-1.pending")),
            Some(PathBuf::from("/o/part-1"))
        );
        assert_eq!(committed_name(Path::new("/o/part-1")), None);
        assert_eq!(committed_name(Path::new("/o/..pending")), None);
    }
}
