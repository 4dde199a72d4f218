//! Tests of the checkpoint hooks of heads, chains and tails, driven directly: run part of the
//! input, snapshot at that point, encode and decode the state, restore it into fresh
//! instances, run the rest, and compare with an uninterrupted run. (The barriers that trigger
//! snapshots in a real run are the runtime's; its end-to-end tests live with it.)

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use crossbeam_channel::{bounded, Sender};

use super::graph::partition_hash;
use super::heads::{KeyedCodec, KeyedHead, SortCodec, SortHead};
use crate::channel::{InputHead, Message};
use crate::checkpoint::keyed::KeyGroups;
use crate::checkpoint::state::{group_range, instance_of_group, key_group, InstanceState};
use crate::checkpoint::StateSupport;
use crate::metrics::InstanceMetrics;
use crate::operator::{Chain, Emit, Halt, Identity, Limit};
use crate::runtime::{Cx, Head, Pull, RunShared, Tail};
use crate::Error;

fn cx_with(stage: &str, instance: usize, batch: usize) -> Cx {
    let opts = crate::Options {
        batch_size: batch,
        ..Default::default()
    };
    Cx {
        run: RunShared::new(opts),
        stage: stage.into(),
        instance,
        source: false,
        metrics: Arc::new(InstanceMetrics::default()),
    }
}

fn cx(stage: &str, instance: usize) -> Cx {
    cx_with(stage, instance, 1024)
}

