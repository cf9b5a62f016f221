# shellcheck shell=bash
# Shared helpers of the benchmark scripts (benches/run.sh, benches/cutover.sh): PostgreSQL
# clusters as the `postgres` user in a temp dir on free ports, PgBouncer, pgswitch, cleanup.
#
# Source it after `set -euo pipefail` and after setting HERE (this directory) and ROOT (the
# repository). It defines functions only, except the variables below; call bench_setup
# first. Callers may define bench_cleanup_extra (run first on exit, still with the servers up).
#
#   AS_PG        command prefix that runs a command as `postgres` (empty when not root)
#   PGBOUNCER    the pgbouncer binary (after bench_setup with pgbouncer)
#   WORK         temp dir, removed on exit unless BENCH_KEEP=1
#   LOGDIR       where pgbench's per-transaction logs go (/dev/shm when writable)
#   PIDS         name -> pid of the background processes started here (stopped on exit)
#   PG_CLUSTERS  data dir -> bin dir of the clusters started here (stopped on exit)
# and expects PG_BINDIR (client tools: psql, pgbench) and, for pgswitch, PGSWITCH_BIN.

PY=${PYTHON:-python3}

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

declare -A PIDS=()
declare -A PG_CLUSTERS=()
AS_PG=()

# bench_setup <workdir-prefix> [pgbouncer]: checks prerequisites, makes WORK and LOGDIR,
# installs the cleanup trap.
bench_setup() {
    local prefix=$1 want_pgbouncer=${2:-}
    if [ "$(id -u)" = 0 ]; then
        # initdb/postgres refuse root, PgBouncer refuses root too: run them as postgres.
        id postgres >/dev/null 2>&1 || useradd --system --home /var/lib/postgresql --shell /bin/bash postgres
        AS_PG=(setpriv --reuid=postgres --regid=postgres --init-groups --)
    fi
    if [ "$want_pgbouncer" = pgbouncer ]; then
        if ! command -v pgbouncer >/dev/null 2>&1 && [ ! -x /usr/sbin/pgbouncer ]; then
            log "PgBouncer not found: installing it"
            [ "$(id -u)" = 0 ] || die "pgbouncer missing and not root: apt-get install pgbouncer"
            DEBIAN_FRONTEND=noninteractive apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null
        fi
        # The package starts a system service; we never use it (own config, own port).
        PGBOUNCER=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
    fi
    command -v "$PY" >/dev/null || die "python3 not found"

    WORK=$(mktemp -d "/tmp/$prefix.XXXXXX")
    chmod 755 "$WORK"
    mkdir -p "$WORK/sock"
    # pgbench's per-transaction logs go to tmpfs when there is one, so that writing them back
    # to disk cannot stall the runs.
    if [ -d /dev/shm ] && [ -w /dev/shm ]; then
        LOGDIR=$(mktemp -d "/dev/shm/$prefix-logs.XXXXXX")
    else
        LOGDIR="$WORK/logs"; mkdir -p "$LOGDIR"
    fi
    chmod 755 "$LOGDIR"
    [ ${#AS_PG[@]} -gt 0 ] && chown -R postgres: "$WORK"
    trap bench_cleanup EXIT
    trap 'log "interrupted"; exit 130' INT TERM HUP
}

# Busy share of all CPUs over a few seconds (everything, ours included).
cpu_busy_pct() {  # [seconds]
    local a b
    a=($(sed -n 's/^cpu  //p' /proc/stat)); sleep "${1:-2}"; b=($(sed -n 's/^cpu  //p' /proc/stat))
    awk -v a="${a[*]}" -v b="${b[*]}" 'BEGIN { n = split(a, x); split(b, y); t = 0
        for (i = 1; i <= n; i++) t += y[i] - x[i]
        idle = (y[4] - x[4]) + (y[5] - x[5]); printf "%.0f", t ? 100 * (t - idle) / t : 0 }'
}

warn_if_busy() {
    BUSY=$(cpu_busy_pct)
    if [ "$BUSY" -gt 15 ]; then
        log "warning: the CPUs are already ${BUSY}% busy before starting; results will be noisy. Top now:"
        top -b -n 1 -o %CPU 2>/dev/null | sed -n '8,11p' | sed 's/^/    /' >&2 || true
    fi
}

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

stop_named() {
    local name=$1
    if [ -n "${PIDS[$name]:-}" ]; then stop_pid "$name" "${PIDS[$name]}"; unset "PIDS[$name]"; fi
}

bench_cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    set +e
    if declare -F bench_cleanup_extra >/dev/null; then bench_cleanup_extra; fi
    local name dir
    for name in "${!PIDS[@]}"; do stop_pid "$name" "${PIDS[$name]}"; done
    for dir in "${!PG_CLUSTERS[@]}"; do
        "${AS_PG[@]}" "${PG_CLUSTERS[$dir]}/pg_ctl" -D "$dir" -m fast -w -t 30 stop >/dev/null 2>&1 \
            || "${AS_PG[@]}" "${PG_CLUSTERS[$dir]}/pg_ctl" -D "$dir" -m immediate -w stop >/dev/null 2>&1
    done
    if [ "${BENCH_KEEP:-0}" = 1 ]; then
        log "kept $WORK and ${LOGDIR:-}"
    else
        rm -rf "$WORK" ${LOGDIR:+"$LOGDIR"}
    fi
    exit "$rc"
}

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

