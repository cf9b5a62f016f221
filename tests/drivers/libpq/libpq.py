#!/usr/bin/env python3
"""The driver matrix program for libpq: the real `psql` and `pgbench` of
PostgreSQL 15, run through pgswitch (contract: ../README.md).

PGHOST/PGPORT/PGUSER/PGPASSWORD/PGDATABASE point at the proxy, so every tool
started here connects through it unless given DIRECT_PORT, which is used for
setup, for checks of what the server holds, for pg_stat_activity and for the
"what does PostgreSQL itself answer" comparison.

psql speaks the simple query protocol (psql 15 has no \\bind); pgbench covers
the extended protocol: -M extended (unnamed statements) and -M prepared
(named statements P_0, P_1, ... per script and connection), running the
scripts in pgbench/, which check their own results.

In session mode a client beyond POOL_SIZE waits, at its first query, until
another client's session ends. pgbench connects all of its clients before any
of them runs: that its runs pass in session mode too shows that logins through
a full session pool complete at once. -M prepared is the exception: pgbench
prepares with a blocking PQprepare, so a thread whose client waits for a server
can't run the thread's other client that holds one, through any session pooler
with fewer servers than clients (PgBouncer 1.18 hangs the same way); there
each client is a pgbench process of its own.

Standard library only. Run: python3 libpq.py (see ../README.md for the
environment); SCENARIOS=cancel,copy selects scenarios.
"""

import concurrent.futures
import csv
import hashlib
import io
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from decimal import Decimal

BIN = "/usr/lib/postgresql/15/bin"
PSQL = os.path.join(BIN, "psql")
PGBENCH = os.path.join(BIN, "pgbench")
HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(HERE, "pgbench")

DIRECT_PORT = os.environ["DIRECT_PORT"]
POOL_MODE = os.environ.get("POOL_MODE", "transaction")
POOL_SIZE = int(os.environ.get("POOL_SIZE", "2"))
CLIENTS = int(os.environ.get("CLIENTS", str(2 * POOL_SIZE)))

# The whole program ends well within the runner's 120 s: every wait below is
# capped by what is left of this budget.
DEADLINE = time.monotonic() + 110


class Fail(Exception):
    """A scenario failed; the message is its one-line reason."""


def budget(seconds):
    """A timeout of `seconds`, capped by what is left of the program's time."""
    left = DEADLINE - time.monotonic()
    if left <= 1:
        raise Fail("out of time: the program's 110 s budget is used up")
    return min(seconds, left)


def tool_env(port=None, **settings):
    """The environment for psql/pgbench: the proxy unless `port` is given,
    plus libpq settings such as PGAPPNAME."""
    env = dict(os.environ)
    if port is not None:
        env["PGPORT"] = str(port)
    env.update(settings)
    return env


def first_line(text):
    lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
    return lines[0] if lines else "(no output)"


# ---------------------------------------------------------------- psql


def psql(script, port=None, env=None, timeout=20):
    """Runs a psql script (on stdin, so COPY ... FROM STDIN data can follow
    its command) on one connection and returns (stdout, stderr); the first
    error stops it and raises Fail."""
    cmd = [PSQL, "-X", "-A", "-t", "-q", "-v", "VERBOSITY=verbose", "-v", "ON_ERROR_STOP=1"]
    try:
        done = subprocess.run(cmd, input=script, capture_output=True, text=True,
                              env=env or tool_env(port), timeout=budget(timeout))
    except subprocess.TimeoutExpired:
        raise Fail("psql did not finish within %d s: %s" % (timeout, first_line(script)))
    if done.returncode != 0:
        raise Fail("psql exited %d: %s" % (done.returncode, first_line(done.stderr)))
    return done.stdout, done.stderr


def direct(sql):
    """Runs SQL directly against PostgreSQL; returns the output lines."""
    return psql(sql, port=DIRECT_PORT)[0].splitlines()


def direct_value(sql):
    lines = direct(sql)
    return lines[0] if lines else ""


def wait_until(condition, what, timeout=10):
    end = time.monotonic() + budget(timeout)
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.05)
    raise Fail("timed out after %d s waiting until %s" % (timeout, what))


