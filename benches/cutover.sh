#!/usr/bin/env bash
# pgswitch cutover benchmark: pgbench TPC-B-like at a fixed rate through pgswitch while ten
# switches alternate blue -> green -> blue, then the same load and switches through PgBouncer
# with the usual manual recipe; prints both side by side.  See benches/README.md.
#
#   benches/cutover.sh [--skip-pgswitch] [--skip-pgbouncer] [--no-save]
#
# Environment (defaults in brackets):
#   CUTOVER_SWITCHES [10]  switches per scenario      CUTOVER_GAP [5]     seconds between switches
#   CUTOVER_WARMUP [5]     seconds of load before the first switch
#   CUTOVER_TAIL [5]       seconds of load after the last one
#   CUTOVER_RATE [1000]    pgbench -R                 BENCH_CLIENTS [16]  pgbench -c
#   BENCH_JOBS [2]         pgbench -j                 BENCH_SCALE [10]    pgbench -i -s
#   BENCH_POOL_SIZE [20]   server pool size, both proxies
#   CUTOVER_STATE_DIR [the temp dir, on disk]  where pgswitch's state_file goes (diagnostics: /dev/shm)
#   CUTOVER_FENCE_OLD [true]  pgswitch's [cutover] fence_old (diagnostics: false)
#   CUTOVER_QUIET_WAIT [120]  seconds to wait at the start for other processes to leave the CPUs idle
#   GREEN_BINDIR [PostgreSQL 17 from scripts/install-pg17.sh, else PG_BINDIR]
#   PGSWITCH_BIN [target/release/pgswitch]   PG_BINDIR [/usr/lib/postgresql/15/bin] (blue, clients)
#   BENCH_KEEP=1           keep the temp dir (server logs, configs, pgbench logs) after exit
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")

RUN_PGSWITCH=1
RUN_PGBOUNCER=1
SAVE=1
for arg in "$@"; do
    case "$arg" in
        --skip-pgswitch) RUN_PGSWITCH=0 ;;
        --skip-pgbouncer) RUN_PGBOUNCER=0 ;;
        --no-save) SAVE=0 ;;
        -h|--help) sed -n '2,/^set /p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done

SWITCHES=${CUTOVER_SWITCHES:-10}
GAP=${CUTOVER_GAP:-5}
WARMUP=${CUTOVER_WARMUP:-5}
TAIL=${CUTOVER_TAIL:-5}
RATE=${CUTOVER_RATE:-1000}
CLIENTS=${BENCH_CLIENTS:-16}
JOBS=${BENCH_JOBS:-2}
SCALE=${BENCH_SCALE:-10}
POOL=${BENCH_POOL_SIZE:-20}
PGSWITCH_BIN=${PGSWITCH_BIN:-$ROOT/target/release/pgswitch}
PG_BINDIR=${PG_BINDIR:-/usr/lib/postgresql/15/bin}
[ -x "$PG_BINDIR/pg_ctl" ] || PG_BINDIR=$(dirname "$(command -v pg_ctl)")
SECS=$((WARMUP + (SWITCHES - 1) * GAP + TAIL))   # pgbench -T
ADMIN_PW=bench-admin
TOKEN=bench-token

# shellcheck source=benches/lib.sh
. "$HERE/lib.sh"
TOOL="$PY $HERE/cutover.py"

# ---------------------------------------------------------------- prerequisites
bench_setup pgswitch-cutover pgbouncer
for b in pgbench psql pg_dump initdb pg_ctl postgres; do [ -x "$PG_BINDIR/$b" ] || die "$PG_BINDIR/$b not found"; done
command -v curl >/dev/null || die "curl not found"
"$PY" -c 'import psycopg' 2>/dev/null || die "python3 psycopg (3) not found: pip install psycopg[binary]"
if [ "$RUN_PGSWITCH" = 1 ] && [ ! -x "$PGSWITCH_BIN" ]; then die "$PGSWITCH_BIN not built (cargo build --release)"; fi
if [ -z "${GREEN_BINDIR:-}" ]; then
    GREEN_BINDIR=$(bash "$ROOT/scripts/install-pg17.sh" 2>"$WORK/install-pg17.log" | tail -1) || GREEN_BINDIR=""
    if [ -z "$GREEN_BINDIR" ] || [ ! -x "$GREEN_BINDIR/postgres" ]; then
        log "PostgreSQL 17 not available ($(tail -1 "$WORK/install-pg17.log")): green falls back to PostgreSQL 15"
        GREEN_BINDIR=$PG_BINDIR
    fi
