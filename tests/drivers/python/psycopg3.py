"""Driver matrix: psycopg 3 (`psycopg[binary]`, pinned in requirements.txt).

The contract is tests/drivers/README.md. psycopg 3 uses the extended
protocol: unnamed statements by default, named statements `_pg3_N` (N counts
per connection) once a query ran `prepare_threshold` times, or at once with
`execute(..., prepare=True)`. After a ROLLBACK (or DROP/ALTER) it forgets its
statements and sends `DEALLOCATE ALL`. It follows the server's `TimeZone`
(ParameterStatus) when it decodes timestamptz values.
"""

from __future__ import annotations

import threading
import time
from zoneinfo import ZoneInfo

import psycopg
from psycopg import errors

from matrix import (
    COPY_ROWS,
    client_schemas_sql,
    ENV,
    Fail,
    check,
    copy_text,
    eq,
    log,
    run_clients,
    run_sync,
    sqlstate,
    timezone_of,
    wait_until,
)

T = "m_pg3"  # prefix of every object this program creates


def connect(port: int | None = None, **kw) -> psycopg.Connection:
    kw.setdefault("autocommit", True)
    return psycopg.connect(
        host=ENV.host,
        port=port or ENV.port,
        user=ENV.user,
        password=ENV.password,
        dbname=ENV.database,
        connect_timeout=20,
        **kw,
    )


def direct() -> psycopg.Connection:
    """A connection straight to PostgreSQL (for pg_stat_activity)."""
    return connect(ENV.direct_port)


def setup(*sql: str) -> None:
    with connect() as c:
        for s in sql:
            c.execute(s)


def prepared_names(conn: psycopg.Connection) -> list[bytes] | None:
    """The statement names psycopg keeps for `conn` (its private state; None
    if a future psycopg moved it)."""
    names = getattr(getattr(conn, "_prepared", None), "_names", None)
    return list(names.values()) if names is not None else None


def expect_error(conn: psycopg.Connection, state: str, sql: str, params=None, **kw) -> None:
    try:
        conn.execute(sql, params, **kw)
    except psycopg.Error as exc:
        eq(sqlstate(exc), state, f"SQLSTATE of {sql!r}")
        return
    raise Fail(f"{sql!r} succeeded, want SQLSTATE {state}")


def one(conn: psycopg.Connection, sql: str, params=None, **kw):
    row = conn.execute(sql, params, **kw).fetchone()
    check(row is not None, f"{sql!r} returned no row")
    return row[0] if len(row) == 1 else row


# --- scenarios --------------------------------------------------------------


def simple_query() -> None:
    def client(i: int) -> None:
        # prepare_threshold=None: psycopg never names a statement.
        with connect(prepare_threshold=None) as c:
            client_cur = psycopg.ClientCursor(c)  # client-side binding, simple protocol
            for k in range(50):
                if k % 2:
                    row = client_cur.execute("select %s::int * 3, %s::text", (k, f"c{i}-{k}")).fetchone()
                    eq(row, (k * 3, f"c{i}-{k}"), f"simple query {k}")
                else:
                    row = c.execute("select %s::int + %s::int, %s::text", (i, k, f"c{i}")).fetchone()
                    eq(row, (i + k, f"c{i}"), f"unnamed extended query {k}")
            eq(prepared_names(c) or [], [], "statements psycopg named")

    run_clients(ENV.clients, client)


PREP_QUERIES = (
    "select %s::int + 1",
    "select %s::text || '-' || %s::text",
    f"select v from {T}_prep where id = %s",
)


def prepared_run(i: int, conn: psycopg.Connection, **kw) -> None:
    for k in range(25):
        eq(one(conn, PREP_QUERIES[0], (k + i,), **kw), k + i + 1, "statement 1")
        eq(one(conn, PREP_QUERIES[1], (f"c{i}", str(k)), **kw), f"c{i}-{k}", "statement 2")
        eq(one(conn, PREP_QUERIES[2], (k % 10,), **kw), f"v{k % 10}", "statement 3")
    names = prepared_names(conn)
    if names is not None:
        eq(len(names), 3, f"statements psycopg named ({names})")


def prepared_setup() -> None:
    setup(
        f"drop table if exists {T}_prep",
        f"create table {T}_prep (id int primary key, v text)",
        f"insert into {T}_prep select g, 'v' || g from generate_series(0, 9) g",
    )


