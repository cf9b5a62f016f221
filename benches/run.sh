#!/usr/bin/env bash
# pgswitch benchmark: pgbench through pgswitch vs PgBouncer vs direct PostgreSQL,
# plus resident memory per idle client.  See benches/README.md.
#
#   benches/run.sh [all|throughput|memory] [--skip-pgswitch] [--no-save]
#
# Environment (defaults in brackets):
#   BENCH_SECONDS [15]  length of each pgbench run     BENCH_ROUNDS [3]   rounds per workload
#   BENCH_CLIENTS [32]  pgbench -c                     BENCH_JOBS [2]     pgbench -j
#   BENCH_SCALE [10]    pgbench -i -s                  BENCH_POOL_SIZE [20] server pool size, both proxies
#   BENCH_WORKLOADS ["select select-extended select-prepared tpcb"]
#   BENCH_WARMUP [3]    seconds of unrecorded warm-up per target
#   BENCH_IDLE_CLIENTS [10000]  idle clients for the memory test
#   BENCH_RETRIES [2]   repeats of a run in which other processes took >10% of the CPUs
#   BENCH_QUIET_WAIT [60]  seconds to wait for an idle machine before such a repeat
#   PGSWITCH_BIN [target/release/pgswitch]   PG_BINDIR [/usr/lib/postgresql/15/bin]
#   BENCH_KEEP=1        keep the temp dir (logs, configs) after exit
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")

MODE=all
SKIP_PGSWITCH=0
SAVE=1
for arg in "$@"; do
    case "$arg" in
        all|throughput|memory) MODE=$arg ;;
        --skip-pgswitch) SKIP_PGSWITCH=1 ;;
        --no-save) SAVE=0 ;;
        -h|--help) sed -n '2,/^set /p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done

SECS=${BENCH_SECONDS:-15}
ROUNDS=${BENCH_ROUNDS:-3}
CLIENTS=${BENCH_CLIENTS:-32}
JOBS=${BENCH_JOBS:-2}
SCALE=${BENCH_SCALE:-10}
POOL=${BENCH_POOL_SIZE:-20}
WARMUP=${BENCH_WARMUP:-3}
IDLE=${BENCH_IDLE_CLIENTS:-10000}
WORKLOADS=${BENCH_WORKLOADS:-"select select-extended select-prepared tpcb"}
RETRIES=${BENCH_RETRIES:-2}         # repeats of a run disturbed by other processes
QUIET_WAIT=${BENCH_QUIET_WAIT:-60}  # seconds to wait for a quiet machine before a repeat
PGSWITCH_BIN=${PGSWITCH_BIN:-$ROOT/target/release/pgswitch}
PG_BINDIR=${PG_BINDIR:-/usr/lib/postgresql/15/bin}
[ -x "$PG_BINDIR/pg_ctl" ] || PG_BINDIR=$(dirname "$(command -v pg_ctl)")
PY=${PYTHON:-python3}
COMPARE="$PY $HERE/pgbench_compare.py"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- prerequisites
if [ "$(id -u)" = 0 ]; then
    # initdb/postgres refuse root, PgBouncer refuses root too: run them as postgres.
    id postgres >/dev/null 2>&1 || useradd --system --home /var/lib/postgresql --shell /bin/bash postgres
    AS_PG=(setpriv --reuid=postgres --regid=postgres --init-groups --)
else
    AS_PG=()
fi
if ! command -v pgbouncer >/dev/null 2>&1 && [ ! -x /usr/sbin/pgbouncer ]; then
    log "PgBouncer not found: installing it"
    [ "$(id -u)" = 0 ] || die "pgbouncer missing and not root: apt-get install pgbouncer"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null
fi
PGBOUNCER=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
# pgbouncer's package starts a system service; we never use it (own config, own port).
for b in pgbench psql initdb pg_ctl; do [ -x "$PG_BINDIR/$b" ] || die "$PG_BINDIR/$b not found"; done
command -v "$PY" >/dev/null || die "python3 not found"

# 10k idle clients need ~10k fds in the proxy and in the client (the proxies and the
# connector inherit this limit). Ask for 30000; without CAP_SYS_RESOURCE the hard limit caps it.
NOFILE=${BENCH_NOFILE:-30000}
if [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt "$NOFILE" ]; then
    ulimit -Hn "$NOFILE" 2>/dev/null || true