fi
# Other work on this 2-core machine (a build, a test suite) skews every number: wait for it.
QUIET_WAIT=${CUTOVER_QUIET_WAIT:-120}
waited=0
while [ "$(cpu_busy_pct 1)" -gt 10 ] && [ "$waited" -lt "$QUIET_WAIT" ]; do
    [ "$waited" = 0 ] && log "the machine is busy: waiting up to ${QUIET_WAIT}s for it to go idle"
    waited=$((waited + 1))
done
warn_if_busy

PGOPTS_CONF="wal_level = logical
synchronous_commit = off
max_wal_senders = 10
max_replication_slots = 10
max_logical_replication_workers = 6
max_worker_processes = 16"

BLUE_PORT=$(free_port 15432)
pg_start blue "$PG_BINDIR" "$BLUE_PORT" "$PGOPTS_CONF"
GREEN_PORT=$(free_port $((BLUE_PORT + 1)))
pg_start green "$GREEN_BINDIR" "$GREEN_PORT" "$PGOPTS_CONF"
for p in "$BLUE_PORT" "$GREEN_PORT"; do pg_super "$p" postgres -c "ALTER ROLE postgres PASSWORD '$ADMIN_PW'"; done
blue() { pg_super "$BLUE_PORT" bench "$@"; }
green() { pg_super "$GREEN_PORT" bench "$@"; }
port_of() { if [ "$1" = blue ]; then echo "$BLUE_PORT"; else echo "$GREEN_PORT"; fi; }

log "pgbench -i -s $SCALE on blue; schema to green (pg_dump -s); publication + subscription pgswitch"
PGPASSWORD=bench "$PG_BINDIR/pgbench" -h 127.0.0.1 -p "$BLUE_PORT" -U bench -i -s "$SCALE" -q bench \
    >"$WORK/pgbench-init.log" 2>&1 || { cat "$WORK/pgbench-init.log" >&2; die "pgbench -i failed"; }
# pgbench_history has no primary key: without a replica identity the switch's preflight
# (check replica_identity) refuses, as it should. It is insert-only, so FULL costs nothing;
# the schema dump carries it to green, for the reverse direction.
blue -c "ALTER TABLE pgbench_history REPLICA IDENTITY FULL" >/dev/null
"$PG_BINDIR/pg_dump" -s -h "$WORK/sock" -p "$BLUE_PORT" -U postgres bench >"$WORK/schema.sql"
green -f "$WORK/schema.sql" >/dev/null
blue -c "CREATE PUBLICATION pgswitch FOR ALL TABLES"
green -c "CREATE SUBSCRIPTION pgswitch CONNECTION 'host=127.0.0.1 port=$BLUE_PORT user=postgres password=$ADMIN_PW dbname=bench' PUBLICATION pgswitch WITH (copy_data = true)"
wait_sub_ready() {  # side subscription timeout_s: enabled, worker running, every table ready
    local i
    for i in $(seq 1 $(($3 * 10))); do
        [ "$(pg_super "$(port_of "$1")" bench -At -c "SELECT (SELECT count(*) FROM pg_subscription_rel r JOIN pg_subscription s ON s.oid = r.srsubid WHERE s.subname = '$2' AND r.srsubstate <> 'r') = 0 AND EXISTS (SELECT 1 FROM pg_stat_subscription st JOIN pg_subscription s ON s.oid = st.subid WHERE s.subname = '$2' AND st.relid IS NULL AND st.pid IS NOT NULL)")" = t ] && return 0
        sleep 0.1
    done
    return 1
}
wait_sub_ready green pgswitch 300 || die "subscription pgswitch on green did not get ready (see $WORK/green.log)"
log "green has copied blue ($(green -At -c "SELECT count(*) FROM pgbench_accounts") accounts)"

stats() { $TOOL stats --port "$(port_of "$1")" --password "$ADMIN_PW"; }
# Both sides' stats once they are equal (replication caught up), within 60 s -> JSON.
synced_stats() {
    local i b g
    for i in $(seq 1 120); do
        b=$(stats blue); g=$(stats green)
        [ "$b" = "$g" ] && break
        sleep 0.5
    done
    [ "$b" = "$g" ] || log "warning: blue and green still differ after 60 s: blue $b green $g"
    printf '{"blue": %s, "green": %s, "equal": %s}\n' "$b" "$g" "$([ "$b" = "$g" ] && echo true || echo false)"
}

