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
#   BENCH_PGSWITCH_THREADS [0]  pgswitch's [proxy] worker_threads (0: one per core)
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
WORKLOADS=${BENCH_WORKLOADS:-"select select-extended select-prepared tpcb select-tls"}
RETRIES=${BENCH_RETRIES:-2}         # repeats of a run disturbed by other processes
QUIET_WAIT=${BENCH_QUIET_WAIT:-60}  # seconds to wait for a quiet machine before a repeat
PGSWITCH_BIN=${PGSWITCH_BIN:-$ROOT/target/release/pgswitch}
PG_BINDIR=${PG_BINDIR:-/usr/lib/postgresql/15/bin}
[ -x "$PG_BINDIR/pg_ctl" ] || PG_BINDIR=$(dirname "$(command -v pg_ctl)")
# shellcheck source=benches/lib.sh
. "$HERE/lib.sh"
COMPARE="$PY $HERE/pgbench_compare.py"

# ---------------------------------------------------------------- prerequisites
bench_setup pgswitch-bench pgbouncer
for b in pgbench psql initdb pg_ctl; do [ -x "$PG_BINDIR/$b" ] || die "$PG_BINDIR/$b not found"; done

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
warn_if_busy

# ---------------------------------------------------------------- state + cleanup
IDLE_PID=""
bench_cleanup_extra() {
    if [ -n "$IDLE_PID" ]; then stop_pid idle_clients "$IDLE_PID"; fi
}

psql_super() { pg_super "$PGPORT" "${DB:-bench}" "$@"; }

# ---------------------------------------------------------------- PostgreSQL
start_postgres() {
    PGPORT=$(free_port 15432)
    # Defaults except: pooling needs max_connections (200); shared_buffers stated explicitly
    # (128MB = the default). fsync/synchronous_commit stay ON (durable commits, as in production).
    pg_start pgdata "$PG_BINDIR" "$PGPORT"
    [ "$MODE" = memory ] && return 0   # the idle-client test needs no data
    log "pgbench -i -s $SCALE"
    PGPASSWORD=bench "$PG_BINDIR/pgbench" -h 127.0.0.1 -p "$PGPORT" -U bench -i -s "$SCALE" -q bench \
        >"$WORK/pgbench-init.log" 2>&1 || { cat "$WORK/pgbench-init.log" >&2; die "pgbench -i failed"; }
    psql_super -c "VACUUM ANALYZE" -c "CHECKPOINT"
}

# ---------------------------------------------------------------- PgBouncer
start_pgbouncer() {  # name auth(scram-sha-256|trust) -> sets PORT_<name>
    pgbouncer_start "$1" "$2" "$PGPORT" "client_tls_sslmode = allow
client_tls_cert_file = $TLS_CERT
client_tls_key_file = $TLS_KEY"
}

# A self-signed certificate for the client-TLS workload (both proxies use it).
make_tls_cert() {
    TLS_CERT=$WORK/tls.crt TLS_KEY=$WORK/tls.key
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=localhost" \
        -keyout "$TLS_KEY" -out "$TLS_CERT" >/dev/null 2>&1 || die "openssl could not make a certificate"
    [ ${#AS_PG[@]} -gt 0 ] && chown postgres: "$TLS_CERT" "$TLS_KEY"
    chmod 600 "$TLS_KEY"
}

# ---------------------------------------------------------------- pgswitch
# Returns 1 (with a reason on stderr) if pgswitch is missing or does not work.
start_pgswitch() {  # name auth(scram-sha-256|trust)
    local name=$1 auth=$2 port admin_port
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
worker_threads = ${BENCH_PGSWITCH_THREADS:-0}
tls_cert = "$TLS_CERT"
tls_key = "$TLS_KEY"

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
    pgswitch_launch "$name" "$WORK/$name.toml" "$port"
}

# ---------------------------------------------------------------- throughput
workload_flags() {
    case "$1" in
        select) echo "-S" ;;
        select-extended) echo "-S -M extended" ;;
        select-prepared) echo "-S -M prepared" ;;
        tpcb) echo "" ;;
        select-tls) echo "-S" ;;  # with PGSSLMODE=require: client TLS to the proxy
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
    local t=$1 w=$2 r=$3 secs=$4 record=${5:-1} port dir rc flags snap0 snap1 attempt proxy_pid psnap0 psnap1
    port=$(target_port "$t")
    flags=$(workload_flags "$w")
    dir="$LOGDIR/$w-$t-$r"
    for attempt in $(seq 0 "$RETRIES"); do
        rm -rf "$dir"; mkdir -p "$dir"
        # CPU used by everything outside our process trees during the run = interference.
        snap0=$($COMPARE cpu-snapshot $$ "$(head -1 "$WORK/pgdata/postmaster.pid")")
        # The proxy's own CPU and context switches, per transaction.
        proxy_pid=${PIDS[$t]:-}
        psnap0=$([ -n "$proxy_pid" ] && $COMPARE proc-snapshot "$proxy_pid" || true)
        set +e
        # --foreground keeps pgbench in our process group so Ctrl-C stops it at once.
        # shellcheck disable=SC2086
        PGSSLMODE=$([ "$w" = select-tls ] && echo require || echo prefer) \
        PGPASSWORD=bench timeout --foreground -s INT $((secs + 120)) "$PG_BINDIR/pgbench" -h 127.0.0.1 \
            -p "$port" -U bench -n -c "$CLIENTS" -j "$JOBS" -T "$secs" -l --log-prefix="$dir/tx" $flags bench \
            >"$dir/out" 2>"$dir/out.err"
        rc=$?
        set -e
        snap1=$($COMPARE cpu-snapshot $$ "$(head -1 "$WORK/pgdata/postmaster.pid")")
        psnap1=$([ -n "$proxy_pid" ] && $COMPARE proc-snapshot "$proxy_pid" || true)
        if [ "$rc" -ge 128 ] && [ "$rc" != 255 ]; then log "pgbench killed by a signal (rc $rc)"; exit 130; fi
        if [ "$record" != 1 ]; then
            [ "$rc" = 0 ] || log "warm-up through $t failed (rc $rc): $(tail -1 "$dir/out.err")"
            break
        fi
        $COMPARE parse --log-prefix "$dir/tx" --stdout "$dir/out" --rc "$rc" --workload "$w" --target "$t" \
            --round "$r" --cpu-before "$snap0" --cpu-after "$snap1" \
            --proc-before "$psnap0" --proc-after "$psnap1" --results "$dir/rec.jsonl" >&2
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
    [ -n "${TLS_CERT:-}" ] || make_tls_cert
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
        [ "$w" = select-tls ] && $COMPARE mark --workload "$w" --target direct --status n/a \
            --note "client TLS is measured through the proxies" --results "$RESULTS"
        [ "$w" = select-prepared ] && $COMPARE mark --workload "$w" --target pgbouncer --status n/a \
            --note "PgBouncer 1.18 transaction mode has no prepared statements" --results "$RESULTS"
        for r in $(seq 1 "$ROUNDS"); do
            for i in $(seq 0 $((n - 1))); do
                t=${targets[$(( (i + r - 1) % n ))]}
                [ "$w" = select-prepared ] && [ "$t" = pgbouncer ] && continue
                [ "$w" = select-tls ] && [ "$t" = direct ] && continue
                run_pgbench "$t" "$w" "$r" "$SECS"
            done
        done
    done
    stop_named pgswitch
    stop_named pgbouncer
}