class Session:
    """One psql process kept open on one connection, fed one statement at a
    time, so a scenario can interleave several connections. run() returns the
    output lines (results and, with VERBOSITY verbose, error messages) and
    psql's SQLSTATE of the last query. Errors do not end the session."""

    DONE = "__statement_done__"

    def __init__(self, port=None):
        cmd = [PSQL, "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=0",
               "-v", "VERBOSITY=verbose"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     env=tool_env(port))
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def run(self, sql, timeout=10):
        try:
            self.proc.stdin.write("%s\n\\echo %s :SQLSTATE\n" % (sql, self.DONE))
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise Fail("psql session ended before %r" % sql)
        output = []
        end = time.monotonic() + budget(timeout)
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                raise Fail("no answer within %d s to %r" % (timeout, sql))
            if line is None:
                raise Fail("psql session ended at %r: %s" % (sql, " / ".join(output)))
            if line.startswith(self.DONE):
                return output, line[len(self.DONE):].strip()
            output.append(line)

    def expect(self, sql, sqlstate="00000", rows=None):
        """Runs `sql`, checks its SQLSTATE and (if given) its result rows."""
        output, state = self.run(sql)
        if state != sqlstate:
            raise Fail("%r gave SQLSTATE %s, expected %s: %s"
                       % (sql, state, sqlstate, " / ".join(output[:2])))
        if rows is not None and output != rows:
            raise Fail("%r returned %r, expected %r" % (sql, output, rows))
        return output

    def close(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def concurrently(function, arguments):
    """Runs function(argument) for every argument at the same time; returns
    the results in order, re-raising the first failure."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(arguments)) as pool:
        return list(pool.map(function, arguments))


# ---------------------------------------------------------------- pgbench


def pgbench(script, mode, clients, transactions, timeout=40):
    """Runs pgbench with a custom script (-n: no vacuum of pgbench's own
    tables) and returns its CompletedProcess."""
    cmd = [PGBENCH, "-n", "-M", mode, "-c", str(clients), "-j", str(min(2, clients)),
           "-t", str(transactions), "-f", os.path.join(SCRIPTS, script)]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=tool_env(),
                              timeout=budget(timeout))
    except subprocess.TimeoutExpired:
        raise Fail("pgbench -M %s -f %s did not finish within %d s" % (mode, script, timeout))


def pgbench_failure(script, run):
    """Why a pgbench run failed, in one line: the aborted command (named by
    its line in the script) or pgbench's first error."""
    found = re.search(r"aborted in command (\d+)", run.stderr)
    if found:
        with open(os.path.join(SCRIPTS, script)) as f:
            commands = [l.strip() for l in f
                        if l.strip() and not l.strip().startswith("--")]
        number = int(found.group(1))
        command = commands[number] if number < len(commands) else "?"
        error = re.search(r"(ERROR: .*)", run.stderr)
        return "client aborted at `%s`%s" % (command, ": " + error.group(1) if error else "")
    errors = [l for l in run.stderr.splitlines() if "error" in l.lower()]
    return first_line("\n".join(errors) or run.stderr or run.stdout)


def check_pgbench(script, mode, run, clients, transactions):
    """A run passed: exit 0, every transaction processed, none failed."""
    label = "pgbench -M %s -f %s" % (mode, script)
    if run.returncode != 0:
        raise Fail("%s exited %d: %s" % (label, run.returncode, pgbench_failure(script, run)))
    processed = "number of transactions actually processed: %d/%d" % (
        clients * transactions, clients * transactions)
    if processed not in run.stdout:
        raise Fail("%s: expected %r in its report" % (label, processed))
    if "number of failed transactions: 0 " not in run.stdout:
        raise Fail("%s: %s" % (label, first_line(
            re.findall(r"number of failed transactions.*", run.stdout)[0])))


def pgbench_clients(script, mode, clients, transactions):
    """`clients` pgbench clients at once, each running `transactions`
    transactions of `script`, checked: one pgbench process, or, for -M
    prepared in session mode, one process per client (see the top)."""
    if POOL_MODE == "session" and mode == "prepared":
        runs = concurrently(
            lambda _: pgbench(script, mode, 1, transactions),
            range(clients))
        for run in runs:
            check_pgbench(script, mode, run, 1, transactions)
    else:
        run = pgbench(script, mode, clients, transactions)
        check_pgbench(script, mode, run, clients, transactions)


# ---------------------------------------------------------------- scenarios


def simple_query():
    """CLIENTS psql processes at once, each 50 unprepared queries whose
    results are checked line by line."""
    def client(c):
        queries = []
        expected = []
        for i in range(1, 51):
            word = "c%d-q%d" % (c, i)
            queries.append("select %d, %d, md5('%s'), count(*) from generate_series(1, %d);"
                           % (c, i, word, i))
            expected.append("%d|%d|%s|%d" % (c, i, hashlib.md5(word.encode()).hexdigest(), i))
        out, _ = psql("\n".join(queries) + "\n")
        got = out.splitlines()
        if got != expected:
            wrong = next((i for i, (g, e) in enumerate(zip(got, expected)) if g != e),
                         min(len(got), len(expected)))
            raise Fail("client %d query %d: got %r, expected %r" % (
                c, wrong + 1, got[wrong] if wrong < len(got) else None,
                expected[wrong] if wrong < len(expected) else None))
    concurrently(client, range(CLIENTS))


def setup_kv():
    direct("drop table if exists libpq_kv;"
           "create table libpq_kv (k int primary key, v int not null);"
           "insert into libpq_kv select k, k * 7 from generate_series(1, 100) k;")


def prepared_default():
    """pgbench's default protocol (-M simple) and its extended protocol with
    unnamed statements (-M extended): CLIENTS clients at once, 25
    transactions of three parameterized statements each, results checked by
    the script."""
    setup_kv()
    for mode in ("simple", "extended"):
        pgbench_clients("checked_statements.sql", mode, CLIENTS, 25)


def prepared_forced():
    """The same with named prepared statements (-M prepared): each client
    prepares P_0..P_2 once and executes them 25 times."""
    setup_kv()
    pgbench_clients("checked_statements.sql", "prepared", CLIENTS, 25)


def same_name_different_text():
    """Two pgbench -M prepared runs at once whose scripts get the same
    statement names (P_0, P_1) for different text; each checks its results,
    and each table holds exactly the rows of its own script."""
    direct("drop table if exists libpq_same_a, libpq_same_b;"
           "create table libpq_same_a (v int not null);"
           "create table libpq_same_b (v int not null, w int not null, note text not null);")
    # Two clients per run, so four clients share the two server connections;
    # in session mode one each (-M prepared: see the top).
    clients = 1 if POOL_MODE == "session" else max(1, CLIENTS // 2)
    transactions = 100
    runs = concurrently(lambda script: pgbench(script, "prepared", clients, transactions),
                        ["same_name_a.sql", "same_name_b.sql"])
    for script, run in zip(["same_name_a.sql", "same_name_b.sql"], runs):
        check_pgbench(script, "prepared", run, clients, transactions)
    want = clients * transactions
    got = direct("select count(*) from libpq_same_a;"
                 "select count(*), count(*) filter (where note = 'from b') from libpq_same_b;")
    if got != [str(want), "%d|%d" % (want, want)]:
        raise Fail("rows in libpq_same_a and libpq_same_b: %r, expected %r"
                   % (got, [str(want), "%d|%d" % (want, want)]))


def transactions():
    """Commit (another connection sees the row), rollback (it does not), then
    more work on the same connection."""
    direct("drop table if exists libpq_tx;"
           "create table libpq_tx (id int primary key, note text);")
    with Session() as a, Session() as b:
        a.expect("begin;")
        a.expect("insert into libpq_tx values (1, 'committed');")
        a.expect("commit;")
        b.expect("select id from libpq_tx order by id;", rows=["1"])
        a.expect("begin;")
        a.expect("insert into libpq_tx values (2, 'rolled back');")
        b.expect("select id from libpq_tx order by id;", rows=["1"])
        a.expect("rollback;")
        b.expect("select id from libpq_tx order by id;", rows=["1"])
        a.expect("insert into libpq_tx values (3, 'after the rollback');")
        a.expect("select id from libpq_tx order by id;", rows=["1", "3"])
        a.expect("begin;")
        a.expect("update libpq_tx set note = 'updated' where id = 3;")
        a.expect("commit;")
        b.expect("select id, note from libpq_tx order by id;",
                 rows=["1|committed", "3|updated"])
    if direct("select id from libpq_tx order by id;") != ["1", "3"]:
        raise Fail("PostgreSQL holds %r, expected ids 1 and 3" % direct("select id from libpq_tx"))


def error_then_rollback():
    """begin; select 1/0 (22012); select 1 (25P02); rollback; select 1 as x:
    three rounds on one connection."""
    with Session() as s:
        for _ in range(3):
            s.expect("begin;")
            s.expect("select 1/0;", "22012")
            s.expect("select 1;", "25P02")
            s.expect("rollback;")
            s.expect("select 1 as x;", rows=["1"])


def savepoints():
    """Savepoint, an error, rollback to the savepoint, more work, commit: the
    rows from before the savepoint and after the rollback survive."""
    direct("drop table if exists libpq_sp;"
           "create table libpq_sp (id int primary key);")
    with Session() as s:
        s.expect("begin;")
        s.expect("insert into libpq_sp values (1);")
        s.expect("savepoint s1;")
        s.expect("insert into libpq_sp values (2);")
        s.expect("insert into libpq_sp values (1);", "23505")
        s.expect("select 1;", "25P02")
        s.expect("rollback to savepoint s1;")
        s.expect("insert into libpq_sp values (3);")
        s.expect("savepoint s2;")
        s.expect("insert into libpq_sp values (4);")
        s.expect("release savepoint s2;")
        s.expect("select id from libpq_sp order by id;", rows=["1", "3", "4"])
        s.expect("commit;")
        s.expect("select id from libpq_sp order by id;", rows=["1", "3", "4"])
    got = direct("select id from libpq_sp order by id;")
    if got != ["1", "3", "4"]:
        raise Fail("PostgreSQL holds ids %r, expected 1, 3, 4" % got)


def startup_params():
    """CLIENTS psql processes at once, each with its own PGAPPNAME, PGTZ and
    PGOPTIONS (search_path, statement_timeout), each checking all of them on
    every one of 25 transactions."""
    zones = ["UTC", "Asia/Tokyo", "America/New_York", "Europe/Berlin"]
    setup = []
    for c in range(CLIENTS):
        setup.append("drop schema if exists libpq_sp_%d cascade;"
                     "create schema libpq_sp_%d;"
                     "create table libpq_sp_%d.libpq_whoami (client int);"
                     "insert into libpq_sp_%d.libpq_whoami values (%d);" % (c, c, c, c, c))
    direct("\n".join(setup))

    def client(c):
        env = tool_env(PGAPPNAME="libpq_app_%d" % c, PGTZ=zones[c % len(zones)],
                       PGOPTIONS="-c search_path=libpq_sp_%d,public -c statement_timeout=%d1s"
                                 % (c, c + 1))
        expected = "libpq_app_%d|%s|{libpq_sp_%d,public}|%d1s|%d" % (
            c, zones[c % len(zones)], c, c + 1, c)
        # Each transaction sleeps a little so the clients' transactions overlap.
        transaction = ("begin;\n"
                       "select current_setting('application_name'), current_setting('TimeZone'),"
                       " current_schemas(false)::text, current_setting('statement_timeout'),"
                       " (select client from libpq_whoami);\n"
                       "select pg_sleep(0.01) \\g /dev/null\n"
                       "commit;\n")
        out, _ = psql(transaction * 25, env=env)
        got = out.splitlines()
        for number, line in enumerate(got, 1):
            if line != expected:
                raise Fail("client %d transaction %d saw %r, expected %r"
                           % (c, number, line, expected))
        if len(got) != 25:
            raise Fail("client %d: %d results, expected 25" % (c, len(got)))
    concurrently(client, range(CLIENTS))


def copy_rows(c, first, count):
    """Rows for COPY in CSV: commas, quotes, a line break, non-ASCII text and
    NULLs (written \\N)."""
    rows = []
    for i in range(first, first + count):
        note = "\\N" if i % 7 == 0 else 'line "%d"\nof client %d, ünïcødé' % (i, c)
        rows.append([str(i), "client %d row %d" % (c, i), "%d.%02d" % (i, i % 100), note])
    return rows


def to_csv(rows):
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    return text.getvalue()


def copy():
    """CLIENTS psql processes at once, each: \\copy of 3000 rows from a CSV
    file, COPY FROM STDIN of 50 more inline, \\copy of all of them to a file
    and COPY TO STDOUT of a summary; contents compared."""
    for c in range(CLIENTS):
        direct("drop table if exists libpq_copy_%d;"
               "create table libpq_copy_%d (id int primary key, label text,"
               " amount numeric(10,2), note text);" % (c, c))
    options = "(format csv, null '\\N')"
    with tempfile.TemporaryDirectory(prefix="libpq-copy-") as tmp:
        def client(c):
            from_file = copy_rows(c, 1, 3000)
            inline = copy_rows(c, 3001, 50)
            source = os.path.join(tmp, "in_%d.csv" % c)
            target = os.path.join(tmp, "out_%d.csv" % c)
            with open(source, "w", newline="") as f:
                f.write(to_csv(from_file))
            script = ("\\copy libpq_copy_%d from '%s' with %s\n" % (c, source, options)
                      + "copy libpq_copy_%d from stdin with %s;\n" % (c, options)
                      + to_csv(inline) + "\\.\n"
                      + "\\copy (select * from libpq_copy_%d order by id) to '%s' with %s\n"
                      % (c, target, options)
                      + "copy (select count(*), sum(id), sum(amount) from libpq_copy_%d)"
                        " to stdout;\n" % c)
            out, _ = psql(script)
            with open(target, newline="") as f:
                got = list(csv.reader(f))
            want = from_file + inline
            if got != want:
                wrong = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w),
                             min(len(got), len(want)))
                raise Fail("client %d: %d rows copied out, expected %d; first difference"
                           " at row %d" % (c, len(got), len(want), wrong + 1))
            summary = "3050\t%d\t%s" % (3050 * 3051 // 2, sum(Decimal(r[2]) for r in want))
            if out.strip() != summary:
                raise Fail("client %d: COPY TO STDOUT gave %r, expected %r"
                           % (c, out.strip(), summary))
        concurrently(client, range(CLIENTS))


def active(query):
    """How many backends run exactly this query right now (seen directly)."""
    return int(direct_value("select count(*) from pg_stat_activity where state = 'active'"
                            " and query = '%s';" % query.replace("'", "''")))


def cancel():
    """psql's cancel (SIGINT: it sends a CancelRequest with the key it got at
    login) of select pg_sleep(30) ends that query with 57014, a concurrent
    client's select pg_sleep(1) finishes normally, and the cancelled
    connection runs a query afterwards."""
    long_query = "select pg_sleep(30)"
    other_query = "select pg_sleep(1), 'other finished'"
    if active(long_query):
        raise Fail("a %r is already running" % long_query)
    # After Ctrl-C, psql (non-interactive) no longer prints query results,
    # so the follow-up query's SQLSTATE and row count show that it ran.
    cancelled = subprocess.Popen(
        [PSQL, "-X", "-A", "-t", "-v", "VERBOSITY=verbose",
         "-c", long_query, "-c", "\\echo cancelled: :SQLSTATE",
         "-c", "select 40 + 2 as after", "-c", "\\echo after: :SQLSTATE :ROW_COUNT"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=tool_env())
    other = None
    try:
        wait_until(lambda: active(long_query) == 1 or cancelled.poll() is not None,
                   "%r runs" % long_query)
        if cancelled.poll() is not None:
            raise Fail("psql ended before its query ran: %s"
                       % first_line(cancelled.communicate()[1]))
        other_started = time.monotonic()
        other = subprocess.Popen([PSQL, "-X", "-A", "-t", "-c", other_query],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=tool_env())
        wait_until(lambda: active(other_query) == 1 or other.poll() is not None,
                   "the other client's %r runs" % other_query)
        cancel_sent = time.monotonic()
        cancelled.send_signal(signal.SIGINT)
        out, err = cancelled.communicate(timeout=budget(10))
        cancel_took = time.monotonic() - cancel_sent
        other_out, other_err = other.communicate(timeout=budget(10))
        other_took = time.monotonic() - other_started
    except subprocess.TimeoutExpired:
        raise Fail("psql did not finish within 10 s after the cancel")
    finally:
        for proc in (cancelled, other):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    if "57014: canceling statement due to user request" not in err:
        raise Fail("the cancelled psql printed %r, expected 57014 canceling statement due"
                   " to user request" % first_line(err))
    if out.splitlines() != ["cancelled: 57014", "after: 00000 1"]:
        raise Fail("the cancelled connection: %r, expected 57014 then a working query"
                   % out.splitlines())
    if cancel_took > 5:
        raise Fail("the cancel took %.1f s" % cancel_took)
    if other.returncode != 0 or other_out.strip() != "|other finished" or other_took < 1:
        raise Fail("the other client's query: exit %d after %.1f s, %r %s" % (
            other.returncode, other_took, other_out.strip(), first_line(other_err)))
    if active(long_query):
        raise Fail("%r still runs on the server after the cancel" % long_query)


def server_error():
    """23505, 42P01, 42601 and 22012 reach psql with their SQLSTATE (psql's
    SQLSTATE variable and the VERBOSITY verbose message) and the connection
    works after each."""
    direct("drop table if exists libpq_err;"
           "create table libpq_err (id int primary key);")
    errors = [
        ("insert into libpq_err values (1), (1);", "23505", "duplicate key value"),
        ("select * from libpq_no_such_table;", "42P01", "does not exist"),
        ("selec 1;", "42601", "syntax error"),
        ("select 1/0;", "22012", "division by zero"),
    ]
    with Session() as s:
        s.expect("insert into libpq_err values (1);")
        for number, (sql, sqlstate, message) in enumerate(errors, 1):
            output = s.expect(sql, sqlstate)
            if not any(line.startswith("ERROR:  %s: " % sqlstate) and message in line
                       for line in output):
                raise Fail("%r: psql printed %r, expected ERROR:  %s: ...%s"
                           % (sql, output[:1], sqlstate, message))
            s.expect("select %d as still_works;" % number, rows=[str(number)])
        s.expect("select count(*) from libpq_err;", rows=["1"])


def occupy_server(pid, locks):
    """Transaction mode: makes a proxy client hold the pool's server
    connection `pid`, so that the next transaction of any other client runs on
    another server connection. Occupiers are psql clients blocked on advisory
    locks 5000, 5001, ... that the direct session `locks` holds; one that lands
    on another server connection is let go once `pid` is taken. Returns the
    occupiers; closing `locks` lets the rest go."""
    occupiers = []
    for k in range(POOL_SIZE):
        lock = 5000 + k
        occupiers.append(subprocess.Popen(
            [PSQL, "-X", "-q", "-c", "select pg_advisory_lock(%d), pg_advisory_unlock(%d)"
             % (lock, lock)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=tool_env()))
        waiter = ("select pid from pg_locks where locktype = 'advisory' and objid = %d"
                  " and not granted;" % lock)
        wait_until(lambda: direct_value(waiter) != "", "an occupier waits for lock %d" % lock)
        if direct_value(waiter) == pid:
            for other in range(5000, lock):
                locks.expect("select pg_advisory_unlock(%d) \\g /dev/null" % other)
            return occupiers
    raise Fail("no proxy client got the server connection %s of the statement" % pid)


def alter_outcomes(port, move=False):
    """The alter_table_reprepare sequence against `port`: pgbench -M prepared
    executes select * from libpq_alter; while it waits at a gate, the table
    gets a column (directly, from another connection) and, with `move`, the
    server connection that prepared the statement is taken by another proxy
    client; then pgbench executes the prepared statement twice more. Returns
    what each execution reported: a column count, or the error that ended
    the run."""
    direct("drop table if exists libpq_alter;"
           "create table libpq_alter (a int);"
           "insert into libpq_alter values (1);")
    # The server connection of pgbench's first execution: pool connections
    # may still show the query from an earlier run, hence the start time.
    started = direct_value("select clock_timestamp();")
    prepared_on = ("select pid from pg_stat_activity where state = 'idle'"
                   " and query like 'select * from libpq_alter%%' and query_start > '%s';"
                   % started)
    occupiers = []
    with tempfile.TemporaryDirectory(prefix="libpq-alter-") as tmp, \
            Session(port=DIRECT_PORT) as locks:
        gate = os.path.join(tmp, "gate")
        locks.expect("select pg_advisory_lock(5000 + k) from generate_series(0, %d) k"
                     " \\g /dev/null" % (POOL_SIZE - 1))
        bench = subprocess.Popen(
            [PGBENCH, "-n", "-M", "prepared", "-c", "1", "-t", "3", "-D", "n=0",
             "-D", "gate=" + gate, "-f", os.path.join(SCRIPTS, "alter_table.sql")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=tool_env(port))
        try:
            wait_until(lambda: direct_value(prepared_on) != "" or bench.poll() is not None,
                       "pgbench's first execution is done")
            direct("alter table libpq_alter add column b int default 7;")
            if move:
                occupiers = occupy_server(direct_value(prepared_on), locks)
            open(gate, "w").close()
            out, err = bench.communicate(timeout=budget(15))
        except subprocess.TimeoutExpired:
            raise Fail("pgbench (port %s) did not finish within 15 s" % port)
        finally:
            if bench.poll() is None:
                bench.kill()
                bench.wait()
    for occupier in occupiers:
        occupier.wait(timeout=budget(10))
    outcomes = []
    for line in err.splitlines():
        columns = re.search(r"debug\(.*\): int (\d+)", line)
        error = re.search(r"aborted in command \d+ query \d+: (ERROR: .*)", line)
        if columns:
            outcomes.append("%s column(s)" % columns.group(1))
        elif error:
            outcomes.append(error.group(1))
    processed = re.search(r"number of transactions actually processed: (\S+)", out)
    outcomes.append("processed %s" % (processed.group(1) if processed else "?"))
    return outcomes


def alter_table_reprepare():
    """The same sequence through the proxy and directly: same outcomes. In
    transaction mode also with the executions after the ALTER moved to a
    server connection that has not prepared the statement (in session mode,
    and when PGPORT is PostgreSQL itself, a client keeps its connection)."""
    want = alter_outcomes(DIRECT_PORT)
    got = alter_outcomes(os.environ["PGPORT"])
    if got != want:
        raise Fail("through the proxy %s; directly %s" % (got, want))
    if POOL_MODE == "transaction" and os.environ["PGPORT"] != DIRECT_PORT:
        got = alter_outcomes(os.environ["PGPORT"], move=True)
        if got != want:
            raise Fail("moved to another server connection after the ALTER, through the"
                       " proxy %s; directly %s" % (got, want))


SCENARIOS = [
    ("simple_query", simple_query),
    ("prepared_default", prepared_default),
    ("prepared_forced", prepared_forced),
    ("same_name_different_text", same_name_different_text),
    ("transactions", transactions),
    ("error_then_rollback", error_then_rollback),
    ("savepoints", savepoints),
    ("startup_params", startup_params),
    ("copy", copy),
    ("cancel", cancel),
    ("server_error", server_error),
    ("alter_table_reprepare", alter_table_reprepare),
]


def main():
    selected = [s for s in os.environ.get("SCENARIOS", "").split(",") if s]
    all_passed = True
    for name, scenario in SCENARIOS:
        if selected and name not in selected:
            continue
        started = time.monotonic()
        try:
            scenario()
            verdict = "PASS"
        except Exception as e:  # a scenario's failure must not stop the others
            reason = str(e) if isinstance(e, Fail) else "%s: %s" % (type(e).__name__, e)
            verdict = "FAIL " + " ".join(reason.split())
            all_passed = False
        print("RESULT %s %s" % (name, verdict), flush=True)
        print("  (%s: %.1f s)" % (name, time.monotonic() - started), file=sys.stderr,
              flush=True)
    return 0 if all_passed else 1


if __name__ == "__main__":
    sys.exit(main())