cpu_snap() { "$PY" "$HERE/pgbench_compare.py" cpu-snapshot $$ "$(head -1 "$WORK/blue/postmaster.pid")" "$(head -1 "$WORK/green/postmaster.pid")"; }
other_cpu() { "$PY" -c "import sys; sys.path.insert(0, '$HERE'); import pgbench_compare as p, json; v = p.other_cpu_pct(sys.argv[1], sys.argv[2]); print(json.dumps({'other_cpu_pct': v}))" "$1" "$2"; }

# run_load <scenario> <port>: starts pgbench in the background -> LOAD_PID, LOAD_T0 (epoch ms)
run_load() {
    local dir="$LOGDIR/$1"
    mkdir -p "$dir/switches"
    blue -c "VACUUM ANALYZE" -c "CHECKPOINT"; green -c "VACUUM ANALYZE" -c "CHECKPOINT"
    synced_stats >"$dir/stats-before.json"
    CPU0=$(cpu_snap)
    LOAD_T0=$(date +%s%3N)
    log "$1: pgbench -R $RATE -c $CLIENTS -j $JOBS -n -T $SECS -l (TPC-B-like), $SWITCHES switches every ${GAP}s from ${WARMUP}s"
    PGPASSWORD=bench "$PG_BINDIR/pgbench" -h 127.0.0.1 -p "$2" -U bench -n -R "$RATE" -c "$CLIENTS" \
        -j "$JOBS" -T "$SECS" -l --log-prefix="$dir/tx" bench >"$dir/pgbench.out" 2>"$dir/pgbench.err" &
    LOAD_PID=$!
}

finish_load() {  # scenario
    local dir="$LOGDIR/$1" rc=0
    wait "$LOAD_PID" || rc=$?
    echo "$rc" >"$dir/pgbench.rc"
    other_cpu "$CPU0" "$(cpu_snap)" >"$dir/cpu.json"
    log "$1: pgbench exit $rc: $(grep -E 'actually processed|failed transactions|^tps' "$dir/pgbench.out" | tr '\n' ' ')"
    [ -s "$dir/pgbench.err" ] && sed 's/^/    pgbench: /' "$dir/pgbench.err" | head -5 >&2
    log "$1: waiting for replication to catch up, then counting rows on both sides"
    synced_stats >"$dir/stats-after.json"
}