fi
ulimit -Sn "$NOFILE" 2>/dev/null || ulimit -Sn "$(ulimit -Hn)"
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$NOFILE" ]; then
    if [ "$(ulimit -n)" -lt $((IDLE + 1024)) ]; then
        log "warning: ulimit -n is $(ulimit -n) (hard limit; wanted $NOFILE): too low for $IDLE idle clients"
    else
        log "note: ulimit -n is $(ulimit -n) (hard limit; wanted $NOFILE), enough for $IDLE idle clients"
    fi
fi

# Other work on this small machine skews everything: measure CPU use over 2 s and say so.
cpu_busy_pct() {  # [seconds]
    local a b
    a=($(sed -n 's/^cpu  //p' /proc/stat)); sleep "${1:-2}"; b=($(sed -n 's/^cpu  //p' /proc/stat))
    awk -v a="${a[*]}" -v b="${b[*]}" 'BEGIN { n = split(a, x); split(b, y); t = 0
        for (i = 1; i <= n; i++) t += y[i] - x[i]
        idle = (y[4] - x[4]) + (y[5] - x[5]); printf "%.0f", t ? 100 * (t - idle) / t : 0 }'
}
BUSY=$(cpu_busy_pct)
if [ "$BUSY" -gt 15 ]; then
    log "warning: the CPUs are already ${BUSY}% busy before starting; results will be noisy. Top now:"
    top -b -n 1 -o %CPU 2>/dev/null | sed -n '8,11p' | sed 's/^/    /' >&2 || true
fi

# ---------------------------------------------------------------- state + cleanup
WORK=$(mktemp -d /tmp/pgswitch-bench.XXXXXX)
chmod 755 "$WORK"
mkdir -p "$WORK/sock"
# pgbench's per-transaction logs (~20 MB per 15 s run) go to tmpfs when there is one, so that
# writing them back to disk does not stall the runs; each is deleted once parsed.
if [ -d /dev/shm ] && [ -w /dev/shm ]; then
    LOGDIR=$(mktemp -d /dev/shm/pgswitch-bench-logs.XXXXXX)
else
    LOGDIR="$WORK/logs"; mkdir -p "$LOGDIR"