def prepared_default() -> None:
    prepared_setup()

    def client(i: int) -> None:
        # A low threshold: the first execution is unnamed, the next ones named.
        with connect(prepare_threshold=1) as c:
            prepared_run(i, c)

    run_clients(ENV.clients, client)


def prepared_forced() -> None:
    prepared_setup()

    def client(i: int) -> None:
        with connect() as c:
            prepared_run(i, c, prepare=True)

    run_clients(ENV.clients, client)


def same_name_different_text() -> None:
    # Each connection numbers its statements from _pg3_0: the same names,
    # different text (and result types).
    qa = ["select %s::int + 1000", "select %s::text || '-a'", "select %s::int * 7"]
    qb = ["select %s::text || '-b'", "select %s::int - 5", "select 'b' || %s::text"]
    want_a = [lambda r: r + 1000, lambda r: f"{r}-a", lambda r: r * 7]
    want_b = [lambda r: f"{r}-b", lambda r: r - 5, lambda r: f"b{r}"]
    with connect() as a, connect() as b:
        for r in range(10):
            for j in range(3):
                pa = r if j != 1 else str(r)
                pb = r if j == 1 else str(r)
                eq(one(a, qa[j], (pa,), prepare=True), want_a[j](pa), f"A round {r} statement {j}")
                eq(one(b, qb[j], (pb,), prepare=True), want_b[j](pb), f"B round {r} statement {j}")
        na, nb = prepared_names(a), prepared_names(b)
        if na is not None and nb is not None:
            eq(sorted(na), sorted(nb), "statement names of A and B")
            eq(len(na), 3, "statements named")


def transactions() -> None:
    setup(f"drop table if exists {T}_tx", f"create table {T}_tx (id int primary key)")
    ids = f"select coalesce(array_agg(id order by id), '{{}}') from {T}_tx"
    # A: psycopg's default (not autocommit: the first statement opens a
    # transaction); B: autocommit.
    with connect(autocommit=False) as a, connect() as b:
        a.execute(f"insert into {T}_tx values (1)")
        eq(one(b, ids), [], "B sees A's uncommitted row")
        a.commit()
        eq(one(b, ids), [1], "B after A's commit")
        a.execute(f"insert into {T}_tx values (2)")
        eq(one(a, ids), [1, 2], "A inside its transaction")
        a.rollback()
        eq(one(b, ids), [1], "B after A's rollback")
        eq(one(a, ids), [1], "A after its rollback")
        a.commit()
        with a.transaction():
            a.execute(f"insert into {T}_tx values (3)")
        for k in range(10):
            eq(one(a, "select %s::int", (k,)), k, "more work on A")
        a.commit()
        eq(one(b, ids), [1, 3], "B at the end")


class Steer:
    """Transaction mode: picks the server connection a client's next
    transaction gets, by holding every other pooled one in an open
    transaction of a blocker connection (the pool hands out its only idle
    one). Lets a scenario run a statement the driver already named on one
    server connection inside a transaction on another."""

    def __init__(self) -> None:
        self.held: dict[int, psycopg.Connection] = {}

    def hold_all(self) -> list[int]:
        while len(self.held) < ENV.pool_size:
            b = connect()
            b.execute("begin")
            self.held[one(b, "select pg_backend_pid()")] = b
        return sorted(self.held)

    def free(self, pid: int) -> None:
        b = self.held.pop(pid)
        b.execute("commit")
        b.close()

    def release_all(self) -> None:
        for pid in list(self.held):
            self.free(pid)


def aborted_backend(mon: psycopg.Connection) -> list[int]:
    return [r[0] for r in mon.execute(
        "select pid from pg_stat_activity where state = 'idle in transaction (aborted)'"
    )]


