"""The Spark driver of `millrace spark` (docs/spark.md).

`millrace spark PIPELINE.toml` plans the pipeline, writes the plan as JSON and this program
(built into the millrace binary) to a temporary directory, and runs `spark-submit` on it. The
program executes the plan's steps on RDDs of text lines:

- "segment": every partition piped through `millrace segment PIPELINE --stages ...` (one child
  process per partition). Its exit status is checked: a segment that fails fails its task with
  millrace's own message, never a silently shorter output. (PySpark's `RDD.pipe` ignores the
  status unless asked, and leaves the message in the executor's log.)
- "counts": the partial counts the segment before wrote (its `count` stage is the combiner)
  summed per key with `reduceByKey`, then sorted as `count` sorts: count descending, then key.
- "window_sort": records partitioned by the window's key and each partition sorted by event
  time (`repartitionAndSortWithinPartitions`), for the window stage that starts the next
  segment.
- "limit": the first n records over every partition, in partition order.

The output directory is written by `saveAsTextFile`: one part file per partition, committed by
Spark's output committer, so a retried task's file is written once.

Only the standard library and pyspark are used; this file must run on the Python of every
executor.
"""

import argparse
import collections
import datetime
import json
import os
import stat
import subprocess
import sys
import threading
import zlib

from pyspark import SparkConf, SparkContext, SparkFiles, StorageLevel

# How much of a failing segment's stderr the task's error carries.
STDERR_TAIL = 16 * 1024


def stable_hash(text):
    """A hash of a key's JSON text that every executor computes alike (Python's own `hash`
    of a str is salted per process)."""
    return zlib.crc32(text.encode("utf-8"))


