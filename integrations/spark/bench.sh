#!/usr/bin/env bash
# millrace on Spark beside millrace on one machine (docs/performance.md, "Spark").
#
#   cargo build --release && integrations/spark/bench.sh [MB]      # default 200 MB of text
#
# Needs pyspark (pip install pyspark==4.3.0) and Java 17+. Prints whole-process wall and CPU
# seconds (/usr/bin/time) for:
#   1. millrace run    word count (count parallelism 2) on MB of text
#   2. millrace spark  the same pipeline, --master local[2] --partitions 4
#   3. Spark alone     textFile -> saveAsTextFile of an NDJSON file of the same size (no millrace)
#   4. millrace spark  ndjson.read -> select -> ndjson.write on that file (one segment)
# (4 - 3) / records is what a record costs to cross the pipe boundary (PySpark feeding the
# segment's stdin and reading its stdout) plus millrace's own select, on these two cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
MB=${1:-200}
BIN=$PWD/target/release/millrace
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 2; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
SPARK_HOME=$(python3 -c "import os, pyspark; print(os.path.dirname(pyspark.__file__))")
export SPARK_HOME SPARK_LOCAL_IP=127.0.0.1

python3 - "$TMP" "$MB" <<'EOF'
import json, random, sys
tmp, mb = sys.argv[1], int(sys.argv[2])
rng = random.Random(7)
vocab = ["w%d" % i for i in range(20000)]
with open(tmp + "/text.txt", "w") as f:
    n = 0
    while n < mb << 20:
        line = " ".join(vocab[int(rng.paretovariate(1.1)) % len(vocab)] for _ in range(rng.randint(4, 16))) + "\n"
        n += len(line)
        f.write(line)
with open(tmp + "/events.ndjson", "w") as f:
    n = i = 0
    while n < mb << 20:
        line = json.dumps({"id": i, "user": "u%d" % rng.randrange(10000), "kind": rng.choice(["view", "click", "purchase"]), "amount": rng.randrange(10000) / 100, "ts": 1700000000000 + i}) + "\n"
        n += len(line)
        i += 1
        f.write(line)
print("records in events.ndjson:", i)
EOF

cat > "$TMP/wc.toml" <<EOF
[stages.read]
kind = "lines.read"
path = "$TMP/text.txt"
[stages.words]
kind = "words"
input = "read"
[stages.count]
kind = "count"
input = "words"
key = "word"
parallelism = 2
[stages.out]
kind = "ndjson.write"
input = "count"
path = "$TMP/wc.ndjson"
EOF
cat > "$TMP/sel.toml" <<EOF
[stages.read]
kind = "ndjson.read"
path = "$TMP/events.ndjson"
[stages.keep]
kind = "select"
input = "read"
fields = ["id", "user", "amount"]
[stages.out]
kind = "ndjson.write"
input = "keep"
path = "$TMP/sel.ndjson"
EOF
cat > "$TMP/plain.py" <<EOF
import sys
from pyspark import SparkContext
sc = SparkContext(appName="plain")
sc.setLogLevel("WARN")
sc.textFile(sys.argv[1], minPartitions=4).saveAsTextFile(sys.argv[2])
sc.stop()
EOF

timed() { # label command...
  /usr/bin/time -f "$1: %e s wall, %U+%S s cpu, %M KiB peak" "${@:2}" >/dev/null 2>"$TMP/err" || { cat "$TMP/err"; exit 1; }
  tail -n 1 "$TMP/err"
}
timed "1. millrace run, word count" "$BIN" run --quiet "$TMP/wc.toml"
timed "2. millrace spark local[2], word count" "$BIN" spark "$TMP/wc.toml" --master 'local[2]' --partitions 4 --output "$TMP/wc-spark"
timed "3. Spark alone, textFile -> saveAsTextFile" "$SPARK_HOME/bin/spark-submit" --master 'local[2]' --conf spark.log.level=WARN "$TMP/plain.py" "$TMP/events.ndjson" "$TMP/plain-out"
timed "4. millrace spark local[2], one segment (select)" "$BIN" spark "$TMP/sel.toml" --master 'local[2]' --partitions 4 --output "$TMP/sel-spark"
timed "5. millrace run, the same select" "$BIN" run --quiet "$TMP/sel.toml"
sort "$TMP/wc.ndjson" > "$TMP/a"; cat "$TMP"/wc-spark/part-* | sort > "$TMP/b"
cmp -s "$TMP/a" "$TMP/b" && echo "word counts: identical" || { echo "word counts DIFFER"; exit 1; }