# ---------------------------------------------------------------- memory
measure_idle() {  # name target port pid transport(plain|tls)
    local name=$1 target=$2 port=$3 pid=$4 transport=$5 t before after hwm ready="$WORK/$1.ready" i got
    local tls_flag=() rec=(--target "$2" --transport "$5" --clients "$IDLE" --results "$MEMRESULTS")
    t=$target; [ "$transport" = tls ] && { t="$target (TLS)"; tls_flag=(--tls); }
    # One login+query first so the server-side pool / parameter cache exists before "before".
    PGCONNECT_TIMEOUT=10 timeout 20 "$PG_BINDIR/psql" -X -At -h 127.0.0.1 -p "$port" -U bench -d bench \
        -c "SELECT 1" >/dev/null 2>&1 || log "warning: warm-up query through $t failed"
    sleep 1
    before=$(rss_kib "$pid")
    log "$t: RSS before $before KiB; connecting $IDLE idle clients"
    rm -f "$ready"
    setsid "$PY" "$HERE/idle_clients.py" "${tls_flag[@]}" --port "$port" -n "$IDLE" --ready-file "$ready" \
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
        $COMPARE memory "${rec[@]}" --status error --note "connector failed"
        return 0
    fi
    sleep 2
    if ! kill -0 "$pid" 2>/dev/null; then
        log "$t died while holding idle clients"
        stop_pid idle_clients "$IDLE_PID"; IDLE_PID=""
        $COMPARE memory "${rec[@]}" --status error --note "proxy died"
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
    $COMPARE memory "${rec[@]}" --logged-in "$got" --rss-before "$before" --rss-after "$after" --hwm "$hwm"
}

# Plain TCP, then client TLS (both proxies have the bench's certificate), each with a
# fresh proxy process, so that memory the first run leaves behind is not in the second's
# "before".
run_memory() {
    local transport name port
    [ -n "${TLS_CERT:-}" ] || make_tls_cert
    for transport in plain tls; do
        name=pgswitch_mem_$transport
        if [ "$SKIP_PGSWITCH" = 0 ] && start_pgswitch "$name" trust; then
            port=PORT_$name
            measure_idle "$name" pgswitch "${!port}" "${PIDS[$name]}" "$transport"
            stop_named "$name"
        else
            $COMPARE memory --target pgswitch --transport "$transport" --clients "$IDLE" --status skipped \
                --note "not built or not working" --results "$MEMRESULTS"
        fi
    done
    for transport in plain tls; do
        name=pgbouncer_mem_$transport
        start_pgbouncer "$name" trust
        port=PORT_$name
        measure_idle "$name" pgbouncer "${!port}" "${PIDS[$name]}" "$transport"
        stop_named "$name"
    done
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
    "proxies": "transaction pooling, pool size $POOL, max_client_conn 20000, SCRAM-SHA-256 client auth for throughput (trust for the idle-client test, plain TCP and client TLS with a self-signed RSA-2048 certificate, a fresh proxy process each)",
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