def canon(value):
    """A JSON value as text, the same for equal values: the key of a shuffle."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def order_key(value):
    """Sorts JSON values as millrace's `count` does (config/kinds.rs, `cmp_values`): null,
    booleans, numbers, strings, arrays, objects; within a type by value (arrays and objects by
    their JSON text)."""
    if value is None:
        return (0, 0)
    if isinstance(value, bool):
        return (1, value)
    if isinstance(value, (int, float)):
        return (2, value)
    if isinstance(value, str):
        return (3, value)
    if isinstance(value, list):
        return (4, canon(value))
    return (5, canon(value))


EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def event_ms(value):
    """A record's event time as the window stage reads it (integer milliseconds, or an RFC 3339
    string), as a sort key: records whose time cannot be read sort first (the window stage
    applies its error policy to them)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (1, value)
    if isinstance(value, str):
        try:
            t = datetime.datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            return (0, 0)
        if t.tzinfo is None:
            return (0, 0)
        return (1, (t - EPOCH) // datetime.timedelta(milliseconds=1))
    return (0, 0)


class Segment:
    """Runs `millrace segment` over one partition's lines (a picklable callable)."""

    def __init__(self, step_no, stages, input_format, pipeline, base, binary_name, binary_path):
        self.step_no = step_no
        self.stages = stages
        self.input_format = input_format
        self.pipeline = pipeline
        self.base = base
        self.binary_name = binary_name
        self.binary_path = binary_path

    def binary(self):
        if self.binary_path:
            return self.binary_path
        path = SparkFiles.get(self.binary_name)
        mode = os.stat(path).st_mode
        if not mode & stat.S_IXUSR:
            os.chmod(path, mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        return path

    def __call__(self, index, lines):
        cmd = [
            self.binary(),
            "segment",
            SparkFiles.get(self.pipeline),
            "--stages",
            ",".join(self.stages),
            "--input",
            self.input_format,
            "--base",
            self.base,
        ]
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "warn")
        child = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        tail = collections.deque()
        tail_len = [0]
        fed = {}

        def feed():
            try:
                for line in lines:
                    # Bytes as Spark read them, or text a step of this program wrote.
                    child.stdin.write(line if isinstance(line, bytes) else line.encode("utf-8"))
                    child.stdin.write(b"\n")
            except BrokenPipeError:
                pass  # the segment stopped reading: its exit status says why
            except BaseException as e:  # noqa: BLE001 - handed to the task's thread
                fed["error"] = e
            finally:
                try:
                    child.stdin.close()
                except BrokenPipeError:
                    pass

        def drain_stderr():
            # Kept (the end of it) for the task's error, and passed on to the executor's log.
            for chunk in iter(lambda: child.stderr.read1(8192), b""):
                sys.stderr.buffer.write(chunk)
                tail.append(chunk)
                tail_len[0] += len(chunk)
                while tail_len[0] - len(tail[0]) >= STDERR_TAIL:
                    tail_len[0] -= len(tail.popleft())
            sys.stderr.flush()

        writer = threading.Thread(target=feed, name="millrace-feed", daemon=True)
        reader = threading.Thread(target=drain_stderr, name="millrace-stderr", daemon=True)
        writer.start()
        reader.start()
        finished = False
        try:
            # Bytes on: json.loads and saveAsTextFile take them as they are.
            for out in child.stdout:
                yield out[:-1] if out.endswith(b"\n") else out
            finished = True
        finally:
            if not finished:
                # The consumer stopped early or failed: end the child, reap it, join the threads.
                child.kill()
            child.stdout.close()
            code = child.wait()
            writer.join()
            reader.join()
            child.stderr.close()
        if "error" in fed:
            raise fed["error"]
        if code != 0:
            message = b"".join(tail).decode("utf-8", "replace").strip()
            raise RuntimeError(
                "millrace segment %d (%s) failed in partition %d with exit status %d: %s"
                % (self.step_no, " -> ".join(self.stages) or "no stages", index, code, message)
            )


def counts_step(rdd, key, partitions):
    def pair(line):
        rec = json.loads(line)
        value = rec.get(key)
        return canon(value), (value, rec["count"])

    summed = rdd.map(pair).reduceByKey(
        lambda a, b: (a[0], a[1] + b[1]), numPartitions=partitions, partitionFunc=stable_hash
    )
    ordered = summed.values().sortBy(
        lambda vc: (-vc[1], order_key(vc[0])), ascending=True, numPartitions=partitions
    )
    return ordered.map(lambda vc: json.dumps({key: vc[0], "count": vc[1]}, ensure_ascii=False))


def window_sort_step(rdd, key_field, time_field, partitions):
    def keyed(line):
        rec = json.loads(line)
        key = canon(rec.get(key_field)) if key_field else "null"
        return (event_ms(rec.get(time_field)), key), line

    return (
        rdd.map(keyed)
        .repartitionAndSortWithinPartitions(
            numPartitions=partitions,
            partitionFunc=lambda tk: stable_hash(tk[1]),
            ascending=True,
        )
        .values()
    )


def limit_step(rdd, n):
    rdd = rdd.persist(StorageLevel.MEMORY_AND_DISK)
    return rdd.zipWithIndex().filter(lambda x: x[1] < n).keys()


def failure_message(e):
    """Why the job failed, for the driver's output: the failing segment's own message (found
    in the chain of the JVM exception's causes, which carry the task's Python traceback), else
    the exception's first line."""
    texts = []
    cause = getattr(e, "java_exception", None)
    while cause is not None and len(texts) < 20:
        texts.append(str(cause.toString()))
        cause = cause.getCause()
    texts.append(str(e))
    for text in texts:
        for line in text.splitlines():
            at = line.find("RuntimeError: millrace segment ")
            if at >= 0:
                return line[at + len("RuntimeError: "):].strip()
    return texts[0].splitlines()[0] if texts[0] else repr(e)


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--partitions", type=int, required=True)
    ap.add_argument("--pipeline", required=True, help="the pipeline file's name in SparkFiles")
    ap.add_argument("--base", required=True)
    ap.add_argument("--binary-name")
    ap.add_argument("--binary-path")
    args = ap.parse_args(argv)
    with open(args.plan, encoding="utf-8") as f:
        plan = json.load(f)

    sc = SparkContext(conf=SparkConf())
    sc.setLogLevel("WARN")
    print(
        "millrace spark: application %s, web UI %s" % (sc.applicationId, sc.uiWebUrl),
        flush=True,
    )
    try:
        # As bytes, not decoded in Python only to be encoded again for the first segment (the
        # first step always). The JVM has decoded them already: invalid UTF-8 arrives as U+FFFD
        # (docs/spark.md).
        rdd = sc.textFile(plan["input_path"], minPartitions=args.partitions, use_unicode=False)
        for i, step in enumerate(plan["steps"]):
            op = step["op"]
            if op == "segment":
                seg = Segment(
                    i,
                    step["stages"],
                    step["input"],
                    args.pipeline,
                    args.base,
                    args.binary_name,
                    args.binary_path,
                )
                rdd = rdd.mapPartitionsWithIndex(seg, preservesPartitioning=True)
            elif op == "counts":
                rdd = counts_step(rdd, step["key"], args.partitions)
            elif op == "window_sort":
                rdd = window_sort_step(rdd, step["key_field"], step["time_field"], args.partitions)
            elif op == "limit":
                rdd = limit_step(rdd, step["n"])
            else:
                raise SystemExit("millrace spark: unknown step %r in the plan" % op)
        rdd.saveAsTextFile(args.output)
    except Exception as e:  # noqa: BLE001 - reported, then a non-zero exit
        message = failure_message(e)
        print("error: millrace spark: the job failed: %s" % message, file=sys.stderr, flush=True)
        sc.stop()
        return 1
    print("millrace spark: wrote %s" % args.output, flush=True)
    sc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
