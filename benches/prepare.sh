#!/usr/bin/env bash
# pgswitch prepare benchmark: the initial copy of a pgbench database from blue (PostgreSQL 15)
# to green (17), by `pgswitch prepare` (its exported-snapshot pg_dump | pg_restore) and, in the same run,
# by `pg_dump -Fc | pg_restore` into a fresh database on green; prints rows/s, MB/s and the
# ratio.  See benches/README.md.
#
#   benches/prepare.sh
#
# Environment (defaults in brackets):
#   BENCH_SCALE [50]       pgbench -i -s (50: 5 million accounts, ~640 MB of heap)
#   PGSWITCH_BIN [target/release/pgswitch]   PG_BINDIR [/usr/lib/postgresql/15/bin] (blue, tools)
#   GREEN_BINDIR [PostgreSQL 17 from scripts/install-pg17.sh, else PG_BINDIR]
#   BENCH_KEEP=1           keep the temp dir (server logs, configs, reports) after exit
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
case "${1:-}" in -h|--help) sed -n '2,/^set /p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;; esac

SCALE=${BENCH_SCALE:-50}
PGSWITCH_BIN=${PGSWITCH_BIN:-$ROOT/target/release/pgswitch}
PG_BINDIR=${PG_BINDIR:-/usr/lib/postgresql/15/bin}
ADMIN_PW=bench-admin

# shellcheck source=benches/lib.sh
. "$HERE/lib.sh"
bench_setup pgswitch-prepare
for b in pgbench psql pg_dump pg_restore initdb pg_ctl postgres; do [ -x "$PG_BINDIR/$b" ] || die "$PG_BINDIR/$b not found"; done
[ -x "$PGSWITCH_BIN" ] || die "$PGSWITCH_BIN not built (cargo build --release)"
if [ -z "${GREEN_BINDIR:-}" ]; then
    GREEN_BINDIR=$(bash "$ROOT/scripts/install-pg17.sh" 2>"$WORK/install-pg17.log" | tail -1) || GREEN_BINDIR=""
    if [ -z "$GREEN_BINDIR" ] || [ ! -x "$GREEN_BINDIR/postgres" ]; then
        log "PostgreSQL 17 not available: green falls back to PostgreSQL 15"
        GREEN_BINDIR=$PG_BINDIR
    fi
fi
warn_if_busy

# The same settings on both sides (and for both methods).
PGOPTS_CONF="wal_level = logical
synchronous_commit = off
max_wal_senders = 10
max_replication_slots = 10
max_logical_replication_workers = 6
max_worker_processes = 16
maintenance_work_mem = 256MB
max_wal_size = 4GB
checkpoint_timeout = 30min"

BLUE_PORT=$(free_port 15432)
pg_start blue "$PG_BINDIR" "$BLUE_PORT" "$PGOPTS_CONF"
GREEN_PORT=$(free_port $((BLUE_PORT + 1)))
pg_start green "$GREEN_BINDIR" "$GREEN_PORT" "$PGOPTS_CONF"
for p in "$BLUE_PORT" "$GREEN_PORT"; do pg_super "$p" postgres -c "ALTER ROLE postgres PASSWORD '$ADMIN_PW'"; done

log "pgbench -i -s $SCALE on blue"
t0=$(date +%s.%N)
PGPASSWORD=bench "$PG_BINDIR/pgbench" -h 127.0.0.1 -p "$BLUE_PORT" -U bench -i -s "$SCALE" -q bench \
    >"$WORK/pgbench-init.log" 2>&1 || { cat "$WORK/pgbench-init.log" >&2; die "pgbench -i failed"; }
log "  done in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }') s"
read -r ROWS BYTES < <(pg_super "$BLUE_PORT" bench -At -F ' ' -c \
    "SELECT sum(c.reltuples)::int8, sum(pg_relation_size(c.oid)) FROM pg_class c
      WHERE c.relname IN ('pgbench_accounts', 'pgbench_branches', 'pgbench_tellers', 'pgbench_history')")
log "blue: $ROWS rows, $((BYTES / 1048576)) MB of heap"

# (a) pg_dump -Fc | pg_restore into a fresh database on green.
pg_super "$GREEN_PORT" postgres -c "CREATE DATABASE dumped OWNER bench"
log "(a) pg_dump -Fc | pg_restore into green's database dumped"
t0=$(date +%s.%N)
"$PG_BINDIR/pg_dump" -Fc -h "$WORK/sock" -p "$BLUE_PORT" -U postgres bench \
    | "$PG_BINDIR/pg_restore" -h "$WORK/sock" -p "$GREEN_PORT" -U postgres -d dumped --exit-on-error \
    2>"$WORK/restore.log" || { cat "$WORK/restore.log" >&2; die "pg_dump | pg_restore failed"; }
DUMP_S=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
[ "$(pg_super "$GREEN_PORT" dumped -At -c 'SELECT count(*) FROM pgbench_accounts')" = $((SCALE * 100000)) ] \
    || die "dumped: wrong row count"

# (b) pgswitch prepare into green's (empty) database bench.
cat >"$WORK/prepare.toml" <<EOT
[proxy]
listen = "127.0.0.1:$(free_port 16432)"
[backends.blue]
host = "127.0.0.1"
port = $BLUE_PORT
server_tls = "disable"
admin_user = "postgres"
admin_password = "$ADMIN_PW"
[backends.green]
host = "127.0.0.1"
port = $GREEN_PORT
server_tls = "disable"
admin_user = "postgres"
admin_password = "$ADMIN_PW"
[replication]
database = "bench"
[admin]
listen = "127.0.0.1:$(free_port 19930)"
[[users]]
name = "bench"
password = "bench"
EOT
log "(b) pgswitch prepare (pgbench_history has no key: --replica-identity-full)"
t0=$(date +%s.%N)
"$PGSWITCH_BIN" prepare --json --replica-identity-full --pg-bin "$PG_BINDIR" --config "$WORK/prepare.toml" \
    >"$WORK/prepare.json" 2>"$WORK/prepare.progress" || { cat "$WORK/prepare.json" "$WORK/prepare.progress" >&2; die "prepare failed"; }
PREPARE_WALL=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
COPY_S=$("$PY" -c 'import json,sys; print("%.2f" % json.load(open(sys.argv[1]))["initial_copy"]["seconds"])' "$WORK/prepare.json")
[ "$(pg_super "$GREEN_PORT" bench -At -c 'SELECT count(*) FROM pgbench_accounts')" = $((SCALE * 100000)) ] \
    || die "prepare: wrong row count"

"$PY" - "$ROWS" "$BYTES" "$DUMP_S" "$COPY_S" "$PREPARE_WALL" <<'PYEOF'
import sys
rows, bytes_, dump_s, copy_s, wall = int(sys.argv[1]), int(sys.argv[2]), *map(float, sys.argv[3:])
mb = bytes_ / 1048576
def line(name, s):
    print(f"{name:<34} {s:8.2f} s  {rows / s:10.0f} rows/s  {mb / s:7.1f} MB/s")
print(f"pgbench tables: {rows} rows, {mb:.0f} MB of heap")
line("(a) pg_dump -Fc | pg_restore", dump_s)
line("(b) prepare: initial copy", copy_s)
line("    prepare: whole command", wall)
print(f"ratio (b)/(a) throughput: {dump_s / copy_s:.2f} (target >= 0.8)")
PYEOF
