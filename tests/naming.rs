//! One way of naming: every step gets a default name from its kind, `.name()` renames the step
//! just added (an operator, a head, a `key_by`, a window, a sink), and the names reach the
//! report, the errors and the stage list.

use millrace::window::{Count, Tumbling, WindowSpec};
use millrace::{Error, Pipeline, Timestamp};

#[test]
fn default_names_count_up_per_kind() {
    let p = Pipeline::new();
    p.source("n", 0..3u32)
        .map(|x| x + 1)
        .map(|x| x * 2)
        .new_stage()
        .for_each(|_| {});
    assert_eq!(p.stage_names(), vec!["n+map+map-2", "for_each"]);
}

#[test]
fn every_kind_of_step_can_be_renamed() {
    let p = Pipeline::new();
    let spec = WindowSpec::new(Tumbling::new(10, 0).unwrap(), |t: &i64| Timestamp(*t));
    p.source("src", vec![1i64, 2, 11])
        .name("ticks")
        .map(|t| t)
        .name("same")
        .key_by(|_| 0u8)
        .name("one_key")
        .window(spec, Count)
        .name("per10")
        .results()
        .for_each(|_| {})
        .name("out");
    assert_eq!(
        p.stage_names(),
        vec!["ticks+same+one_key", "per10+results+out"]
    );
    let report = p.run().unwrap();
    assert_eq!(report.stage("ticks").unwrap().records_out, 3);
    assert_eq!(report.stage("per10").unwrap().records_in, 3);
    assert_eq!(report.stage("out").unwrap().records_out, 2);
}

#[test]
fn aggregations_and_sort_are_renamed_like_heads() {
    let p = Pipeline::new();
    let out = p
        .source("n", 1..=6u32)
        .key_by(|x| x % 2)
        .reduce(|a, b| a + b)
        .name("sums")
        .sort_by(|a, b| a.cmp(b))
        .name("sorted")
        .collect();
    assert_eq!(p.stage_names(), vec!["n+key_by", "sums", "sorted+collect"]);
    p.run().unwrap();
    assert_eq!(out.take(), vec![(0, 12), (1, 9)]);
}

#[test]
fn a_duplicate_name_fails_the_run_naming_it() {
    let p = Pipeline::new();
    p.source("a", 0..1u32)
        .map(|x| x)
        .name("twice")
        .for_each(|_| {});
    p.source("b", 0..1u32).for_each(|_| {}).name("twice");
    let err = p.run().unwrap_err();
    assert!(
        matches!(&err, Error::Build(m) if m == "duplicate stage name `twice`"),
        "{err}"
    );
}

#[test]
fn renaming_a_step_to_its_own_name_is_not_a_duplicate() {
    let p = Pipeline::new();
    p.source("n", 0..2u32)
        .map(|x| x)
        .name("map")
        .for_each(|_| {})
        .name("for_each");
    assert_eq!(p.run().unwrap().stage("map").unwrap().records_out, 2);
}

#[test]
fn a_renamed_operator_is_named_in_its_error() {
    let p = Pipeline::new();
    p.source("n", 0..3u32)
        .try_map(|x| if x < 2 { Ok(x) } else { Err("too big") })
        .name("check")
        .for_each(|_| {});
    let err = p.run().unwrap_err();
    assert!(
        matches!(&err, Error::Operator { stage, .. } if stage == "check"),
        "{err}"
    );
}

#[test]
fn a_renamed_source_names_the_file_it_cannot_open() {
    let p = Pipeline::new();
    p.read_lines("/nonexistent/millrace-input.txt")
        .name("input")
        .for_each(|_| {});
    let err = p.run().unwrap_err();
    assert!(
        matches!(&err, Error::Io { stage, .. } if stage == "input"),
        "{err}"
    );
}

#[test]
fn a_sink_handle_outliving_its_run_is_harmless() {
    let p = Pipeline::new();
    let sink = p.source("n", 0..1u32).for_each(|_| {});
    let debug_before = format!("{sink:?}");
    assert!(debug_before.contains("for_each"), "{debug_before}");
    p.run().unwrap();
    let sink = sink.name("late");
    assert_eq!(format!("{sink:?}"), "Sink { stage: None }");
}