def error_then_rollback() -> None:
    # prepare_threshold=0: every statement is named (_pg3_N) from its first
    # run; `select 1` is named before each round, so inside the failed
    # transaction psycopg only binds it. In transaction mode each round runs
    # `select 1` on one server connection and the failed transaction on the
    # other.
    steer = Steer() if not ENV.session_mode and ENV.port != ENV.direct_port else None
    with connect(prepare_threshold=0) as c, direct() as mon:
        try:
            for r in range(3):
                cold = None
                if steer:
                    pids = steer.hold_all()
                    warm, cold = pids[r % 2], pids[(r + 1) % 2]
                    steer.free(warm)
                eq(one(c, "select 1"), 1, f"round {r}: select 1 before the transaction")
                if steer:
                    steer.hold_all()
                    steer.free(cold)
                c.execute("begin")
                expect_error(c, "22012", "select 1/0")
                if cold is not None and aborted_backend(mon) != [cold]:
                    log(f"error_then_rollback: round {r} did not land on server pid {cold} ({aborted_backend(mon)})")
                expect_error(c, "25P02", "select 1")
                c.execute("rollback")
                if steer:
                    steer.release_all()
                eq(one(c, "select 1 as x"), 1, f"round {r}: select 1 as x")
        finally:
            if steer:
                steer.release_all()
        eq(one(c, "select 1"), 1, "select 1 outside a transaction")
        eq(one(c, "select 1/1"), 1, "select 1/1 outside a transaction")


def savepoints() -> None:
    setup(f"drop table if exists {T}_sp", f"create table {T}_sp (id int primary key)")
    ids = f"select coalesce(array_agg(id order by id), '{{}}') from {T}_sp"
    with connect(prepare_threshold=0) as c, connect() as other:
        with c.transaction():
            c.execute(f"insert into {T}_sp values (1)")
            try:
                with c.transaction():  # a savepoint
                    c.execute(f"insert into {T}_sp values (2)")
                    c.execute(f"insert into {T}_sp values (1)")
            except errors.UniqueViolation:
                pass
            else:
                raise Fail("duplicate key inside the savepoint succeeded")
            eq(one(c, ids), [1], "after rollback to savepoint")
            c.execute(f"insert into {T}_sp values (3)")
            with c.transaction():
                c.execute(f"insert into {T}_sp values (4)")
            eq(one(other, ids), [], "another connection before commit")
        eq(one(other, ids), [1, 3, 4], "rows after commit")
        eq(one(c, "select 5"), 5, "more work afterwards")


def startup_params() -> None:
    n = ENV.clients
    setup(*client_schemas_sql(T, n))

    def client(i: int) -> None:
        app, tz, path = f"{T}_app_{i}", timezone_of(i), f"{T}_sch_{i},public"
        options = f"-c TimeZone={tz} -c search_path={path} -c m.client={i}"
        with connect(application_name=app, options=options) as c:
            for k in range(20):
                with c.transaction():
                    row = c.execute(
                        "select current_setting('application_name'), current_setting('TimeZone'),"
                        " current_setting('search_path'), current_setting('m.client'),"
                        " (select v from marker), '2020-06-01 12:00:00+00'::timestamptz"
                    ).fetchone()
                    eq(row[:5], (app, tz, path, str(i), i), f"settings in transaction {k}")
                    eq(row[5].tzinfo, ZoneInfo(tz), f"timestamptz zone in transaction {k}")
                    eq(c.info.parameter_status("application_name"), app, "application_name ParameterStatus")
                    eq(c.info.timezone, ZoneInfo(tz), "TimeZone ParameterStatus")
                time.sleep(0.005)

    run_clients(n, client)


def copy() -> None:
    setup(f"drop table if exists {T}_copy", f"create table {T}_copy (client int, n int, s text)")

    def client(i: int) -> None:
        want = [(n, copy_text(i, n)) for n in range(COPY_ROWS)]
        with connect() as c:
            cur = c.cursor()
            with cur.copy(f"copy {T}_copy (client, n, s) from stdin") as cp:
                for n, s in want:
                    cp.write_row((i, n, s))
            eq(cur.rowcount, COPY_ROWS, "rows copied in")
            eq(one(c, f"select count(*) from {T}_copy where client = %s", (i,)), COPY_ROWS, "rows in table")
            got = []
            with cur.copy(f"copy (select n, s from {T}_copy where client = {i} order by n) to stdout") as cp:
                cp.set_types(["int4", "text"])
                got = list(cp.rows())
            eq(len(got), COPY_ROWS, "rows copied out")
            for g, w in zip(got, want):
                eq(g, w, "row copied out")
            eq(one(c, "select 1"), 1, "after copy")

    run_clients(ENV.clients, client)