/// What goes over the wire to the store: encode and decode.
fn round_trip(s: &InstanceState) -> InstanceState {
    InstanceState::decode(&s.encode().unwrap()).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Keyed aggregates

type Rec = (String, u64);

struct Keyed {
    tx: Sender<Message<Rec>>,
    head: Box<dyn Head<(String, u64)>>,
}

/// A checkpointed keyed sum (fold) instance `instance` of `p`, fed through a channel.
fn keyed_sum(checkpointed: bool, p: usize) -> Keyed {
    let (tx, rx) = bounded(4096);
    let (recycle, _) = bounded(64);
    let input = InputHead::new(rx, 1, recycle, None);
    let codec = checkpointed.then(KeyedCodec::<String, u64>::new);
    let head = KeyedHead::new(
        input,
        Arc::new(|| 0u64),
        Arc::new(|acc: &mut u64, x: u64| *acc += x),
        Arc::new(|a: u64| a),
        "fold",
        KeyGroups {
            hash: partition_hash::<String>,
            parallelism: p,
        },
        codec,
    );
    Keyed {
        tx,
        head: Box::new(head),
    }
}

/// Which of `p` instances the router sends key `k` to.
fn instance_of(k: &String, p: usize) -> usize {
    instance_of_group(key_group(partition_hash(k), 128), p, 128)
}

fn records() -> Vec<Rec> {
    (0..2000u64).map(|i| (format!("k{}", i % 37), i)).collect()
}

/// Feeds `recs` to the instances by key, then pulls each until the input is taken in (idle).
fn feed(instances: &mut [Keyed], cxs: &[Cx], recs: &[Rec]) {
    let p = instances.len();
    for (k, v) in recs {
        let i = instance_of(k, p);
        instances[i]
            .tx
            .send(Message::Data {
                from: 0,
                batch: vec![(k.clone(), *v)],
            })
            .unwrap();
    }
    for (inst, cx) in instances.iter_mut().zip(cxs) {
        let mut buf = Vec::new();
        // A deadline in the past: the head returns once its channel is empty.
        assert_eq!(inst.head.pull(cx, &mut buf, Some(0)).unwrap(), Pull::Idle);
        assert!(buf.is_empty());
    }
}

/// Ends the input of every instance and drains their results, sorted.
fn finish(instances: &mut [Keyed], cxs: &[Cx]) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for (inst, cx) in instances.iter_mut().zip(cxs) {
        inst.tx.send(Message::End { from: 0 }).unwrap();
        loop {
            let mut buf = Vec::new();
            let pull = inst.head.pull(cx, &mut buf, None).unwrap();
            out.append(&mut buf);
            if pull == Pull::End {
                break;
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_keyed_fold_restored_from_its_snapshot_gives_the_uninterrupted_result() {
    let recs = records();
    let (first, rest) = recs.split_at(1234);
    for p in [1, 2, 3] {
        let cxs: Vec<Cx> = (0..p).map(|i| cx("sum", i)).collect();
        let mut whole: Vec<Keyed> = (0..p).map(|_| keyed_sum(true, p)).collect();
        feed(&mut whole, &cxs, &recs);
        let want = finish(&mut whole, &cxs);

        let mut before: Vec<Keyed> = (0..p).map(|_| keyed_sum(true, p)).collect();
        feed(&mut before, &cxs, first);
        let mut states = Vec::new();
        for (inst, cx) in before.iter_mut().zip(&cxs) {
            let mut s = InstanceState::default();
            inst.head.snapshot(cx, &mut s).unwrap();
            states.push(round_trip(&s));
        }
        drop(before); // the crash
                      // Key-group coverage: disjoint, contiguous, complete; every entry in its range.
        let mut next = 0u16;
        for (i, s) in states.iter().enumerate() {
            let (a, b) = s.key_groups.expect("a keyed snapshot names its groups");
            assert_eq!((a, b), {
                let r = group_range(i, p, 128);
                (r.start, r.end)
            });
            assert_eq!(
                a, next,
                "p={p}: groups of instance {i} start where the last ended"
            );
            next = b;
            let part: crate::checkpoint::state::KeyedPart<String, u64> =
                s.get("head").unwrap().unwrap();
            let groups: Vec<u16> = part.groups.iter().map(|(g, _)| *g).collect();
            assert!(
                groups.windows(2).all(|w| w[0] < w[1]),
                "ascending: {groups:?}"
            );
            for (g, entries) in &part.groups {
                assert!((a..b).contains(g));
                for (k, _) in entries {
                    assert_eq!(key_group(partition_hash(k), 128), *g);
                }
            }
        }
        assert_eq!(next, 128, "p={p}: every group is covered");

        let mut after: Vec<Keyed> = (0..p).map(|_| keyed_sum(true, p)).collect();
        for ((inst, cx), s) in after.iter_mut().zip(&cxs).zip(&states) {
            inst.head.restore(cx, s).unwrap();
        }
        feed(&mut after, &cxs, rest);
        assert_eq!(finish(&mut after, &cxs), want, "p={p}");
    }
}

/// Ends the input of one instance and drains its results in the order it emits them.
fn finish_in_order(inst: &mut Keyed, cx: &Cx) -> Vec<(String, u64)> {
    inst.tx.send(Message::End { from: 0 }).unwrap();
    let mut out = Vec::new();
    loop {
        let mut buf = Vec::new();
        let pull = inst.head.pull(cx, &mut buf, None).unwrap();
        out.append(&mut buf);
        if pull == Pull::End {
            return out;
        }
    }
}

/// At parallelism 1 a resumed run's output must be byte-identical to an uninterrupted one's:
/// the order a keyed aggregate emits its results in must survive a snapshot and restore (a
/// hash map's iteration order does not: it depends on the map's history).
#[test]
fn a_restored_keyed_fold_emits_in_the_uninterrupted_order() {
    // Under the channel's bound (`feed` sends one message per record before it pulls).
    let recs: Vec<Rec> = (0..4000u64)
        .map(|i| (format!("key-{}", (i * 7919) % 2003), i))
        .collect();
    let cx = cx_with("sum", 0, 4096);
    let mut whole = keyed_sum(true, 1);
    feed(
        std::slice::from_mut(&mut whole),
        std::slice::from_ref(&cx),
        &recs,
    );
    let want = finish_in_order(&mut whole, &cx);
    for cut in [1, 777, 2000, 3999] {
        let (first, rest) = recs.split_at(cut);
        let mut before = keyed_sum(true, 1);
        feed(
            std::slice::from_mut(&mut before),
            std::slice::from_ref(&cx),
            first,
        );
        let mut s = InstanceState::default();
        before.head.snapshot(&cx, &mut s).unwrap();
        let s = round_trip(&s);
        let mut after = keyed_sum(true, 1);
        after.head.restore(&cx, &s).unwrap();
        feed(
            std::slice::from_mut(&mut after),
            std::slice::from_ref(&cx),
            rest,
        );
        let got = finish_in_order(&mut after, &cx);
        assert_eq!(got.len(), want.len());
        assert!(
            got == want,
            "cut at {cut}: the results come in another order"
        );
    }
}

#[test]
fn a_keyed_state_restored_into_the_wrong_instance_is_refused_naming_the_stage() {
    let cxs = [cx("sum", 0), cx("sum", 1)];
    let mut two: Vec<Keyed> = (0..2).map(|_| keyed_sum(true, 2)).collect();
    feed(&mut two, &cxs, &records());
    let mut s = InstanceState::default();
    two[0].head.snapshot(&cxs[0], &mut s).unwrap();
    let mut other = keyed_sum(true, 2);
    match other.head.restore(&cxs[1], &s) {
        Err(Halt::Failed(e @ Error::Checkpoint { .. })) => {
            let m = e.to_string();
            assert!(m.contains("stage `sum`") && m.contains("64..128"), "{m}");
        }
        other => panic!("expected a checkpoint error, got {other:?}"),
    }
}

#[test]
fn a_plain_keyed_aggregate_declares_its_state_unsupported_naming_the_fix() {
    let k = keyed_sum(false, 1);
    match k.head.state_support() {
        StateSupport::Unsupported(r) => {
            assert!(r.contains(".key_by(..).checkpointed().fold(..)"), "{r}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        keyed_sum(true, 1).head.state_support(),
        StateSupport::Snapshots
    );
}

#[test]
fn a_checkpointed_sort_restores_its_gathered_records() {
    let make = |codec: Option<SortCodec<u32>>| {
        let (tx, rx) = bounded(64);
        let (recycle, _) = bounded(64);
        let head = SortHead::new(
            InputHead::new(rx, 1, recycle, None),
            Arc::new(|a: &u32, b: &u32| a.cmp(b)),
            codec,
        );
        (tx, head)
    };
    let cx = cx("sort", 0);
    let (tx, mut head) = make(Some(SortCodec::new()));
    tx.send(Message::Data {
        from: 0,
        batch: vec![5, 3, 9],
    })
    .unwrap();
    assert_eq!(
        head.pull(&cx, &mut Vec::new(), Some(0)).unwrap(),
        Pull::Idle
    );
    let mut s = InstanceState::default();
    head.snapshot(&cx, &mut s).unwrap();
    let s = round_trip(&s);
    let (tx, mut head) = make(Some(SortCodec::new()));
    head.restore(&cx, &s).unwrap();
    tx.send(Message::Data {
        from: 0,
        batch: vec![1, 7],
    })
    .unwrap();
    tx.send(Message::End { from: 0 }).unwrap();
    let mut out = Vec::new();
    while head.pull(&cx, &mut out, None).unwrap() != Pull::End {}
    assert_eq!(out, vec![1, 3, 5, 7, 9]);
    let (_tx, plain) = make(None);
    assert!(
        matches!(plain.state_support(), StateSupport::Unsupported(r) if r.contains("checkpointed_sort_by"))
    );
}

// ---------------------------------------------------------------------------------------------
// Limit

#[test]
fn a_restored_limit_passes_only_what_its_instances_had_left() {
    let limit = Limit::new(Identity::<u32>::new(), 10, "first10".into());
    let (mut a, mut b) = (limit.clone(), limit.clone());
    let mut out = Vec::new();
    for x in 0..4 {
        a.push(x, &mut out).unwrap();
    }
    for x in 0..3 {
        b.push(x, &mut out).unwrap();
    }
    let (mut sa, mut sb) = (InstanceState::default(), InstanceState::default());
    a.snapshot(&mut sa).unwrap();
    b.snapshot(&mut sb).unwrap();
    assert_eq!(sa.get::<u64>("chain.first10").unwrap(), Some(4));
    let mut steps = Vec::new();
    a.state_support(&mut steps);
    assert_eq!(steps, vec![(Arc::from("first10"), StateSupport::Snapshots)]);
    // A new process: a fresh budget of 10, restored by both instances.
    let fresh = Limit::new(Identity::<u32>::new(), 10, "first10".into());
    let (mut a, mut b) = (fresh.clone(), fresh.clone());
    a.restore(&round_trip(&sa)).unwrap();
    b.restore(&round_trip(&sb)).unwrap();
    let mut after = Vec::new();
    let mut passed = 0;
    for x in 0..100 {
        match a.push(x, &mut after) {
            Ok(()) => passed += 1,
            Err(Halt::Done) => {
                passed += 1;
                break;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(passed, 3, "10 - 4 - 3 records are left");
    assert_eq!(after.len(), 3);
    // A step before a limit inside a map forwards: the map has no state of its own.
    let chained = crate::operator::Map::new(fresh, |x: u32| x, "m".into());
    let mut steps = Vec::new();
    chained.state_support(&mut steps);
    assert_eq!(steps.len(), 1);
}

// ---------------------------------------------------------------------------------------------
// File sources

fn write_file(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// Pulls a line head until the end, collecting records and the lines of record errors.
fn drain<T>(head: &mut dyn Head<T>, cx: &Cx, max_pulls: usize) -> (Vec<T>, Vec<u64>, bool) {
    let (mut out, mut errors) = (Vec::new(), Vec::new());
    for _ in 0..max_pulls {
        let mut buf = Vec::new();
        match head.pull(cx, &mut buf, None) {
            Ok(p) => {
                out.append(&mut buf);
                if p == Pull::End {
                    return (out, errors, true);
                }
            }
            Err(Halt::Failed(Error::Record { location, .. })) => {
                out.append(&mut buf);
                errors.push(location.line);
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    (out, errors, false)
}

fn line_head(path: &Path) -> Box<dyn Head<String>> {
    let input = crate::source::Input::open("read", path)
        .unwrap()
        .with_max_line(8);
    Box::new(crate::source::LineHead::new(
        "read".into(),
        input,
        |l: &[u8], _| {
            if l == b"bad" {
                Err("bad line".to_string())
            } else {
                crate::source::parse_text(l)
            }
        },
    ))
}

#[test]
fn a_line_source_resumes_at_its_next_line_with_its_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("in.txt");
    // A BOM, CRLF endings, a line over the cap (8), bad lines before and after the cut.
    write_file(
        &path,
        "\u{feff}a\r\nbad\nccc\nthis line is too long\nd\ne\nbad\nf\ng\nh\n",
    );
    let cx = cx_with("read", 0, 3);
    let (want, want_errors, ended) = drain(&mut *line_head(&path), &cx, 100);
    assert!(ended);
    assert_eq!(want, ["a", "ccc", "d", "e", "f", "g", "h"]);
    assert_eq!(want_errors, [2, 4, 7]);
    for pulls in 1..5 {
        let mut head = line_head(&path);
        let (mut got, mut errors, ended) = drain(&mut *head, &cx, pulls);
        assert!(!ended);
        let mut s = InstanceState::default();
        head.snapshot(&cx, &mut s).unwrap();
        assert_eq!(s.positions.len(), 1);
        drop(head);
        let mut head = line_head(&path);
        head.restore(&cx, &round_trip(&s)).unwrap();
        let (rest, rest_errors, ended) = drain(&mut *head, &cx, 100);
        assert!(ended);
        got.extend(rest);
        errors.extend(rest_errors);
        assert_eq!(
            (got, errors),
            (want.clone(), want_errors.clone()),
            "cut after {pulls}"
        );
    }
}

#[test]
fn a_block_source_resumes_at_its_next_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("in.ndjson");
    let mut text = String::from("\u{feff}");
    for i in 0..300 {
        text.push_str(&format!("{{\"n\":{i}}}\n"));
    }
    text.push_str("{\"last\":true}");
    write_file(&path, &text);
    let cx = cx("read", 0);
    let head = |path: &Path| {
        let input = crate::source::Input::open("read", path).unwrap();
        crate::source::NdjsonBlockHead::new(crate::source::ChunkHead::new(
            "read".into(),
            input,
            256,
        ))
    };
    let lines = |chunks: Vec<crate::source::Chunk>| -> Vec<(u64, String)> {
        chunks
            .iter()
            .flat_map(|c| {
                c.lines()
                    .map(|(n, l)| (n, String::from_utf8_lossy(l).into_owned()))
            })
            .collect::<Vec<_>>()
    };
    let (want, _, ended) = drain(&mut head(&path), &cx, 1000);
    assert!(ended);
    let want = lines(want);
    assert_eq!(want.len(), 301);
    for pulls in [1, 3, 7] {
        let mut h = head(&path);
        let (got, _, ended) = drain(&mut h, &cx, pulls);
        assert!(!ended);
        let mut s = InstanceState::default();
        h.snapshot(&cx, &mut s).unwrap();
        let mut h = head(&path);
        h.restore(&cx, &round_trip(&s)).unwrap();
        let (rest, _, ended) = drain(&mut h, &cx, 1000);
        assert!(ended);
        let mut all = lines(got);
        all.extend(lines(rest));
        assert_eq!(all, want, "cut after {pulls} blocks");
    }
}

#[test]
fn sources_that_cannot_be_replayed_say_so() {
    // Stdin is replayable only through the spool: the start-up check refuses it without
    // spool_stdin (tests/checkpoint_cli.rs runs both cases through the binary).
    let stdin = crate::source::Input::open("read", Path::new("-")).unwrap();
    let head = crate::source::LineHead::new("read".into(), stdin, |l: &[u8], _| {
        crate::source::parse_text(l)
    });
    assert_eq!(head.state_support(), StateSupport::StdinSpool);
    assert!(crate::source::STDIN.contains("spool_stdin = true"));
    let it = crate::source::IterHead::new(0..3u32);
    assert!(matches!(Head::<u32>::state_support(&it),
        StateSupport::Unsupported(r) if r.contains("Pipeline::replayable_source")));
}

#[test]
fn a_replayable_source_seeks_to_its_snapshot() {
    let cx = cx_with("src", 0, 4);
    let mut head =
        crate::source::ReplayHead::new(crate::ReplayVec::from((0..10u32).collect::<Vec<_>>()));
    let mut first = Vec::new();
    assert_eq!(head.pull(&cx, &mut first, None).unwrap(), Pull::Data);
    let mut s = InstanceState::default();
    head.snapshot(&cx, &mut s).unwrap();
    assert_eq!(s.positions, vec![("head".to_string(), 4)]);
    let mut head =
        crate::source::ReplayHead::new(crate::ReplayVec::from((0..10u32).collect::<Vec<_>>()));
    head.restore(&cx, &round_trip(&s)).unwrap();
    let (rest, _, ended) = drain(&mut head, &cx, 10);
    assert!(ended);
    first.extend(rest);
    assert_eq!(first, (0..10).collect::<Vec<_>>());
    // A range too, and a seek that fails names the stage.
    let mut head = crate::source::ReplayHead::new(crate::ReplayVec::from(vec![1u8]));
    let mut s = InstanceState::default();
    s.put("head", &5usize).unwrap();
    match head.restore(&cx, &s) {
        Err(Halt::Failed(e)) => assert!(e.to_string().contains("stage `src`"), "{e}"),
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// File sinks

type Fmt = fn(&mut dyn Write, &u32) -> std::io::Result<u64>;

fn fmt_line(w: &mut dyn Write, x: &u32) -> std::io::Result<u64> {
    write!(w, "{x}").map(|()| 1)
}

fn file_sink(cx: &Cx, path: &Path) -> crate::sink::WriteTail<Fmt> {
    let fs: Arc<dyn crate::checkpoint::store::Fs> = Arc::new(crate::checkpoint::fs::RealFs);
    let (out, target) = crate::sink::open_output("out", path, &fs).unwrap();
    crate::sink::WriteTail::new(
        cx,
        out,
        target,
        path.display().to_string(),
        "out".into(),
        fmt_line as Fmt,
    )
}

fn emit_all<T: Tail<u32>>(t: &mut T, xs: impl IntoIterator<Item = u32>) {
    for x in xs {
        t.emit(x).unwrap();
    }
}

#[test]
fn a_file_sink_restored_truncates_to_its_committed_length_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.txt");
    let cx = cx("out", 0);
    // Uninterrupted.
    std::fs::write(&path, "old contents of an earlier run\n").unwrap();
    let mut t = file_sink(&cx, &path);
    emit_all(&mut t, 0..1000);
    t.finish(&cx).unwrap();
    let want = std::fs::read(&path).unwrap();
    assert!(want.starts_with(b"0\n1\n"), "a fresh run truncates first");

    std::fs::write(&path, "old contents of an earlier run\n").unwrap();
    let mut t = file_sink(&cx, &path);
    assert_eq!(Tail::<u32>::state_support(&t), StateSupport::Snapshots);
    emit_all(&mut t, 0..600);
    let mut s = InstanceState::default();
    t.barrier(&cx, 1, &mut s).unwrap();
    let committed = std::fs::metadata(&path).unwrap().len();
    assert_eq!(s.positions, vec![("tail".to_string(), committed)]);
    // Written after the barrier, then the crash (no finish).
    emit_all(&mut t, 600..800);
    Tail::<u32>::flush(&mut t, &cx).unwrap();
    drop(t);
    assert!(std::fs::metadata(&path).unwrap().len() > committed);

    let mut t = file_sink(&cx, &path);
    t.restore(&cx, &round_trip(&s)).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), committed);
    emit_all(&mut t, 600..1000);
    t.finish(&cx).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), want);

    // Someone shortened the file: refused.
    std::fs::write(&path, "0\n").unwrap();
    let mut t = file_sink(&cx, &path);
    match t.restore(&cx, &s) {
        Err(Halt::Failed(e @ Error::Checkpoint { .. })) => {
            assert!(e.to_string().contains("shorter than"), "{e}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn stdout_is_at_least_once() {
    let cx = cx("out", 0);
    let t = file_sink(&cx, Path::new("-"));
    assert!(
        matches!(Tail::<u32>::state_support(&t), StateSupport::AtLeastOnce(r) if r.contains("stdout"))
    );
}

fn dir_sink(cx: &Cx, dir: &Path) -> crate::sink::DirWriteTail<Fmt> {
    crate::sink::DirWriteTail::new(cx, dir, "txt", "out".into(), fmt_line as Fmt).unwrap()
}

/// The committed output: the final parts, in name order, concatenated; and the names of every
/// file.
fn committed(dir: &Path) -> (String, Vec<String>) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let text = names
        .iter()
        .filter(|n| !n.starts_with('.'))
        .map(|n| std::fs::read_to_string(dir.join(n)).unwrap())
        .collect();
    (text, names)
}

#[test]
fn a_directory_sink_recovers_committing_precommitted_parts_and_deleting_later_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let cx = cx("out", 0);
    // Uninterrupted.
    let whole = tmp.path().join("whole");
    let mut t = dir_sink(&cx, &whole);
    emit_all(&mut t, 0..300);
    t.finish(&cx).unwrap();
    let (want, names) = committed(&whole);
    assert_eq!(names, ["part-00000-000000.txt"]);

    let dir = tmp.path().join("out");
    let mut t = dir_sink(&cx, &dir);
    emit_all(&mut t, 0..100);
    let mut s1 = InstanceState::default();
    t.barrier(&cx, 1, &mut s1).unwrap();
    assert_eq!(s1.precommitted.len(), 1);
    assert!(s1.precommitted[0].ends_with(".part-00000-000000.txt.pending"));
    assert!(Path::new(&s1.precommitted[0]).is_absolute());
    // A barrier with nothing written since makes no empty part.
    let mut s_empty = InstanceState::default();
    t.barrier(&cx, 2, &mut s_empty).unwrap();
    assert_eq!(committed(&dir).1, [".part-00000-000000.txt.pending"]);
    // Checkpoint 1 completes but the crash comes before its commit; more is written: a
    // pending part and an in-progress one, both after the checkpoint we restore from.
    emit_all(&mut t, 100..150);
    t.barrier(&cx, 3, &mut InstanceState::default()).unwrap();
    crate::sink::commit_part(
        &crate::checkpoint::fs::RealFs,
        &dir.join(".part-00000-000001.txt.pending"),
    )
    .unwrap();
    emit_all(&mut t, 150..200);
    Tail::<u32>::flush(&mut t, &cx).unwrap();
    drop(t);
    assert_eq!(
        committed(&dir).1,
        [
            ".part-00000-000000.txt.pending",
            ".part-00000-000002.txt.inprogress",
            "part-00000-000001.txt"
        ]
    );

    // A fresh run refuses the directory.
    let mut fresh = dir_sink(&cx, &dir);
    match fresh.emit(1) {
        Err(Halt::Failed(e @ Error::Io { .. })) => {
            assert!(e.to_string().contains("earlier run"), "{e}")
        }
        other => panic!("{other:?}"),
    }

    // Resume from checkpoint 1 (twice: recovery is idempotent too).
    for _ in 0..2 {
        let mut t = dir_sink(&cx, &dir);
        t.restore(&cx, &round_trip(&s1)).unwrap();
        assert_eq!(committed(&dir).1, ["part-00000-000000.txt"]);
    }
    let mut t = dir_sink(&cx, &dir);
    t.restore(&cx, &s1).unwrap();
    emit_all(&mut t, 100..300);
    t.finish(&cx).unwrap();
    let (got, names) = committed(&dir);
    assert_eq!(names, ["part-00000-000000.txt", "part-00000-000001.txt"]);
    assert_eq!(got, want);
}

// ---------------------------------------------------------------------------------------------
// Windows

type Ev = (i64, u32);
type WinOut = crate::window::WindowOutput<String, Ev, u64>;
type WinIn = crate::window::combine::WindowIn<String, Ev, u64>;

/// A checkpointed counting window over `assigner`, fed through a channel.
#[allow(clippy::type_complexity)]
fn window_head(
    assigner: crate::window::Assigner,
    lateness_ms: u64,
) -> (Sender<Message<WinIn>>, Box<dyn Head<WinOut>>) {
    use crate::window::stage::{WindowCodec, WindowHead, WindowSpec};
    let (tx, rx) = bounded(4096);
    let (recycle, _) = bounded(64);
    let spec = WindowSpec::new(assigner, |e: &Ev| crate::Timestamp(e.0))
        .allowed_lateness(std::time::Duration::from_millis(lateness_ms));
    let head = WindowHead::new(
        "win".into(),
        InputHead::new(rx, 1, recycle, None),
        &spec,
        crate::window::Count,
        crate::checkpoint::keyed::KeyGroups {
            hash: partition_hash::<String>,
            parallelism: 1,
        },
        Some(WindowCodec::<String, u64>::new()),
    );
    (tx, Box::new(head))
}

/// Events of three keys, out of order by up to 3 ms, a watermark (newest - 3) after every 5,
/// and some records far too late.
fn window_messages() -> Vec<Message<WinIn>> {
    let mut msgs = Vec::new();
    let mut newest = i64::MIN;
    // Many keys per window (and per session timer), with string keys: the order a firing
    // emits its keys in must survive a restore.
    for i in 0..1600u32 {
        let mut t = i64::from(i) / 2 - i64::from(i % 4) * 3;
        if i % 37 == 0 && i > 40 {
            t -= 30; // late
        }
        newest = newest.max(t);
        let key = format!("key-{}", (i * 7) % 23);
        msgs.push(Message::Data {
            from: 0,
            batch: vec![WinIn::Record(key, (t, i))],
        });
        if i % 5 == 4 {
            msgs.push(Message::Watermark {
                from: 0,
                at: crate::Timestamp(newest - 3),
            });
        }
    }
    msgs.push(Message::End { from: 0 });
    msgs
}

/// Sends `msgs` and pulls until the head has taken them in (or ended): the outputs of each
/// pull (one per message), each sorted — the results one watermark fires come in the order of
/// a hash map, which is not part of the contract (and differs between maps that grew
/// differently); which results and late records each message brings, and in what order the
/// messages bring them, is.
fn run_window(
    tx: &Sender<Message<WinIn>>,
    head: &mut dyn Head<WinOut>,
    cx: &Cx,
    msgs: Vec<Message<WinIn>>,
) -> Vec<WinOut> {
    let end = msgs.iter().any(|m| matches!(m, Message::End { .. }));
    for m in msgs {
        tx.send(m).unwrap();
    }
    let mut out = Vec::new();
    loop {
        let mut buf = Vec::new();
        let p = head
            .pull(cx, &mut buf, if end { None } else { Some(0) })
            .unwrap();
        out.append(&mut buf);
        match p {
            Pull::End => return out,
            Pull::Idle if !end => return out,
            _ => {}
        }
    }
}

#[test]
fn a_window_restored_gives_the_same_results_and_late_records() {
    use crate::window::{Assigner, Session, Sliding, Tumbling};
    let cx = cx("win", 0);
    for (assigner, lateness) in [
        (Assigner::Tumbling(Tumbling::new(10, 0).unwrap()), 0),
        (Assigner::Tumbling(Tumbling::new(10, 0).unwrap()), 6),
        (Assigner::Sliding(Sliding::new(12, 4, 0).unwrap()), 3),
        (Assigner::Session(Session::new(3).unwrap()), 0),
        (Assigner::Session(Session::new(5).unwrap()), 8),
    ] {
        let (tx, mut head) = window_head(assigner, lateness);
        let want = run_window(&tx, &mut *head, &cx, window_messages());
        assert!(
            want.iter().any(|o| matches!(o, WinOut::Late { .. })),
            "{assigner:?}"
        );
        for cut in [1, 50, 123, 301, 1500] {
            let mut msgs = window_messages();
            let rest = msgs.split_off(cut);
            let (tx, mut head) = window_head(assigner, lateness);
            let mut got = run_window(&tx, &mut *head, &cx, msgs);
            let mut s = InstanceState::default();
            head.snapshot(&cx, &mut s).unwrap();
            assert_eq!(s.key_groups, Some((0, 128)));
            drop((tx, head));
            let (tx, mut head) = window_head(assigner, lateness);
            head.restore(&cx, &round_trip(&s)).unwrap();
            got.extend(run_window(&tx, &mut *head, &cx, rest));
            assert_eq!(got, want, "{assigner:?} lateness {lateness}, cut at {cut}");
        }
    }
}

#[test]
fn a_watermark_generator_resumes_sending_the_same_watermarks() {
    use crate::channel::{ChannelTail, Partition};
    use crate::window::combine::{CombineTail, WindowIn};
    type Item = WindowIn<u8, i64, u64>;
    let cx = cx("feed", 0);
    let make = || {
        let (tx, rx) = bounded::<Message<Item>>(4096);
        let inner = ChannelTail::new(&cx, 0, 0, vec![tx], Partition::Forward, None);
        let time = |x: &i64| crate::Timestamp(*x);
        let assigner = crate::window::Tumbling::new(10, 0).unwrap().into();
        let agg = Arc::new(crate::window::Count);
        // Not combined, as for a checkpointed window: every record goes on.
        let t = CombineTail::new(
            &cx,
            inner,
            time,
            agg,
            assigner,
            false,
            |k: &u8| *k as u64,
            2,
        );
        (rx, t.every(3))
    };
    let times: Vec<i64> = (0..50).map(|i| (i * 7) % 23 + i).collect();
    let watermarks = |rx: &crossbeam_channel::Receiver<Message<Item>>| -> Vec<i64> {
        rx.try_iter()
            .filter_map(|m| match m {
                Message::Watermark { at, .. } => Some(at.0),
                _ => None,
            })
            .collect()
    };
    let (rx, mut t) = make();
    for &x in &times {
        t.emit((0, x)).unwrap();
    }
    let want = watermarks(&rx);
    assert!(want.len() > 5);
    for cut in [1, 10, 31] {
        let (rx, mut t) = make();
        for &x in &times[..cut] {
            t.emit((0, x)).unwrap();
        }
        let mut s = InstanceState::default();
        t.barrier(&cx, 1, &mut s).unwrap();
        let mut got = watermarks(&rx);
        let (rx, mut t) = make();
        t.restore(&cx, &round_trip(&s)).unwrap();
        for &x in &times[cut..] {
            t.emit((0, x)).unwrap();
        }
        got.extend(watermarks(&rx));
        assert_eq!(got, want, "cut at {cut}");
    }
}