fi
[ ${#AS_PG[@]} -gt 0 ] && chown -R postgres: "$WORK"
PG_STARTED=0
declare -A PIDS=()      # name -> pid of things we started in the background
IDLE_PID=""

stop_pid() {  # name pid
    local name=$1 pid=$2 i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name (pid $pid) did not stop on SIGTERM: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    set +e
    if [ -n "$IDLE_PID" ]; then stop_pid idle_clients "$IDLE_PID"; fi
    local name
    for name in "${!PIDS[@]}"; do stop_pid "$name" "${PIDS[$name]}"; done
    if [ "$PG_STARTED" = 1 ]; then
        "${AS_PG[@]}" "$PG_BINDIR/pg_ctl" -D "$WORK/pgdata" -m fast -w -t 30 stop >/dev/null 2>&1 \
            || "${AS_PG[@]}" "$PG_BINDIR/pg_ctl" -D "$WORK/pgdata" -m immediate -w stop >/dev/null 2>&1
    fi
    if [ "${BENCH_KEEP:-0}" = 1 ]; then
        log "kept $WORK and ${LOGDIR:-}"
    else
        rm -rf "$WORK" ${LOGDIR:+"$LOGDIR"}
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM HUP

free_port() {  # first free TCP port on 127.0.0.1 at or above $1
    "$PY" - "$1" <<'EOF'
import socket, sys
p = int(sys.argv[1])
while p < 65000:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); s.close(); print(p); break
    except OSError:
        p += 1
EOF
}

wait_port() {  # port timeout_s [pid]
    local port=$1 t=$2 pid=${3:-} i
    for i in $(seq 1 $((t * 10))); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then return 1; fi
        sleep 0.1
    done
    return 1
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }

psql_super() { "$PG_BINDIR/psql" -X -q -h "$WORK/sock" -p "$PGPORT" -U postgres -d "${DB:-bench}" -v ON_ERROR_STOP=1 "$@"; }

# ---------------------------------------------------------------- PostgreSQL
start_postgres() {
    PGPORT=$(free_port 15432)
    log "PostgreSQL: initdb in $WORK/pgdata, port $PGPORT"
    "${AS_PG[@]}" "$PG_BINDIR/initdb" -D "$WORK/pgdata" -U postgres -E UTF8 --locale=C \
        --auth-local=trust --auth-host=scram-sha-256 >"$WORK/initdb.log" 2>&1 \
        || { cat "$WORK/initdb.log" >&2; die "initdb failed"; }
    # Defaults except: pooling needs max_connections (200); shared_buffers stated explicitly
    # (128MB = the default). fsync/synchronous_commit stay ON (durable commits, as in production).
    cat >>"$WORK/pgdata/postgresql.conf" <<EOF
# --- pgswitch bench ---
listen_addresses = '127.0.0.1'
port = $PGPORT
unix_socket_directories = '$WORK/sock'
max_connections = 200
shared_buffers = 128MB
password_encryption = scram-sha-256
EOF
    cat >"$WORK/pgdata/pg_hba.conf" <<EOF
local all all trust
host  all all 127.0.0.1/32 scram-sha-256
EOF
    PG_STARTED=1   # from here on cleanup runs pg_ctl stop (harmless if it never came up)
    "${AS_PG[@]}" "$PG_BINDIR/pg_ctl" -D "$WORK/pgdata" -l "$WORK/postgres.log" -w -t 60 start >/dev/null \
        || { tail -20 "$WORK/postgres.log" >&2; die "PostgreSQL did not start"; }
    DB=postgres psql_super -c "CREATE ROLE bench LOGIN PASSWORD 'bench'" -c "CREATE DATABASE bench OWNER bench"
    [ "$MODE" = memory ] && return 0   # the idle-client test needs no data
    log "pgbench -i -s $SCALE"
    PGPASSWORD=bench "$PG_BINDIR/pgbench" -h 127.0.0.1 -p "$PGPORT" -U bench -i -s "$SCALE" -q bench \
        >"$WORK/pgbench-init.log" 2>&1 || { cat "$WORK/pgbench-init.log" >&2; die "pgbench -i failed"; }
    psql_super -c "VACUUM ANALYZE" -c "CHECKPOINT"
}

# ---------------------------------------------------------------- PgBouncer
start_pgbouncer() {  # name auth(scram-sha-256|trust) -> sets PORT_<name>
    local name=$1 auth=$2 port
    port=$(free_port 16432)
    printf '"bench" "bench"\n' >"$WORK/userlist.txt"
    cat >"$WORK/$name.ini" <<EOF
[databases]
bench = host=127.0.0.1 port=$PGPORT dbname=bench
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = $auth
auth_file = $WORK/userlist.txt
pool_mode = transaction
default_pool_size = $POOL
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = 20000
ignore_startup_parameters = extra_float_digits
logfile = $WORK/$name.log
log_connections = 0
log_disconnections = 0
EOF
    [ ${#AS_PG[@]} -gt 0 ] && chown postgres: "$WORK/$name.ini" "$WORK/userlist.txt"
    # setsid: own session, so a Ctrl-C in the terminal reaches only the script (cleanup stops it).
    setsid "${AS_PG[@]}" "$PGBOUNCER" "$WORK/$name.ini" >"$WORK/$name.out" 2>&1 </dev/null &
    PIDS[$name]=$!
    wait_port "$port" 15 "${PIDS[$name]}" || { tail -20 "$WORK/$name.out" "$WORK/$name.log" >&2; die "PgBouncer did not start"; }
    printf -v "PORT_$name" '%s' "$port"
    log "PgBouncer ($name, auth $auth) on port $port, pid ${PIDS[$name]}"
}

# ---------------------------------------------------------------- pgswitch
# Returns 1 (with a reason on stderr) if pgswitch is missing or does not work.
start_pgswitch() {  # name auth(scram-sha-256|trust)
    local name=$1 auth=$2 port pid admin_port
    if [ ! -x "$PGSWITCH_BIN" ]; then
        log "pgswitch: $PGSWITCH_BIN not built (cargo build --release); skipping pgswitch"
        return 1
    fi
    port=$(free_port 17432)
    admin_port=$(free_port 19930)
    cat >"$WORK/$name.toml" <<EOF
[proxy]
listen = "127.0.0.1:$port"
pool_mode = "transaction"
auth_method = "$auth"
default_pool_size = $POOL
max_client_conn = 20000
log_level = "warn"

[backends.blue]
host = "127.0.0.1"
port = $PGPORT

# green points at the same server: the benchmark never cuts over.
[backends.green]
host = "127.0.0.1"
port = $PGPORT

[cutover]
active = "blue"

[admin]
listen = "127.0.0.1:$admin_port"

[[users]]
name = "bench"
password = "bench"
EOF
    setsid "$PGSWITCH_BIN" run --config "$WORK/$name.toml" >"$WORK/$name.log" 2>&1 </dev/null &
    pid=$!
    PIDS[$name]=$pid
    if ! wait_port "$port" 15 "$pid"; then
        log "pgswitch did not start listening on $port; its output:"
        tail -20 "$WORK/$name.log" | sed 's/^/    /' >&2
        stop_pid "$name" "$pid"; unset "PIDS[$name]"
        return 1
    fi
    local out
    if ! out=$(PGPASSWORD=bench PGCONNECT_TIMEOUT=10 timeout 20 "$PG_BINDIR/psql" -X -At -h 127.0.0.1 -p "$port" \
            -U bench -d bench -c "SELECT 40 + 2" 2>&1) || [ "$out" != 42 ]; then
        log "pgswitch is running but a query through it failed: $out"
        tail -20 "$WORK/$name.log" | sed 's/^/    /' >&2
        stop_pid "$name" "$pid"; unset "PIDS[$name]"
        return 1
    fi
    printf -v "PORT_$name" '%s' "$port"
    log "pgswitch ($name, auth $auth) on port $port, pid $pid: $("$PGSWITCH_BIN" --version 2>/dev/null || echo '?')"
    return 0
}

stop_named() {
    local name=$1
    if [ -n "${PIDS[$name]:-}" ]; then stop_pid "$name" "${PIDS[$name]}"; unset "PIDS[$name]"; fi
}

# ---------------------------------------------------------------- throughput
workload_flags() {
    case "$1" in
        select) echo "-S" ;;
        select-extended) echo "-S -M extended" ;;
        select-prepared) echo "-S -M prepared" ;;
        tpcb) echo "" ;;
        *) die "unknown workload $1" ;;
    esac
}