def cancel() -> None:
    tag = f"{T}_cancel"
    long_q = f"select pg_sleep(30) as {tag}_a"
    other_q = f"select pg_sleep(2), 'b' as {tag}_b"

    def active(mon: psycopg.Connection, marker: str):
        row = mon.execute(
            "select pid from pg_stat_activity where state = 'active' and query like %s"
            " and pid <> pg_backend_pid()",
            (f"%{marker}%",),
        ).fetchone()
        return row[0] if row else None

    with direct() as mon, connect() as a, connect() as b:
        res: dict[str, object] = {}

        def run_a() -> None:
            t0 = time.monotonic()
            try:
                a.execute(long_q)
                res["a"] = "completed"
            except psycopg.Error as exc:
                res["a"] = sqlstate(exc)
            res["a_took"] = time.monotonic() - t0

        def run_b() -> None:
            try:
                res["b"] = b.execute(other_q).fetchone()
            except psycopg.Error as exc:
                res["b"] = f"error {sqlstate(exc)}: {exc}"

        ta = threading.Thread(target=run_a, daemon=True)
        ta.start()
        pid = wait_until(lambda: active(mon, f"{tag}_a"), 10, "the long query never became active")
        tb = threading.Thread(target=run_b, daemon=True)
        tb.start()
        wait_until(lambda: active(mon, f"{tag}_b"), 10, "the concurrent query never became active")
        if hasattr(a, "cancel_safe"):
            a.cancel_safe(timeout=10)
        else:
            a.cancel()
        ta.join(10)
        check(not ta.is_alive(), "the cancelled query did not end within 10 s")
        eq(res.get("a"), "57014", "outcome of the cancelled query")
        check(res["a_took"] < 10, f"the cancelled query took {res['a_took']:.1f} s")
        tb.join(10)
        check(not tb.is_alive(), "the concurrent query did not end")
        eq(res.get("b"), ("", "b"), "the concurrent query")
        check(active(mon, f"{tag}_a") is None, "the long query is still active on the server")
        still = mon.execute("select count(*) from pg_stat_activity where pid = %s", (pid,)).fetchone()[0]
        eq(still, 1, "the cancelled server connection still exists")
        for k in range(5):
            eq(one(a, "select %s::int", (k,)), k, "the cancelled connection afterwards")


def server_error() -> None:
    setup(
        f"drop table if exists {T}_err",
        f"create table {T}_err (id int primary key)",
        f"insert into {T}_err values (1)",
    )
    cases = [
        ("23505", f"insert into {T}_err values (%s)", (1,)),
        ("42P01", f"select * from {T}_no_such_table", None),
        ("42601", "selec 1", None),
        ("22012", "select 1/%s::int", (0,)),
    ]
    # Unnamed statements (the default for a first run) and named ones.
    for threshold in (None, 0):
        with connect(prepare_threshold=threshold) as c:
            for state, sql, params in cases:
                for _ in range(2):
                    expect_error(c, state, sql, params)
                eq(one(c, "select 1"), 1, f"after {state}")
            eq(one(c, f"select count(*) from {T}_err"), 1, "rows at the end")


def alter_sequence(port: int, table: str) -> list[str]:
    """prepare `select * from t`, run it, ALTER TABLE from another
    connection, run it twice more; the outcomes as psycopg reports them."""
    with connect(port) as other:
        other.execute(f"drop table if exists {table}")
        other.execute(f"create table {table} (a int)")
        other.execute(f"insert into {table} values (1)")
        outcomes = []
        with connect(port) as c:

            def run() -> None:
                try:
                    cur = c.execute(f"select * from {table}", prepare=True)
                    outcomes.append(f"{len(cur.description)} columns, {cur.fetchall()}")
                except psycopg.Error as exc:
                    outcomes.append(f"SQLSTATE {sqlstate(exc)}")

            run()
            other.execute(f"alter table {table} add column b int default 2")
            run()
            run()
        other.execute(f"drop table {table}")
    return outcomes


def alter_table_reprepare() -> None:
    want = alter_sequence(ENV.direct_port, f"{T}_alter_direct")
    got = alter_sequence(ENV.port, f"{T}_alter")
    log(f"alter_table_reprepare: directly {want}, through the proxy {got}")
    eq(got, want, "outcomes through the proxy vs. directly")


if __name__ == "__main__":
    run_sync("psycopg3", {name: globals()[name] for name in (
        "simple_query", "prepared_default", "prepared_forced", "same_name_different_text",
        "transactions", "error_then_rollback", "savepoints", "startup_params", "copy",
        "cancel", "server_error", "alter_table_reprepare",
    )})
