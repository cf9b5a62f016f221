"""Driver matrix: psycopg2 (`psycopg2-binary`, pinned in requirements.txt).

The contract is tests/drivers/README.md. psycopg2 speaks only the simple
query protocol: it interpolates parameters on the client and has no
protocol-level prepare. Its prepared statements are therefore SQL `PREPARE`
/ `EXECUTE` / `DEALLOCATE`, and those live in the server connection: through
a pooler in transaction mode they last one transaction (a documented limit),
so the prepared scenarios PREPARE, EXECUTE and DEALLOCATE inside one
transaction. `alter_table_reprepare` runs the sequence across transactions
(a statement prepared once, run before and after the ALTER) only in session
mode, and the per-transaction form in both modes.
"""

from __future__ import annotations

import io
import threading
import time

import psycopg2
import psycopg2.errors
import psycopg2.extensions

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

T = "m_pg2"  # prefix of every object this program creates


class connection:
    """`with connection(...) as c`: connect, and close at the end (psycopg2's
    own `with conn` only ends a transaction)."""

    def __init__(self, port: int | None = None, autocommit: bool = True, **kw) -> None:
        self.port, self.autocommit, self.kw, self.conn = port, autocommit, kw, None

    def __enter__(self):
        self.conn = psycopg2.connect(
            host=ENV.host,
            port=self.port or ENV.port,
            user=ENV.user,
            password=ENV.password,
            dbname=ENV.database,
            connect_timeout=20,
            **self.kw,
        )
        self.conn.autocommit = self.autocommit
        return self.conn

    def __exit__(self, *exc) -> None:
        if self.conn is not None:
            self.conn.close()


def setup(*sql: str) -> None:
    with connection() as c, c.cursor() as cur:
        for s in sql:
            cur.execute(s)


def one(conn, sql: str, params=None):
    with conn.cursor() as cur:
        cur.execute(sql, params)
        row = cur.fetchone()
    check(row is not None, f"{sql!r} returned no row")
    return row[0] if len(row) == 1 else row


def run(conn, sql: str, params=None) -> str:
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.statusmessage


def expect_error(conn, state: str, sql: str, params=None) -> None:
    try:
        run(conn, sql, params)
    except psycopg2.Error as exc:
        eq(sqlstate(exc), state, f"SQLSTATE of {sql!r}")
        return
    raise Fail(f"{sql!r} succeeded, want SQLSTATE {state}")


# --- scenarios --------------------------------------------------------------


def simple_query() -> None:
    def client(i: int) -> None:
        with connection() as c:
            for k in range(50):
                if k % 2:
                    eq(one(c, "select %s * 3, %s", (k, f"c{i}-{k}")), (k * 3, f"c{i}-{k}"), f"query {k}")
                else:
                    eq(one(c, f"select {i} + {k}, 'c{i}'"), (i + k, f"c{i}"), f"query {k}")

    run_clients(ENV.clients, client)


def prepared_setup() -> None:
    setup(
        f"drop table if exists {T}_prep",
        f"create table {T}_prep (id int primary key, v text)",
        f"insert into {T}_prep select g, 'v' || g from generate_series(0, 9) g",
    )


def prepared_run(c, i: int, k: int, names: list[str]) -> None:
    eq(one(c, f"execute {names[0]}(%s)", (k + i,)), k + i + 1, "statement 1")
    eq(one(c, f"execute {names[1]}(%s, %s)", (f"c{i}", str(k))), f"c{i}-{k}", "statement 2")
    eq(one(c, f"execute {names[2]}(%s)", (k % 10,)), f"v{k % 10}", "statement 3")


def prepared_default() -> None:
    # psycopg2's default: not autocommit, the first statement opens the
    # transaction; PREPARE infers the parameter types. Two transactions of 13
    # executions each, every one preparing and deallocating its statements.
    prepared_setup()

    def client(i: int) -> None:
        names = [f"{T}_d{j}_c{i}" for j in range(3)]
        with connection(autocommit=False) as c:
            for tx in range(2):
                run(c, f"prepare {names[0]} as select $1::int + 1")
                run(c, f"prepare {names[1]} as select $1::text || '-' || $2::text")
                run(c, f"prepare {names[2]} as select v from {T}_prep where id = $1")
                for k in range(13):
                    prepared_run(c, i, 13 * tx + k, names)
                for n in names:
                    run(c, f"deallocate {n}")
                c.commit()

    run_clients(ENV.clients, client)