target_port() {
    case "$1" in
        pgswitch) echo "$PORT_pgswitch" ;;
        pgbouncer) echo "$PORT_pgbouncer" ;;
        direct) echo "$PGPORT" ;;
    esac
}

wait_quiet() {  # wait (at most BENCH_QUIET_WAIT s) until other processes leave the CPUs idle
    local waited=0 busy
    while [ "$waited" -lt "$QUIET_WAIT" ]; do
        busy=$(cpu_busy_pct 1)
        [ "$busy" -le 10 ] && return 0
        waited=$((waited + 1))
    done
    log "    machine still ${busy}% busy after ${QUIET_WAIT}s; going on"
}

run_pgbench() {  # target workload round secs [record]
    local t=$1 w=$2 r=$3 secs=$4 record=${5:-1} port dir rc flags snap0 snap1 attempt
    port=$(target_port "$t")
    flags=$(workload_flags "$w")
    dir="$LOGDIR/$w-$t-$r"
    for attempt in $(seq 0 "$RETRIES"); do
        rm -rf "$dir"; mkdir -p "$dir"
        # CPU used by everything outside our process trees during the run = interference.
        snap0=$($COMPARE cpu-snapshot $$ "$(head -1 "$WORK/pgdata/postmaster.pid")")
        set +e
        # --foreground keeps pgbench in our process group so Ctrl-C stops it at once.
        # shellcheck disable=SC2086
        PGPASSWORD=bench timeout --foreground -s INT $((secs + 120)) "$PG_BINDIR/pgbench" -h 127.0.0.1 \
            -p "$port" -U bench -n -c "$CLIENTS" -j "$JOBS" -T "$secs" -l --log-prefix="$dir/tx" $flags bench \
            >"$dir/out" 2>"$dir/out.err"
        rc=$?
        set -e
        snap1=$($COMPARE cpu-snapshot $$ "$(head -1 "$WORK/pgdata/postmaster.pid")")
        if [ "$rc" -ge 128 ] && [ "$rc" != 255 ]; then log "pgbench killed by a signal (rc $rc)"; exit 130; fi
        if [ "$record" != 1 ]; then
            [ "$rc" = 0 ] || log "warm-up through $t failed (rc $rc): $(tail -1 "$dir/out.err")"
            break
        fi
        $COMPARE parse --log-prefix "$dir/tx" --stdout "$dir/out" --rc "$rc" --workload "$w" --target "$t" \
            --round "$r" --cpu-before "$snap0" --cpu-after "$snap1" --results "$dir/rec.jsonl" >&2
        # A run disturbed by other work on the machine is repeated once it is quiet again.
        if [ "$attempt" -lt "$RETRIES" ] && $COMPARE disturbed "$dir/rec.jsonl"; then
            log "    disturbed by other processes: waiting for a quiet machine, then repeating (retry $((attempt + 1))/$RETRIES)"
            wait_quiet
            continue
        fi
        cat "$dir/rec.jsonl" >>"$RESULTS"
        break
    done
    [ "${BENCH_KEEP:-0}" = 1 ] || rm -rf "$dir"
    return 0
}