# ---------------------------------------------------------------- scenario 1: pgswitch
run_pgswitch() {
    local port admin dir="$LOGDIR/pgswitch" active=blue i at now ep code s e attempts f nfin fin
    port=$(free_port 17432)
    admin=$(free_port 19930)
    cat >"$WORK/pgswitch.toml" <<EOF
[proxy]
listen = "127.0.0.1:$port"
pool_mode = "transaction"
auth_method = "scram-sha-256"
default_pool_size = $POOL
max_client_conn = 1000
log_level = "info"

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
state_file = "${CUTOVER_STATE_DIR:-$WORK}/pgswitch-state.json"
fence_old = ${CUTOVER_FENCE_OLD:-true}

[replication]
subscription = "pgswitch"
database = "bench"

[admin]
listen = "127.0.0.1:$admin"
token = "$TOKEN"

[[users]]
name = "bench"
password = "bench"
EOF
    pgswitch_launch pgswitch "$WORK/pgswitch.toml" "$port" || die "pgswitch does not work (log above)"
    run_load pgswitch "$port"
    for i in $(seq 1 "$SWITCHES"); do
        at=$((LOAD_T0 + (WARMUP + (i - 1) * GAP) * 1000))
        now=$(date +%s%3N)
        [ "$at" -gt "$now" ] && sleep "$(awk -v d=$((at - now)) 'BEGIN { printf "%.3f", d / 1000 }')"
        if [ "$(date +%s%3N)" -gt $((LOAD_T0 + (SECS - 2) * 1000)) ]; then
            log "pgswitch: switch $i would start as the load ends; stopping here"; break
        fi
        if [ "$active" = blue ]; then ep=cutover; else ep=fallback; fi
        f="$dir/switches/$(printf %02d "$i").json"
        attempts=0
        while :; do
            attempts=$((attempts + 1))
            nfin=$(grep -c 'switch finished' "$WORK/pgswitch.log" || true)
            s=$(date +%s%3N)
            code=$(curl -s -o "$f.body" -w '%{http_code}' -X POST -H "Authorization: Bearer $TOKEN" \
                "http://127.0.0.1:$admin/$ep") || code=000
            e=$(date +%s%3N)
            # Refused because the direction to wait on is not streaming yet (the reverse
            # subscription connects shortly after a switch): try again.
            if [ "$attempts" -lt 40 ] && grep -q '"outcome":"refused"' "$f.body" && grep -q 'not streaming' "$f.body"; then
                sleep 0.5; continue
            fi
            break
        done
        # pgswitch logs "switch finished" right after it opens the gate: its timestamp (µs) is
        # the end of the pause window, more exact than adding up the report's phases.
        fin=""
        if [ "$(grep -c 'switch finished' "$WORK/pgswitch.log" || true)" -gt "$nfin" ]; then
            fin=$(sed 's/\x1b\[[0-9;]*m//g' "$WORK/pgswitch.log" | grep 'switch finished' | tail -1 | awk '{print $1}')
        fi
        "$PY" - "$f.body" "$s" "$e" "$attempts" "$code" "$fin" >"$f" <<'EOF'
import datetime, json, sys
body = open(sys.argv[1]).read()
try:
    report = json.loads(body)
except ValueError:
    report = {"outcome": "error", "reason": body.strip()[:300] or "no answer"}
rec = {"report": report, "curl_start_ms": int(sys.argv[2]), "curl_end_ms": int(sys.argv[3]),
       "attempts": int(sys.argv[4]), "http": sys.argv[5]}
if sys.argv[6]:
    t = datetime.datetime.fromisoformat(sys.argv[6].replace("Z", "+00:00"))
    rec["gate_open_unix_ms"] = t.timestamp() * 1000.0
json.dump(rec, sys.stdout, indent=1)
EOF
        rm -f "$f.body"
        "$PY" - "$f" "$i" <<'EOF' >&2
import json, sys
r = json.load(open(sys.argv[1]))
rep = r["report"]
phases = ", ".join("%s %.1f" % (p["name"], p["ms"]) for p in rep.get("phases", []))
pause = rep.get("pause_ms")
print(f"[pgswitch] switch {sys.argv[2]} {rep.get('from')} -> {rep.get('to')}: {rep.get('outcome')} "
      f"(HTTP {r['http']}, attempt {r['attempts']}), pause {'%.1f' % pause if pause is not None else '-'} ms"
      f" ({phases})" + (f" reason: {rep['reason']}" if rep.get("reason") else ""))
EOF
        if grep -q '"outcome": "switched"' "$f"; then
            if [ "$active" = blue ]; then active=green; else active=blue; fi
        fi
    done
    finish_load pgswitch
    curl -s -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$admin/cutovers" >"$dir/history.json" || true
    stop_named pgswitch
    PGSWITCH_ENDED_ON=$active
}

# Between the scenarios: lift pgswitch's fence and remove its reverse direction, so the recipe
# starts from plain blue -> green replication.
reset_after_pgswitch() {
    local p
    for p in "$BLUE_PORT" "$GREEN_PORT"; do pg_super "$p" bench -c "ALTER ROLE bench RESET default_transaction_read_only"; done
    if [ "$(blue -At -c "SELECT count(*) FROM pg_subscription WHERE subname = 'pgswitch_reverse'")" = 1 ]; then
        blue -c "ALTER SUBSCRIPTION pgswitch_reverse DISABLE" -c "ALTER SUBSCRIPTION pgswitch_reverse SET (slot_name = NONE)" \
            -c "DROP SUBSCRIPTION pgswitch_reverse"
    fi
    green -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'pgswitch_reverse'" \
        -c "DROP PUBLICATION IF EXISTS pgswitch_reverse" >/dev/null
}

# ---------------------------------------------------------------- scenario 2: PgBouncer recipe
run_pgbouncer() {
    local dir="$LOGDIR/PgBouncer" rc=0
    BENCH_PGB_USERS=$(printf '"bench" "bench"\n"postgres" "%s"' "$ADMIN_PW") \
        pgbouncer_start pgbouncer scram-sha-256 "$BLUE_PORT" "admin_users = postgres"
    wait_sub_ready green pgswitch 30 || die "forward subscription not streaming before the PgBouncer run"
    run_load PgBouncer "$PORT_pgbouncer"
    $TOOL recipe --pgbouncer-port "$PORT_pgbouncer" --pgbouncer-ini "$WORK/pgbouncer.ini" \
        --blue-port "$BLUE_PORT" --green-port "$GREEN_PORT" --password "$ADMIN_PW" --switches "$SWITCHES" \
        --first-at "$(awk -v t="$LOAD_T0" -v w="$WARMUP" 'BEGIN { printf "%.3f", t / 1000 + w }')" --gap "$GAP" \
        --deadline "$(awk -v t="$LOAD_T0" -v s="$SECS" 'BEGIN { printf "%.3f", t / 1000 + s - 2 }')" \
        --out-dir "$dir/switches" || rc=$?
    [ "$rc" = 0 ] || log "PgBouncer recipe driver failed (exit $rc)"
    finish_load PgBouncer
    stop_named pgbouncer
}

