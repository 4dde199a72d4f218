#!/bin/sh
# The fault suite's misbehaving child (tests/faults.rs): echoes the NDJSON records on its stdin
# to its stdout, and at record AT does MODE:
#   hang     writes "$MARKER" (when set) and sleeps for an hour, stdout open, owing output
#   exit     says so on stderr and exits with status 3
#   kill     kills itself with SIGKILL
#   garbage  writes a line that is not JSON, then goes on
#   flood    writes 50 MiB of lines to stderr, then goes on
# As an `exec` stage: `sh faulty.sh MODE AT`. As a process plugin: MODE is the node
# ($MILLRACE_NODE) and AT its parameter `at` ($MILLRACE_PARAMS, e.g. {"at":50}).
# With $PIDFILE set, it writes its pid there first.
mode=${1:-$MILLRACE_NODE}
at=${2:-$(printf '%s' "$MILLRACE_PARAMS" | sed 's/.*"at": *\([0-9]*\).*/\1/')}
if [ -n "$PIDFILE" ]; then echo $$ > "$PIDFILE"; fi
i=0
while IFS= read -r line; do
    i=$((i + 1))
    if [ "$i" -eq "$at" ]; then
        case $mode in
            hang)
                if [ -n "$MARKER" ]; then echo "$i" > "$MARKER"; fi
                exec sleep 3600
                ;;
            exit)
                echo "faulty: exiting with status 3 at record $i" >&2
                exit 3
                ;;
            kill) kill -9 $$ ;;
            garbage) printf '\001\002 this is not JSON\n' ;;
            flood)
                yes 'faulty: a line of stderr noise, one of very many' | head -c 52428800 >&2
                echo 'faulty: flood done' >&2
                ;;
        esac
    fi
    printf '%s\n' "$line"
done