def prepared_forced() -> None:
    # Explicit parameter types and an explicit BEGIN ... COMMIT in
    # autocommit mode: 25 executions of each statement in one transaction.
    prepared_setup()

    def client(i: int) -> None:
        names = [f"{T}_f{j}_c{i}" for j in range(3)]
        with connection() as c:
            run(c, "begin")
            run(c, f"prepare {names[0]}(int) as select $1 + 1")
            run(c, f"prepare {names[1]}(text, text) as select $1 || '-' || $2")
            run(c, f"prepare {names[2]}(int) as select v from {T}_prep where id = $1")
            for k in range(25):
                prepared_run(c, i, k, names)
            eq(one(c, "select count(*) from pg_prepared_statements where name like %s", (f"{T}_f%_c{i}",)), 3,
               "pg_prepared_statements inside the transaction")
            for n in names:
                run(c, f"deallocate {n}")
            run(c, "commit")

    run_clients(ENV.clients, client)


def same_name_different_text() -> None:
    # Both connections PREPARE the same three names for different text, in
    # transactions open at the same time, interleaving their EXECUTEs.
    qa = ["select $1::int + 1000", "select $1::text || '-a'", "select $1::int * 7"]
    qb = ["select $1::text || '-b'", "select $1::int - 5", "select 'b' || $1::text"]
    want_a = [lambda r: r + 1000, lambda r: f"{r}-a", lambda r: r * 7]
    want_b = [lambda r: f"{r}-b", lambda r: r - 5, lambda r: f"b{r}"]
    names = [f"{T}_same_{j}" for j in range(3)]
    with connection() as a, connection() as b:
        for rnd in range(3):
            for conn, qs in ((a, qa), (b, qb)):
                run(conn, "begin")
                for n, q in zip(names, qs):
                    run(conn, f"prepare {n} as {q}")
            for r in range(5):
                for j in range(3):
                    pa = r if j != 1 else str(r)
                    pb = r if j == 1 else str(r)
                    eq(one(a, f"execute {names[j]}(%s)", (pa,)), want_a[j](pa), f"A round {rnd}.{r} statement {j}")
                    eq(one(b, f"execute {names[j]}(%s)", (pb,)), want_b[j](pb), f"B round {rnd}.{r} statement {j}")
            for conn in (a, b):
                for n in names:
                    run(conn, f"deallocate {n}")
                run(conn, "commit")


def transactions() -> None:
    setup(f"drop table if exists {T}_tx", f"create table {T}_tx (id int primary key)")
    ids = f"select coalesce(array_agg(id order by id), '{{}}') from {T}_tx"
    # A: psycopg2's default (not autocommit); B: autocommit.
    with connection(autocommit=False) as a, connection() as b:
        run(a, f"insert into {T}_tx values (%s)", (1,))
        eq(one(b, ids), [], "B sees A's uncommitted row")
        a.commit()
        eq(one(b, ids), [1], "B after A's commit")
        run(a, f"insert into {T}_tx values (%s)", (2,))
        eq(one(a, ids), [1, 2], "A inside its transaction")
        a.rollback()
        eq(one(b, ids), [1], "B after A's rollback")
        eq(one(a, ids), [1], "A after its rollback")
        a.commit()
        with a:  # psycopg2: commits at the end of the block
            run(a, f"insert into {T}_tx values (%s)", (3,))
        for k in range(10):
            eq(one(a, "select %s", (k,)), k, "more work on A")
        a.commit()
        eq(one(b, ids), [1, 3], "B at the end")


def error_then_rollback() -> None:
    # psycopg2 has no named statements: its default is the simple protocol.
    with connection() as c:
        for r in range(3):
            run(c, "begin")
            expect_error(c, "22012", "select 1/0")
            expect_error(c, "25P02", "select 1")
            eq(run(c, "rollback"), "ROLLBACK", f"round {r}: rollback")
            eq(one(c, "select 1 as x"), 1, f"round {r}: select 1 as x")
    # The same with psycopg2's own transaction handling (not autocommit).
    with connection(autocommit=False) as c:
        for r in range(3):
            expect_error(c, "22012", "select 1/0")
            expect_error(c, "25P02", "select 1")
            c.rollback()
            eq(one(c, "select 1 as x"), 1, f"round {r}: select 1 as x after rollback()")
            c.commit()