# pg_start <name> <bindir> <port> [extra postgresql.conf lines]: initdb into $WORK/<name>
# with the server binaries in <bindir> (client tools come from $PG_BINDIR)
# (superuser `postgres`, trust over the socket, SCRAM over TCP), start it (log:
# $WORK/<name>.log, socket dir $WORK/sock), create role bench/bench and database bench.
pg_start() {
    local name=$1 bindir=$2 port=$3 extra=${4:-} dir="$WORK/$1" b
    for b in initdb pg_ctl postgres; do [ -x "$bindir/$b" ] || die "$bindir/$b not found"; done
    log "PostgreSQL $name ($("$bindir/postgres" --version | sed 's/.*) //')): initdb in $dir, port $port"
    "${AS_PG[@]}" "$bindir/initdb" -D "$dir" -U postgres -E UTF8 --locale=C \
        --auth-local=trust --auth-host=scram-sha-256 >"$WORK/$name.initdb.log" 2>&1 \
        || { cat "$WORK/$name.initdb.log" >&2; die "initdb ($name) failed"; }
    cat >>"$dir/postgresql.conf" <<EOF
# --- pgswitch bench ---
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$WORK/sock'
max_connections = 200
shared_buffers = 128MB
password_encryption = scram-sha-256
$extra
EOF
    cat >"$dir/pg_hba.conf" <<EOF
local all all trust
host  all all 127.0.0.1/32 scram-sha-256
host  replication all 127.0.0.1/32 scram-sha-256
EOF
    PG_CLUSTERS[$dir]=$bindir   # from here on cleanup runs pg_ctl stop (harmless if it never came up)
    "${AS_PG[@]}" "$bindir/pg_ctl" -D "$dir" -l "$WORK/$name.log" -w -t 60 start >/dev/null \
        || { tail -20 "$WORK/$name.log" >&2; die "PostgreSQL ($name) did not start"; }
    pg_super "$port" postgres -c "CREATE ROLE bench LOGIN PASSWORD 'bench'" \
        -c "CREATE DATABASE bench OWNER bench"
}

# pg_super <port> <db> psql-args...: psql (from $PG_BINDIR) as superuser over the Unix socket.
pg_super() {
    local port=$1 db=$2; shift 2
    "$PG_BINDIR/psql" -X -q -h "$WORK/sock" -p "$port" -U postgres -d "$db" -v ON_ERROR_STOP=1 "$@"
}

# pgbouncer_start <name> <auth> <db-port> [extra [pgbouncer] lines] -> PORT_<name>, PIDS[name].
# Database `bench` on 127.0.0.1:<db-port>; users from BENCH_PGB_USERS (userlist lines,
# default bench/bench). Config: $WORK/<name>.ini, log: $WORK/<name>.log.
pgbouncer_start() {
    local name=$1 auth=$2 dbport=$3 extra=${4:-} port
    port=$(free_port 16432)
    printf '%s\n' "${BENCH_PGB_USERS:-\"bench\" \"bench\"}" >"$WORK/$name.users.txt"
    cat >"$WORK/$name.ini" <<EOF
[databases]
bench = host=127.0.0.1 port=$dbport dbname=bench
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = $auth
auth_file = $WORK/$name.users.txt
pool_mode = transaction
default_pool_size = ${POOL:-20}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = 20000
ignore_startup_parameters = extra_float_digits
logfile = $WORK/$name.log
log_connections = 0
log_disconnections = 0
$extra
EOF
    [ ${#AS_PG[@]} -gt 0 ] && chown postgres: "$WORK/$name.ini" "$WORK/$name.users.txt"
    # setsid: own session, so a Ctrl-C in the terminal reaches only the script (cleanup stops it).
    setsid "${AS_PG[@]}" "$PGBOUNCER" "$WORK/$name.ini" >"$WORK/$name.out" 2>&1 </dev/null &
    PIDS[$name]=$!
    wait_port "$port" 15 "${PIDS[$name]}" || { tail -20 "$WORK/$name.out" "$WORK/$name.log" >&2; die "PgBouncer did not start"; }
    printf -v "PORT_$name" '%s' "$port"
    log "PgBouncer ($name, auth $auth) on port $port, pid ${PIDS[$name]}"
}

# pgswitch_launch <name> <config.toml> <listen-port>: starts pgswitch (log:
# $WORK/<name>.log) and checks a query through it as bench/bench. Returns 1 (with the
# reason on stderr, process stopped) when it does not start or answer.
pgswitch_launch() {
    local name=$1 toml=$2 port=$3 pid out
    setsid "$PGSWITCH_BIN" run --config "$toml" >"$WORK/$name.log" 2>&1 </dev/null &
    pid=$!
    PIDS[$name]=$pid
    if ! wait_port "$port" 15 "$pid"; then
        log "pgswitch did not start listening on $port; its output:"
        tail -20 "$WORK/$name.log" | sed 's/^/    /' >&2
        stop_pid "$name" "$pid"; unset "PIDS[$name]"
        return 1
    fi
    if ! out=$(PGPASSWORD=bench PGCONNECT_TIMEOUT=10 timeout 20 "$PG_BINDIR/psql" -X -At -h 127.0.0.1 -p "$port" \
            -U bench -d bench -c "SELECT 40 + 2" 2>&1) || [ "$out" != 42 ]; then
        log "pgswitch is running but a query through it failed: $out"
        tail -20 "$WORK/$name.log" | sed 's/^/    /' >&2
        stop_pid "$name" "$pid"; unset "PIDS[$name]"
        return 1
    fi
    printf -v "PORT_$name" '%s' "$port"
    log "pgswitch ($name) on port $port, pid $pid: $("$PGSWITCH_BIN" --version 2>/dev/null || echo '?')"
    return 0
}
