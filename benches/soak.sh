#!/usr/bin/env bash
# Soak: 1 000 clients through pgswitch for 10 minutes, a cutover or fallback
# every minute (issue 14). Zero failed transactions, every acknowledged
# write on both sides, RSS and open files flat after warm-up; prints the
# curve (`SOAK t=... rss_kib=... fds=...`) and a `SOAK RESULT` line.
# The test suite runs a one-minute version of the same test.
#
#   benches/soak.sh                       # the long run
#   SOAK_SECONDS=120 benches/soak.sh      # shorter
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export SOAK_SECONDS="${SOAK_SECONDS:-600}"
export SOAK_CLIENTS="${SOAK_CLIENTS:-1000}"
export SOAK_SWITCH_EVERY="${SOAK_SWITCH_EVERY:-60}"
export SOAK_TX_PER_CLIENT_PER_SECOND="${SOAK_TX_PER_CLIENT_PER_SECOND:-1}"
ulimit -n 65536 2>/dev/null || true
# The soak profile (.config/nextest.toml) lets the test run up to 30 minutes.
exec cargo nextest run --release --profile soak --no-capture --test soak