SCEN=()
if [ "$RUN_PGSWITCH" = 1 ]; then
    run_pgswitch
    SCEN+=(--scenario "pgswitch=$LOGDIR/pgswitch")
fi
if [ "$RUN_PGBOUNCER" = 1 ]; then
    if [ "$RUN_PGSWITCH" = 1 ] && [ "$PGSWITCH_ENDED_ON" != blue ]; then
        log "pgswitch left green active: the PgBouncer recipe (which starts on blue) is not run"
    else
        [ "$RUN_PGSWITCH" = 1 ] && reset_after_pgswitch
        run_pgbouncer
        SCEN+=(--scenario "PgBouncer=$LOGDIR/PgBouncer")
    fi
fi
[ ${#SCEN[@]} -gt 0 ] || die "nothing was run"

PBV=$("$PGBOUNCER" --version | head -1 | awk '{print $2}')
SWV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "no commit")
[ -z "$(git -C "$ROOT" status --porcelain -- src 2>/dev/null)" ] || SWV="$SWV + uncommitted src/ changes"
if [ -x "$PGSWITCH_BIN" ]; then
    SWV="$SWV, binary built $(date -u -r "$PGSWITCH_BIN" +'%H:%M UTC')"
    [ -z "$(find "$ROOT/src" -newer "$PGSWITCH_BIN" -name '*.rs' 2>/dev/null | head -1)" ] \
        || SWV="$SWV (OLDER than src/: rebuild)"
fi
"$PY" - "$WORK/meta.json" <<EOF
import json, os, platform, sys
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
json.dump({
    "date": "$(date -u +'%Y-%m-%d %H:%M UTC')",
    "machine": f"{os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.release()}",
    "blue": "$("$PG_BINDIR/postgres" --version | sed 's/.*) //'), green: $("$GREEN_BINDIR/postgres" --version | sed 's/.*) //'); both synchronous_commit = off, wal_level = logical, fsync on",
    "versions": "PgBouncer $PBV, pgswitch $SWV",
    "load": "pgbench TPC-B-like -R $RATE -c $CLIENTS -j $JOBS -n -T $SECS -l, scale $SCALE, SCRAM client auth, pool size $POOL in both proxies",
    "pgswitch": "[cutover] fence_old = ${CUTOVER_FENCE_OLD:-true}, state_file in ${CUTOVER_STATE_DIR:-the temp dir under /tmp (ext4 disk)}",
    "switches": "$SWITCHES per scenario, alternating blue → green → blue, one every ${GAP} s from ${WARMUP} s; pgswitch first, then PgBouncer, same servers",
    "CPU busy before start": "${BUSY}% (sampled over 2 s)",
}, open(sys.argv[1], "w"), indent=1)
EOF

echo
if [ "$SAVE" = 1 ]; then
    mkdir -p "$HERE/results"
    OUT="$HERE/results/cutover-$(date +%F).md"
    [ -e "$OUT" ] && OUT="$HERE/results/cutover-$(date +%F-%H%M%S).md"
    $TOOL report "${SCEN[@]}" --meta "$WORK/meta.json" --out "$OUT" --title "# pgswitch cutover benchmark $(date +%F)"
    # The raw switch reports (pgswitch's JSON as the API returned it, the recipe's own) next to it.
    "$PY" - "${OUT%.md}.json" "$LOGDIR" <<'EOF'
import glob, json, os, sys
out = {}
for scen in ("pgswitch", "PgBouncer"):
    files = sorted(glob.glob(os.path.join(sys.argv[2], scen, "switches", "*.json")))
    if files:
        out[scen] = [json.load(open(f)) for f in files]
json.dump(out, open(sys.argv[1], "w"), indent=1)
EOF
    echo
    log "report written to ${OUT#"$ROOT"/} (switch reports: ${OUT%.md}.json)"
else
    $TOOL report "${SCEN[@]}" --meta "$WORK/meta.json"
fi
