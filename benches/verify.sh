#!/usr/bin/env bash
# pgswitch verify benchmark: blue PostgreSQL 15 with pgbench -i -s 50 (5 M accounts), green 17
# with the same data (pg_dump -Fc | pg_restore, then a live subscription with copy_data = false),
# then `pgswitch verify` of pgbench_accounts, timed, against a single-pass hash of the whole table
# on each side in the same run.  See benches/README.md ("Verify benchmark").
#
#   benches/verify.sh [--no-save]
#
# Environment (defaults in brackets):
#   BENCH_SCALE [50]        pgbench -i -s            VERIFY_JOBS ["1 2"]   --jobs values to run
#   VERIFY_CHUNK_ROWS [100000]  --chunk-rows         VERIFY_RUNS [3]       runs of each (best kept)
#   VERIFY_QUIET_WAIT [120] seconds to wait at the start for other processes to leave the CPUs idle
#   GREEN_BINDIR [PostgreSQL 17 from scripts/install-pg17.sh, else PG_BINDIR]
#   PGSWITCH_BIN [target/release/pgswitch]   PG_BINDIR [/usr/lib/postgresql/15/bin] (blue, clients)
#   BENCH_KEEP=1            keep the temp dir (server logs, configs, reports) after exit
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")

SAVE=1
for arg in "$@"; do
    case "$arg" in
        --no-save) SAVE=0 ;;
        -h|--help) sed -n '2,/^set /p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done

SCALE=${BENCH_SCALE:-50}
JOBS_LIST=${VERIFY_JOBS:-"1 2"}
CHUNK_ROWS=${VERIFY_CHUNK_ROWS:-100000}
RUNS=${VERIFY_RUNS:-3}
PGSWITCH_BIN=${PGSWITCH_BIN:-$ROOT/target/release/pgswitch}
PG_BINDIR=${PG_BINDIR:-/usr/lib/postgresql/15/bin}
[ -x "$PG_BINDIR/pg_ctl" ] || PG_BINDIR=$(dirname "$(command -v pg_ctl)")
ADMIN_PW=bench-admin

# shellcheck source=benches/lib.sh
. "$HERE/lib.sh"

bench_setup pgswitch-verify
for b in pgbench psql pg_dump pg_restore initdb pg_ctl postgres; do
    [ -x "$PG_BINDIR/$b" ] || die "$PG_BINDIR/$b not found"
done
[ -x "$PGSWITCH_BIN" ] || die "$PGSWITCH_BIN not built (cargo build --release)"
if [ -z "${GREEN_BINDIR:-}" ]; then
    GREEN_BINDIR=$(bash "$ROOT/scripts/install-pg17.sh" 2>"$WORK/install-pg17.log" | tail -1) || GREEN_BINDIR=""
    if [ -z "$GREEN_BINDIR" ] || [ ! -x "$GREEN_BINDIR/postgres" ]; then
        log "PostgreSQL 17 not available ($(tail -1 "$WORK/install-pg17.log")): green falls back to PostgreSQL 15"
        GREEN_BINDIR=$PG_BINDIR
    fi
fi
QUIET_WAIT=${VERIFY_QUIET_WAIT:-120}
waited=0
while [ "$(cpu_busy_pct 1)" -gt 10 ] && [ "$waited" -lt "$QUIET_WAIT" ]; do
    [ "$waited" = 0 ] && log "the machine is busy: waiting up to ${QUIET_WAIT}s for it to go idle"
    waited=$((waited + 1))
done
warn_if_busy

CONF="wal_level = logical
synchronous_commit = off
max_wal_senders = 10
max_replication_slots = 10"
BLUE_PORT=$(free_port 15432)
pg_start blue "$PG_BINDIR" "$BLUE_PORT" "$CONF"
GREEN_PORT=$(free_port $((BLUE_PORT + 1)))
pg_start green "$GREEN_BINDIR" "$GREEN_PORT" "$CONF"
for p in "$BLUE_PORT" "$GREEN_PORT"; do pg_super "$p" postgres -c "ALTER ROLE postgres PASSWORD '$ADMIN_PW'"; done
blue() { pg_super "$BLUE_PORT" bench "$@"; }
green() { pg_super "$GREEN_PORT" bench "$@"; }

log "pgbench -i -s $SCALE on blue"
PGPASSWORD=bench "$PG_BINDIR/pgbench" -h 127.0.0.1 -p "$BLUE_PORT" -U bench -i -s "$SCALE" -q bench \
    >"$WORK/pgbench-init.log" 2>&1 || { cat "$WORK/pgbench-init.log" >&2; die "pgbench -i failed"; }
log "pg_dump -Fc blue | pg_restore green"
"$PG_BINDIR/pg_dump" -Fc -h "$WORK/sock" -p "$BLUE_PORT" -U postgres bench \
    | "$PG_BINDIR/pg_restore" -h "$WORK/sock" -p "$GREEN_PORT" -U postgres -d bench --no-owner \
    || die "pg_dump | pg_restore failed"
green -c "VACUUM ANALYZE" >/dev/null
blue -c "CREATE PUBLICATION pgswitch FOR ALL TABLES"
green -c "CREATE SUBSCRIPTION pgswitch CONNECTION 'host=127.0.0.1 port=$BLUE_PORT user=postgres password=$ADMIN_PW dbname=bench' PUBLICATION pgswitch WITH (copy_data = false)"
for i in $(seq 1 100); do
    [ "$(green -At -c "SELECT count(*) FROM pg_stat_subscription WHERE subname = 'pgswitch' AND pid IS NOT NULL")" -ge 1 ] && break
    sleep 0.1