def savepoints() -> None:
    setup(f"drop table if exists {T}_sp", f"create table {T}_sp (id int primary key)")
    ids = f"select coalesce(array_agg(id order by id), '{{}}') from {T}_sp"
    ins = f"insert into {T}_sp values (%s)"
    with connection(autocommit=False) as c, connection() as other:
        run(c, ins, (1,))
        run(c, "savepoint s1")
        run(c, ins, (2,))
        expect_error(c, "23505", ins, (1,))
        run(c, "rollback to savepoint s1")
        eq(one(c, ids), [1], "after rollback to savepoint")
        run(c, ins, (3,))
        run(c, "savepoint s2")
        run(c, ins, (4,))
        run(c, "release savepoint s2")
        eq(one(other, ids), [], "another connection before commit")
        c.commit()
        eq(one(other, ids), [1, 3, 4], "rows after commit")
        eq(one(c, "select 5"), 5, "more work afterwards")
        c.commit()


def startup_params() -> None:
    n = ENV.clients
    setup(*client_schemas_sql(T, n))

    def client(i: int) -> None:
        app, tz, path = f"{T}_app_{i}", timezone_of(i), f"{T}_sch_{i},public"
        options = f"-c TimeZone={tz} -c search_path={path} -c m.client={i}"
        with connection(autocommit=False, application_name=app, options=options) as c:
            for k in range(20):
                row = one(
                    c,
                    "select current_setting('application_name'), current_setting('TimeZone'),"
                    " current_setting('search_path'), current_setting('m.client'),"
                    " (select v from marker), '2020-06-01 12:00:00+00'::timestamptz::text,"
                    " ('2020-06-01 12:00:00+00'::timestamptz at time zone %s)::text",
                    (tz,),
                )
                eq(row[:5], (app, tz, path, str(i), i), f"settings in transaction {k}")
                check(row[5].startswith(row[6]), f"timestamptz rendered {row[5]!r}, want {row[6]} in {tz}")
                eq(c.get_parameter_status("application_name"), app, "application_name ParameterStatus")
                eq(c.get_parameter_status("TimeZone"), tz, "TimeZone ParameterStatus")
                c.commit()
                time.sleep(0.005)

    run_clients(n, client)


def copy_escape(v: str | None) -> str:
    if v is None:
        return "\\N"
    return v.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def copy_unescape(v: str) -> str | None:
    if v == "\\N":
        return None
    out, it = [], iter(v)
    for ch in it:
        if ch == "\\":
            nxt = next(it)
            out.append({"t": "\t", "n": "\n", "r": "\r", "\\": "\\"}.get(nxt, nxt))
        else:
            out.append(ch)
    return "".join(out)


def copy() -> None:
    setup(f"drop table if exists {T}_copy", f"create table {T}_copy (client int, n int, s text)")

    def client(i: int) -> None:
        want = [(n, copy_text(i, n)) for n in range(COPY_ROWS)]
        data = "".join(f"{i}\t{n}\t{copy_escape(s)}\n" for n, s in want)
        with connection() as c, c.cursor() as cur:
            cur.copy_expert(f"copy {T}_copy (client, n, s) from stdin", io.StringIO(data))
            eq(cur.rowcount, COPY_ROWS, "rows copied in")
            eq(one(c, f"select count(*) from {T}_copy where client = %s", (i,)), COPY_ROWS, "rows in table")
            out = io.StringIO()
            cur.copy_expert(f"copy (select n, s from {T}_copy where client = {i} order by n) to stdout", out)
            lines = out.getvalue().split("\n")
            eq(lines[-1], "", "end of the COPY output")
            got = [(int(n), copy_unescape(s)) for n, s in (line.split("\t") for line in lines[:-1])]
            eq(len(got), COPY_ROWS, "rows copied out")
            for g, w in zip(got, want):
                eq(g, w, "row copied out")
            eq(one(c, "select 1"), 1, "after copy")

    run_clients(ENV.clients, client)


