#!/usr/bin/env python3
"""millrace process plugin: text operations on one field of each NDJSON record.

The node to run is in MILLRACE_NODE, its checked parameters as JSON in MILLRACE_PARAMS.
Reads records from stdin line by line and writes one line per output record to stdout,
flushing as it goes; diagnostics go to stderr (the engine logs them under plugin::<stage>).
"""
import json
import os
import sys


def case(rec, params):
    field, mode = params["field"], params.get("mode", "upper")
    value = rec.get(field)
    if isinstance(value, str):
        rec[field] = getattr(value, mode)()
    return [rec]


def length(rec, params):
    field, minimum = params["field"], params.get("min", 0)
    value = rec.get(field)
    if not isinstance(value, str):
        print(f"record without a string `{field}`: skipped", file=sys.stderr)
        return []
    if len(value) < minimum:
        return []
    rec[field + "_len"] = len(value)
    return [rec]


NODES = {"case": case, "length": length}


def main():
    node = NODES[os.environ["MILLRACE_NODE"]]
    params = json.loads(os.environ.get("MILLRACE_PARAMS", "{}"))
    out = sys.stdout
    for line in sys.stdin:
        if not line.strip():
            continue
        for rec in node(json.loads(line), params):
            out.write(json.dumps(rec, separators=(",", ":")) + "\n")
        out.flush()


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:
        # The engine stopped reading (a limit downstream): a normal stop.
        sys.stderr.close()
