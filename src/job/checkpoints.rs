//! What a run report says of checkpoints, as JSON: the `checkpoints` member of a job's report
//! (`GET /jobs/{id}`), of its progress and final events, and of `millrace run --progress json`.
//! The CLI's end-of-run "checkpoints" lines are printed from the same JSON, so the two never
//! disagree.
//!
//! ```text
//! "checkpoints": null                       (the run has no [checkpoint] table)
//! "checkpoints": {
//!   "completed": 12, "failed": 1,           counts over the run
//!   "last_completed": 13,                   the newest complete checkpoint's id (or null)
//!   "bytes": 48213,                         state written by the completed ones
//!   "max_alignment_ms": 4,                  the longest alignment of any of them
//!   "slowest_alignment": "count#0",         the instance that aligned longest (or null)
//!   "resumed_from": 7,                      the checkpoint the run resumed from (or null)
//!   "skipped": [{"id": 8, "reason": "…"}],  newer ones a resume skipped, and why
//!   "recent": [CheckpointStats, …]          the last RECENT checkpoints, oldest first
//! }
//! ```

use serde_json::{json, Value};

use crate::checkpoint::{CheckpointId, CheckpointStats, Outcome};
use crate::RunReport;

/// How many of the latest checkpoints `recent` lists (a long run at 100 ms would otherwise
/// grow every progress event without bound).
pub(crate) const RECENT: usize = 32;

/// A run's checkpoints, as the report holds them.
#[derive(Debug, Clone, Default)]
pub(crate) struct Record {
    /// Every checkpoint of the run (or the latest ones the report keeps), oldest first.
    pub history: Vec<CheckpointStats>,
    /// The checkpoint the run resumed from.
    pub resumed_from: Option<CheckpointId>,
    /// Newer checkpoints the resume skipped (torn, bit-flipped, incomplete), and why.
    pub skipped: Vec<(CheckpointId, String)>,
}

/// The report's checkpoints; `None` for a run without checkpoints.
pub(crate) fn record(r: &RunReport) -> Option<Record> {
    (!r.checkpoints.is_empty() || r.resumed_from.is_some()).then(|| Record {
        history: r.checkpoints.clone(),
        resumed_from: r.resumed_from,
        skipped: r.skipped_checkpoints.clone(),
    })
}

/// The `checkpoints` member of a report's JSON (see the module documentation).
pub(crate) fn to_json(r: &RunReport) -> Value {
    record(r).map_or(Value::Null, |c| record_json(&c))
}

/// [`to_json`] of a record.
pub(crate) fn record_json(c: &Record) -> Value {
    let done = || c.history.iter().filter(|s| s.outcome == Outcome::Completed);
    let slowest = done()
        .filter(|s| s.slowest_alignment.is_some())
        .max_by_key(|s| s.max_alignment_ms);
    let skip = c.history.len().saturating_sub(RECENT);
    json!({
        "completed": done().count(),
        "failed": c.history.iter().filter(|s| s.outcome != Outcome::Completed).count(),
        "last_completed": done().map(|s| s.id).max(),
        "bytes": done().map(|s| s.bytes).sum::<u64>(),
        "max_alignment_ms": done().map(|s| s.max_alignment_ms).max().unwrap_or(0),
        "slowest_alignment": slowest.and_then(|s| s.slowest_alignment.clone()),
        "resumed_from": c.resumed_from,
        "skipped": c.skipped.iter().map(|(id, why)| json!({"id": id, "reason": why})).collect::<Vec<_>>(),
        "recent": serde_json::to_value(&c.history[skip..]).unwrap_or(Value::Null),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(id: u64, ok: bool, bytes: u64, align: u64) -> CheckpointStats {
        CheckpointStats {
            id,
            outcome: if ok {
                Outcome::Completed
            } else {
                Outcome::Failed
            },
            duration_ms: 3,
            bytes,
            max_alignment_ms: align,
            slowest_alignment: ok.then(|| format!("count#{id}")),
            error: (!ok).then(|| "timed out".to_string()),
        }
    }

    #[test]
    fn the_summary_counts_sums_and_names_the_slowest() {
        let c = Record {
            history: vec![
                stats(8, true, 100, 2),
                stats(9, false, 0, 0),
                stats(10, true, 250, 7),
                stats(11, true, 50, 1),
            ],
            resumed_from: Some(7),
            skipped: vec![(8, "state file count#0.state: CRC32C mismatch".into())],
        };
        let j = record_json(&c);
        assert_eq!(j["completed"], 3);
        assert_eq!(j["failed"], 1);
        assert_eq!(j["last_completed"], 11);
        assert_eq!(j["bytes"], 400);
        assert_eq!(j["max_alignment_ms"], 7);
        assert_eq!(j["slowest_alignment"], "count#10");
        assert_eq!(j["resumed_from"], 7);
        assert_eq!(j["skipped"][0]["id"], 8);
        assert!(j["skipped"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("CRC32C"));
        assert_eq!(j["recent"].as_array().unwrap().len(), 4);
        assert_eq!(j["recent"][1]["outcome"], "failed");
        assert_eq!(j["recent"][1]["error"], "timed out");
    }

    #[test]
    fn recent_keeps_the_latest_only_and_an_empty_run_says_none_completed() {
        let c = Record {
            history: (1..=100).map(|i| stats(i, true, 1, 0)).collect(),
            ..Record::default()
        };
        let j = record_json(&c);
        let recent = j["recent"].as_array().unwrap();
        assert_eq!(recent.len(), RECENT);
        assert_eq!(recent[0]["id"], 100 - RECENT as u64 + 1);
        assert_eq!(j["completed"], 100, "counts cover the whole history");
        let j = record_json(&Record::default());
        assert_eq!(j["completed"], 0);
        assert_eq!(j["last_completed"], Value::Null);
        assert_eq!(j["resumed_from"], Value::Null);
        assert_eq!(j["slowest_alignment"], Value::Null);
    }
}