run_throughput() {
    local targets=() t w r i n
    HAVE_PGSWITCH=0
    if [ "$SKIP_PGSWITCH" = 0 ] && start_pgswitch pgswitch scram-sha-256; then HAVE_PGSWITCH=1; fi
    start_pgbouncer pgbouncer scram-sha-256
    [ "$HAVE_PGSWITCH" = 1 ] && targets+=(pgswitch)
    targets+=(pgbouncer direct)
    n=${#targets[@]}
    if [ "$WARMUP" -gt 0 ]; then
        log "warm-up: ${WARMUP}s of -S per target"
        for t in "${targets[@]}"; do run_pgbench "$t" select 0 "$WARMUP" 0; done
    fi
    for w in $WORKLOADS; do
        log "workload $w ($(workload_flags "$w" | sed 's/^$/TPC-B-like/')): VACUUM ANALYZE + CHECKPOINT"
        psql_super -c "VACUUM ANALYZE" -c "CHECKPOINT"
        [ "$HAVE_PGSWITCH" = 1 ] || $COMPARE mark --workload "$w" --target pgswitch --status skipped \
            --note "not built or not working" --results "$RESULTS"
        [ "$w" = select-prepared ] && $COMPARE mark --workload "$w" --target pgbouncer --status n/a \
            --note "PgBouncer 1.18 transaction mode has no prepared statements" --results "$RESULTS"
        for r in $(seq 1 "$ROUNDS"); do
            for i in $(seq 0 $((n - 1))); do
                t=${targets[$(( (i + r - 1) % n ))]}
                [ "$w" = select-prepared ] && [ "$t" = pgbouncer ] && continue
                run_pgbench "$t" "$w" "$r" "$SECS"
            done
        done
    done
    stop_named pgswitch
    stop_named pgbouncer
}

# ---------------------------------------------------------------- memory
measure_idle() {  # name target-label port pid
    local name=$1 t=$2 port=$3 pid=$4 before after hwm ready="$WORK/$1.ready" i got
    # One login+query first so the server-side pool / parameter cache exists before "before".
    PGCONNECT_TIMEOUT=10 timeout 20 "$PG_BINDIR/psql" -X -At -h 127.0.0.1 -p "$port" -U bench -d bench \
        -c "SELECT 1" >/dev/null 2>&1 || log "warning: warm-up query through $t failed"
    sleep 1
    before=$(rss_kib "$pid")
    log "$t: RSS before $before KiB; connecting $IDLE idle clients"
    rm -f "$ready"
    setsid "$PY" "$HERE/idle_clients.py" --port "$port" -n "$IDLE" --ready-file "$ready" \
        --stop-file "$WORK/$name.stop" 2>"$WORK/$name.idle.err" &
    IDLE_PID=$!
    for i in $(seq 1 3000); do
        [ -f "$ready" ] && break
        kill -0 "$IDLE_PID" 2>/dev/null || break
        sleep 0.1
    done
    if [ ! -f "$ready" ]; then
        cat "$WORK/$name.idle.err" >&2
        stop_pid idle_clients "$IDLE_PID"; IDLE_PID=""
        $COMPARE memory --target "$t" --clients "$IDLE" --status error --note "connector failed" --results "$MEMRESULTS"
        return 0
    fi
    sleep 2
    if ! kill -0 "$pid" 2>/dev/null; then
        log "$t died while holding idle clients"
        stop_pid idle_clients "$IDLE_PID"; IDLE_PID=""
        $COMPARE memory --target "$t" --clients "$IDLE" --status error --note "proxy died" --results "$MEMRESULTS"
        return 0
    fi
    after=$(rss_kib "$pid"); hwm=$(hwm_kib "$pid")
    got=$(awk '{print $1}' "$ready")
    sed 's/^/    /' "$WORK/$name.idle.err" >&2
    log "$t: RSS after $after KiB (peak $hwm KiB) with $got idle clients"
    # Are they really usable? one more query through the full proxy.
    PGCONNECT_TIMEOUT=10 timeout 20 "$PG_BINDIR/psql" -X -At -h 127.0.0.1 -p "$port" -U bench -d bench \
        -c "SELECT 1" >/dev/null 2>&1 || log "warning: $t did not answer a query while holding $got idle clients"
    touch "$WORK/$name.stop"
    stop_pid idle_clients "$IDLE_PID"; IDLE_PID=""
    $COMPARE memory --target "$t" --clients "$IDLE" --logged-in "$got" --rss-before "$before" \
        --rss-after "$after" --hwm "$hwm" --results "$MEMRESULTS"
}

run_memory() {
    if [ "$SKIP_PGSWITCH" = 0 ] && start_pgswitch pgswitch_mem trust; then
        measure_idle pgswitch_mem pgswitch "$PORT_pgswitch_mem" "${PIDS[pgswitch_mem]}"
        stop_named pgswitch_mem
    else
        $COMPARE memory --target pgswitch --clients "$IDLE" --status skipped --note "not built or not working" \
            --results "$MEMRESULTS"
    fi
    start_pgbouncer pgbouncer_mem trust
    measure_idle pgbouncer_mem pgbouncer "$PORT_pgbouncer_mem" "${PIDS[pgbouncer_mem]}"
    stop_named pgbouncer_mem
}

# ---------------------------------------------------------------- main
RESULTS="$WORK/results.jsonl"
MEMRESULTS="$WORK/memory.jsonl"
: >"$RESULTS"; : >"$MEMRESULTS"

start_postgres
case "$MODE" in
    all) run_throughput; run_memory ;;
    throughput) run_throughput ;;
    memory) run_memory ;;