def cancel() -> None:
    tag = f"{T}_cancel"
    long_q = f"select pg_sleep(30) as {tag}_a"
    other_q = f"select pg_sleep(2)::text, 'b' as {tag}_b"

    def active(mon, marker: str):
        row = one(
            mon,
            "select coalesce((select pid from pg_stat_activity where state = 'active'"
            " and query like %s and pid <> pg_backend_pid() limit 1), 0)",
            (f"%{marker}%",),
        )
        return row or None

    with connection(ENV.direct_port) as mon, connection() as a, connection() as b:
        res: dict[str, object] = {}

        def run_a() -> None:
            t0 = time.monotonic()
            try:
                run(a, long_q)
                res["a"] = "completed"
            except psycopg2.Error as exc:
                res["a"] = sqlstate(exc)
            res["a_took"] = time.monotonic() - t0

        def run_b() -> None:
            try:
                res["b"] = one(b, other_q)
            except psycopg2.Error as exc:
                res["b"] = f"error {sqlstate(exc)}: {exc}"

        ta = threading.Thread(target=run_a, daemon=True)
        ta.start()
        pid = wait_until(lambda: active(mon, f"{tag}_a"), 10, "the long query never became active")
        tb = threading.Thread(target=run_b, daemon=True)
        tb.start()
        wait_until(lambda: active(mon, f"{tag}_b"), 10, "the concurrent query never became active")
        a.cancel()
        ta.join(10)
        check(not ta.is_alive(), "the cancelled query did not end within 10 s")
        eq(res.get("a"), "57014", "outcome of the cancelled query")
        check(res["a_took"] < 10, f"the cancelled query took {res['a_took']:.1f} s")
        tb.join(10)
        check(not tb.is_alive(), "the concurrent query did not end")
        eq(res.get("b"), ("", "b"), "the concurrent query")
        check(active(mon, f"{tag}_a") is None, "the long query is still active on the server")
        eq(one(mon, "select count(*) from pg_stat_activity where pid = %s", (pid,)), 1,
           "the cancelled server connection still exists")
        for k in range(5):
            eq(one(a, "select %s", (k,)), k, "the cancelled connection afterwards")


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
        ("22012", "select 1/%s", (0,)),
    ]
    with connection() as c:
        for state, sql, params in cases:
            for _ in range(2):
                expect_error(c, state, sql, params)
            eq(one(c, "select 1"), 1, f"after {state}")
        eq(one(c, f"select count(*) from {T}_err"), 1, "rows at the end")
    # And inside a transaction: the error aborts it until rollback().
    with connection(autocommit=False) as c:
        for state, sql, params in cases:
            expect_error(c, state, sql, params)
            expect_error(c, "25P02", "select 1")
            c.rollback()
            eq(one(c, "select 1"), 1, f"after {state} and rollback()")
            c.commit()


def alter_sequence(port: int, table: str) -> dict[str, list[str]]:
    """prepare `select * from t`, run it, ALTER TABLE from another
    connection, run it twice more; the outcomes as psycopg2 reports them.
    "per_transaction": each run PREPAREs, EXECUTEs and DEALLOCATEs in one
    transaction; "across_transactions" (session mode only): one PREPARE in
    autocommit, run before and after the ALTER."""
    outcomes: dict[str, list[str]] = {}
    ways = ["per_transaction"] + (["across_transactions"] if ENV.session_mode else [])
    with connection(port) as other:
        for way in ways:
            t = f"{table}_{way}"
            run(other, f"drop table if exists {t}; create table {t} (a int); insert into {t} values (1)")
            got: list[str] = []
            name = f"{T}_alter_stmt"
            with connection(port) as c:

                def execute() -> None:
                    try:
                        with c.cursor() as cur:
                            if way == "per_transaction":
                                cur.execute("begin")
                                cur.execute(f"prepare {name} as select * from {t}")
                            cur.execute(f"execute {name}")
                            got.append(f"{len(cur.description)} columns, {cur.fetchall()}")
                            if way == "per_transaction":
                                cur.execute(f"deallocate {name}")
                                cur.execute("commit")
                    except psycopg2.Error as exc:
                        got.append(f"SQLSTATE {sqlstate(exc)}")
                        if c.get_transaction_status() != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                            run(c, "rollback")
                            if way == "per_transaction":
                                run(c, f"deallocate {name}")

                if way == "across_transactions":
                    run(c, f"prepare {name} as select * from {t}")
                execute()
                run(other, f"alter table {t} add column b int default 2")
                execute()
                execute()
            run(other, f"drop table {t}")
            outcomes[way] = got
    return outcomes


def alter_table_reprepare() -> None:
    want = alter_sequence(ENV.direct_port, f"{T}_alter_direct")
    got = alter_sequence(ENV.port, f"{T}_alter")
    log(f"alter_table_reprepare: directly {want}, through the proxy {got}")
    eq(got, want, "outcomes through the proxy vs. directly")


if __name__ == "__main__":
    run_sync("psycopg2", {name: globals()[name] for name in (
        "simple_query", "prepared_default", "prepared_forced", "same_name_different_text",
        "transactions", "error_then_rollback", "savepoints", "startup_params", "copy",
        "cancel", "server_error", "alter_table_reprepare",
    )})