done
ROWS=$(blue -At -c "SELECT count(*) FROM pgbench_accounts")
log "blue and green hold $ROWS accounts; subscription pgswitch streams (copy_data = false)"

cat >"$WORK/pgswitch.toml" <<EOF
[proxy]
listen = "127.0.0.1:$(free_port 17432)"

[backends.blue]
host = "127.0.0.1"
port = $BLUE_PORT
admin_user = "postgres"
admin_password = "$ADMIN_PW"

[backends.green]
host = "127.0.0.1"
port = $GREEN_PORT
admin_user = "postgres"
admin_password = "$ADMIN_PW"

[cutover]
active = "blue"

[replication]
subscription = "pgswitch"
database = "bench"

[[users]]
name = "bench"
password = "bench"
EOF

# Seconds one statement takes on a side (psql \timing), with parallel workers on or off.
timed() {  # side parallel(0|default) sql
    local side=$1 par=$2 sql=$3 set=""
    [ "$par" = 0 ] && set="SET max_parallel_workers_per_gather = 0;"
    "$side" -c "SET jit = off; $set" -c '\timing on' -c "$sql" | awk '/^Time:/ { printf "%.3f", $2 / 1000 }'
}
BASE_SQL="SELECT sum(hashtext(a::text)) FROM pgbench_accounts a"
best() { sort -n | head -1; }

declare -A BASE=()
for side in blue green; do
    timed "$side" 0 "$BASE_SQL" >/dev/null   # warm the cache
    BASE[$side.1]=$(for i in $(seq 1 "$RUNS"); do timed "$side" 0 "$BASE_SQL"; echo; done | best)
    BASE[$side.par]=$(for i in $(seq 1 "$RUNS"); do timed "$side" default "$BASE_SQL"; echo; done | best)
    log "baseline on $side: single-threaded ${BASE[$side.1]} s, with parallel workers ${BASE[$side.par]} s"
done
# Both sides at once, single-threaded: what the machine gives two concurrent scans.
both_start=$(date +%s.%N)
timed blue 0 "$BASE_SQL" >/dev/null & bp=$!
timed green 0 "$BASE_SQL" >/dev/null & gp=$!
wait "$bp" "$gp"
BASE_BOTH=$(awk -v s="$both_start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.3f", e - s }')
log "baseline on both at once (single-threaded each): $BASE_BOTH s"

declare -A VERIFY=()
for jobs in $JOBS_LIST; do
    secs=""
    for i in $(seq 1 "$RUNS"); do
        s=$(date +%s.%N)
        "$PGSWITCH_BIN" verify --config "$WORK/pgswitch.toml" --json --tables public.pgbench_accounts \
            --jobs "$jobs" --chunk-rows "$CHUNK_ROWS" >"$WORK/verify-$jobs-$i.json" \
            || die "verify --jobs $jobs failed or found a difference: $(cat "$WORK/verify-$jobs-$i.json")"
        e=$(date +%s.%N)
        secs="$secs $(awk -v s="$s" -v e="$e" 'BEGIN { printf "%.3f", e - s }')"
    done
    VERIFY[$jobs]=$(printf '%s\n' $secs | best)
    chunks=$("$PY" -c 'import json,sys; t=json.load(open(sys.argv[1]))["tables"][0]; print(t["chunks"], t["status"])' "$WORK/verify-$jobs-1.json")
    log "verify --jobs $jobs: best ${VERIFY[$jobs]} s of$secs (chunks, status: $chunks)"
done

rate() { awk -v r="$ROWS" -v s="$1" 'BEGIN { printf "%.2f", r / s / 1e6 }'; }
{
    echo "pgswitch verify benchmark, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, CPU busy before start: ${BUSY:-?}%"
    echo "blue: $("$PG_BINDIR/postgres" --version), green: $("$GREEN_BINDIR/postgres" --version)"
    echo "pgbench_accounts: $ROWS rows (scale $SCALE), --chunk-rows $CHUNK_ROWS, best of $RUNS runs"
    echo
    echo "| what | seconds | M rows/s per side |"
    echo "|---|---:|---:|"
    for side in blue green; do
        echo "| baseline $side, single-threaded \`sum(hashtext(a::text))\` | ${BASE[$side.1]} | $(rate "${BASE[$side.1]}") |"
        echo "| baseline $side, with parallel workers | ${BASE[$side.par]} | $(rate "${BASE[$side.par]}") |"
    done
    echo "| baseline on blue and green at once, single-threaded each | $BASE_BOTH | $(rate "$BASE_BOTH") |"
    for jobs in $JOBS_LIST; do
        echo "| \`pgswitch verify --jobs $jobs\` (both sides at once, whole command) | ${VERIFY[$jobs]} | $(rate "${VERIFY[$jobs]}") |"
    done
} | tee "$WORK/summary.md"
if [ "$SAVE" = 1 ]; then
    mkdir -p "$HERE/results"
    cp "$WORK/summary.md" "$HERE/results/verify-$(date -u +%Y%m%dT%H%M%SZ).md"
fi
