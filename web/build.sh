#!/usr/bin/env bash
# Rebuilds the console's assets (web/dist/, committed and embedded in the binary) from web/src/
# with the exact packages of package-lock.json. `cargo build` needs only the result.
set -euo pipefail
cd "$(dirname "$0")"
npm ci --no-audit --no-fund
npm run build