esac

PGV=$("$PG_BINDIR/postgres" --version 2>/dev/null | sed 's/.*) //')
PBV=$("$PGBOUNCER" --version | head -1 | awk '{print $2}')
SWV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "no commit")
"$PY" - "$WORK/meta.json" <<EOF
import json, os, platform, sys
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
json.dump({
    "date": "$(date -u +'%Y-%m-%d %H:%M UTC')",
    "machine": f"{os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.release()}",
    "versions": "PostgreSQL $PGV, PgBouncer $PBV, pgswitch $SWV ($( [ -x "$PGSWITCH_BIN" ] && echo "$PGSWITCH_BIN" || echo "not built"))",
    "pgbench": "-c $CLIENTS -j $JOBS -T $SECS -n -l, scale $SCALE, $ROUNDS round(s), target order rotated each round, medians reported",
    "proxies": "transaction pooling, pool size $POOL, max_client_conn 20000, SCRAM-SHA-256 client auth for throughput (trust for the idle-client test)",
    "postgres": "max_connections 200, shared_buffers 128MB, everything else default (fsync on)",
    "mode": "$MODE",
    "CPU busy before start": "${BUSY}% (other processes; sampled over 2 s)",
}, open(sys.argv[1], "w"), indent=1)
EOF

mkdir -p "$HERE/results"
OUT="$HERE/results/$(date +%F).md"
[ -e "$OUT" ] && OUT="$HERE/results/$(date +%F-%H%M%S).md"
echo
if [ "$SAVE" = 1 ]; then
    $COMPARE report --results "$RESULTS" --memory "$MEMRESULTS" --meta "$WORK/meta.json" --out "$OUT" \
        --title "# pgswitch benchmark $(date +%F) ($MODE)"
    echo
    log "report written to ${OUT#"$ROOT"/}"
else
    $COMPARE report --results "$RESULTS" --memory "$MEMRESULTS" --meta "$WORK/meta.json"
fi
