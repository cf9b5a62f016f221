"""Driver matrix: asyncpg (pinned in requirements.txt).

The contract is tests/drivers/README.md. asyncpg runs every query with
arguments (and every fetch) as a prepared statement. With its statement cache
on (the default, kept on here: that is the point of a pooler that supports
prepared statements) it names them `__asyncpg_stmt_N__` (N counts per
process), parses each once per connection and then only binds and executes
it; `prepare()` names one explicitly. With the cache off it uses the unnamed
statement, parsed and bound in two separate Sync'ed round trips. `execute()`
without arguments uses the simple query protocol. Its cancel (task
cancellation or `timeout=`) sends a real CancelRequest and waits for the
server to end the query, but swallows the server's 57014: the scenarios see
that 57014 as the aborted transaction it leaves (25P02 afterwards).
"""

from __future__ import annotations

import asyncio
import csv
import io
import time

import asyncpg

from matrix import (
    COPY_ROWS,
    client_schemas_sql,
    ENV,
    Fail,
    await_until,
    check,
    copy_text,
    eq,
    gather_clients,
    log,
    run_async,
    sqlstate,
    timezone_of,
)

T = "m_apg"  # prefix of every object this program creates


async def connect(port: int | None = None, **kw) -> asyncpg.Connection:
    return await asyncpg.connect(
        host=ENV.host,
        port=port or ENV.port,
        user=ENV.user,
        password=ENV.password,
        database=ENV.database,
        timeout=20,
        **kw,
    )


class connection:
    """`async with connection(...) as c`: connect, and close at the end."""

    def __init__(self, port: int | None = None, **kw) -> None:
        self.port, self.kw, self.conn = port, kw, None

    async def __aenter__(self) -> asyncpg.Connection:
        self.conn = await connect(self.port, **self.kw)
        return self.conn

    async def __aexit__(self, *exc) -> None:
        if self.conn is not None:
            try:
                await asyncio.wait_for(self.conn.close(), 5)
            except Exception:  # noqa: BLE001
                self.conn.terminate()


async def setup(*sql: str) -> None:
    async with connection() as c:
        for s in sql:
            await c.execute(s)


def cached_statements(conn: asyncpg.Connection) -> int | None:
    """How many statements asyncpg's cache holds (its private state; None if
    a future asyncpg moved it)."""
    cache = getattr(conn, "_stmt_cache", None)
    try:
        return len(cache) if cache is not None else None
    except TypeError:
        return None


async def expect_error(state: str, awaitable) -> None:
    try:
        await awaitable
    except asyncpg.PostgresError as exc:
        eq(sqlstate(exc), state, "SQLSTATE")
        return
    raise Fail(f"succeeded, want SQLSTATE {state}")


# --- scenarios --------------------------------------------------------------


async def simple_query() -> None:
    await setup(f"drop table if exists {T}_simple", f"create table {T}_simple (client int, k int)")

    async def client(i: int) -> None:
        if i % 2 == 0:
            # Simple query protocol (execute without arguments), checked by
            # command tag, and the table it filled.
            async with connection() as c:
                for k in range(50):
                    if k % 2:
                        eq(await c.execute(f"select generate_series(1, {k})"), f"SELECT {k}", f"query {k}")
                    else:
                        eq(await c.execute(f"insert into {T}_simple values ({i}, {k})"), "INSERT 0 1", f"query {k}")
                got = await c.fetchval(f"select array_agg(k order by k) from {T}_simple where client = {i}")
                eq(got, list(range(0, 50, 2)), "rows inserted")
        else:
            # Statement cache off: every query uses the unnamed statement.
            async with connection(statement_cache_size=0) as c:
                for k in range(50):
                    row = await c.fetchrow("select $1::int + $2::int, $3::text", i, k, f"c{i}-{k}")
                    eq(tuple(row), (i + k, f"c{i}-{k}"), f"query {k}")
                eq(cached_statements(c) or 0, 0, "statements cached")

    await gather_clients(ENV.clients, client)


PREP_QUERIES = (
    "select $1::int + 1",
    "select $1::text || '-' || $2::text",
    f"select v from {T}_prep where id = $1",
)


async def prepared_setup() -> None:
    await setup(
        f"drop table if exists {T}_prep",
        f"create table {T}_prep (id int primary key, v text)",
        f"insert into {T}_prep select g, 'v' || g from generate_series(0, 9) g",
    )


async def prepared_default() -> None:
    await prepared_setup()

    async def client(i: int) -> None:
        async with connection() as c:  # statement cache on (the default)
            for k in range(25):
                eq(await c.fetchval(PREP_QUERIES[0], k + i), k + i + 1, "statement 1")
                eq(await c.fetchval(PREP_QUERIES[1], f"c{i}", str(k)), f"c{i}-{k}", "statement 2")
                eq(await c.fetchval(PREP_QUERIES[2], k % 10), f"v{k % 10}", "statement 3")
            n = cached_statements(c)
            if n is not None:
                eq(n, 3, "statements in asyncpg's cache")

    await gather_clients(ENV.clients, client)


async def prepared_forced() -> None:
    await prepared_setup()

    async def client(i: int) -> None:
        async with connection() as c:
            stmts = [await c.prepare(q) for q in PREP_QUERIES]
            for s in stmts:
                check(s.get_name().startswith("__asyncpg_"), f"statement name {s.get_name()!r}")
            for k in range(25):
                eq(await stmts[0].fetchval(k + i), k + i + 1, "statement 1")
                eq(await stmts[1].fetchval(f"c{i}", str(k)), f"c{i}-{k}", "statement 2")
                eq(await stmts[2].fetchval(k % 10), f"v{k % 10}", "statement 3")

    await gather_clients(ENV.clients, client)


async def same_name_different_text() -> None:
    # asyncpg numbers its own names per process, so the same name comes from
    # prepare(name=...): the same three names on both connections.
    qa = ["select $1::int + 1000", "select $1::text || '-a'", "select $1::int * 7"]
    qb = ["select $1::text || '-b'", "select $1::int - 5", "select 'b' || $1::text"]
    want_a = [lambda r: r + 1000, lambda r: f"{r}-a", lambda r: r * 7]
    want_b = [lambda r: f"{r}-b", lambda r: r - 5, lambda r: f"b{r}"]
    async with connection() as a, connection() as b:
        sa, sb = [], []
        for j in range(3):
            sa.append(await a.prepare(qa[j], name=f"{T}_same_{j}"))
            sb.append(await b.prepare(qb[j], name=f"{T}_same_{j}"))
        for r in range(10):
            for j in range(3):
                pa = r if j != 1 else str(r)
                pb = r if j == 1 else str(r)
                eq(await sa[j].fetchval(pa), want_a[j](pa), f"A round {r} statement {j}")
                eq(await sb[j].fetchval(pb), want_b[j](pb), f"B round {r} statement {j}")


async def transactions() -> None:
    await setup(f"drop table if exists {T}_tx", f"create table {T}_tx (id int primary key)")
    ids = f"select coalesce(array_agg(id order by id), '{{}}') from {T}_tx"
    async with connection() as a, connection() as b:
        async with a.transaction():
            await a.execute(f"insert into {T}_tx values ($1)", 1)
            eq(await b.fetchval(ids), [], "B sees A's uncommitted row")
        eq(await b.fetchval(ids), [1], "B after A's commit")
        tr = a.transaction()
        await tr.start()
        await a.execute(f"insert into {T}_tx values ($1)", 2)
        eq(await a.fetchval(ids), [1, 2], "A inside its transaction")
        await tr.rollback()
        eq(await b.fetchval(ids), [1], "B after A's rollback")
        eq(await a.fetchval(ids), [1], "A after its rollback")
        async with a.transaction():
            await a.execute(f"insert into {T}_tx values ($1)", 3)
        for k in range(10):
            eq(await a.fetchval("select $1::int", k), k, "more work on A")
        eq(await b.fetchval(ids), [1, 3], "B at the end")


class Steer:
    """Transaction mode: picks the server connection a client's next
    transaction gets, by holding every other pooled one in an open
    transaction of a blocker connection (the pool hands out its only idle
    one). Lets a scenario run a statement asyncpg already prepared on one
    server connection inside a transaction on another."""

    def __init__(self) -> None:
        self.held: dict[int, asyncpg.Connection] = {}

    async def hold_all(self) -> list[int]:
        while len(self.held) < ENV.pool_size:
            b = await connect()
            await b.execute("begin")
            self.held[await b.fetchval("select pg_backend_pid()")] = b
        return sorted(self.held)

    async def free(self, pid: int) -> None:
        b = self.held.pop(pid)
        await b.execute("commit")
        await b.close()

    async def release_all(self) -> None:
        for pid in list(self.held):
            await self.free(pid)


async def aborted_backends(mon: asyncpg.Connection) -> list[int]:
    rows = await mon.fetch("select pid from pg_stat_activity where state = 'idle in transaction (aborted)'")
    return [r[0] for r in rows]


async def error_then_rollback() -> None:
    # fetchval: named, cached statements (parsed once per connection, then
    # only bound); begin/rollback: simple queries. `select 1` and
    # `select 1 as x` are cached before the failed transaction. In
    # transaction mode each round runs them on one server connection and the
    # failed transaction on the other.
    steer = Steer() if not ENV.session_mode and ENV.port != ENV.direct_port else None
    async with connection() as c, connection(ENV.direct_port) as mon:
        try:
            for r in range(3):
                cold = None
                if steer:
                    pids = await steer.hold_all()
                    warm, cold = pids[r % 2], pids[(r + 1) % 2]
                    await steer.free(warm)
                eq(await c.fetchval("select 1"), 1, f"round {r}: select 1 before the transaction")
                eq(await c.fetchval("select 1 as x"), 1, f"round {r}: select 1 as x before the transaction")
                if steer:
                    await steer.hold_all()
                    await steer.free(cold)
                await c.execute("begin")
                await expect_error("22012", c.fetchval("select 1/0"))
                if cold is not None and await aborted_backends(mon) != [cold]:
                    log(f"error_then_rollback: round {r} did not land on server pid {cold}")
                await expect_error("25P02", c.fetchval("select 1"))
                await c.execute("rollback")
                eq(await c.fetchval("select 1 as x"), 1, f"round {r}: select 1 as x")
                if steer:
                    await steer.release_all()
                eq(await c.fetchval("select 1"), 1, f"round {r}: select 1 after the rollback")
        finally:
            if steer:
                await steer.release_all()
        eq(await c.fetchval("select 1/1"), 1, "select 1/1 outside a transaction")


async def savepoints() -> None:
    await setup(f"drop table if exists {T}_sp", f"create table {T}_sp (id int primary key)")
    ids = f"select coalesce(array_agg(id order by id), '{{}}') from {T}_sp"
    ins = f"insert into {T}_sp values ($1)"
    async with connection() as c, connection() as other:
        async with c.transaction():
            await c.execute(ins, 1)
            try:
                async with c.transaction():  # a savepoint
                    await c.execute(ins, 2)
                    await c.execute(ins, 1)
            except asyncpg.UniqueViolationError:
                pass
            else:
                raise Fail("duplicate key inside the savepoint succeeded")
            eq(await c.fetchval(ids), [1], "after rollback to savepoint")
            await c.execute(ins, 3)
            async with c.transaction():
                await c.execute(ins, 4)
            eq(await other.fetchval(ids), [], "another connection before commit")
        eq(await other.fetchval(ids), [1, 3, 4], "rows after commit")
        eq(await c.fetchval("select 5"), 5, "more work afterwards")


async def startup_params() -> None:
    n = ENV.clients
    await setup(*client_schemas_sql(T, n))

    async def client(i: int) -> None:
        app, tz, path = f"{T}_app_{i}", timezone_of(i), f"{T}_sch_{i},public"
        settings = {
            "application_name": app,
            "TimeZone": tz,
            "search_path": path,
            "options": f"-c m.client={i}",
        }
        async with connection(server_settings=settings) as c:
            for k in range(20):
                async with c.transaction():
                    row = await c.fetchrow(
                        "select current_setting('application_name'), current_setting('TimeZone'),"
                        " current_setting('search_path'), current_setting('m.client'),"
                        " (select v from marker),"
                        " to_char('2020-06-01 12:00:00+00'::timestamptz, 'HH24:MI TZ')"
                    )
                    eq(tuple(row)[:5], (app, tz, path, str(i), i), f"settings in transaction {k}")
                    local = await c.fetchval(
                        "select to_char('2020-06-01 12:00:00+00'::timestamptz at time zone $1, 'HH24:MI')", tz
                    )
                    check(row[5].startswith(local), f"timestamptz rendered {row[5]!r}, want {local} in {tz}")
                s = c.get_settings()
                eq(s.application_name, app, "application_name ParameterStatus")
                eq(s.TimeZone, tz, "TimeZone ParameterStatus")
                await asyncio.sleep(0.005)

    await gather_clients(n, client)


async def copy() -> None:
    await setup(f"drop table if exists {T}_copy", f"create table {T}_copy (client int, n int, s text)")

    async def client(i: int) -> None:
        want = [(n, copy_text(i, n)) for n in range(COPY_ROWS)]
        async with connection() as c:
            # COPY FROM STDIN (binary) and COPY TO STDOUT (csv).
            tag = await c.copy_records_to_table(
                f"{T}_copy", records=[(i, n, s) for n, s in want], columns=["client", "n", "s"]
            )
            eq(tag, f"COPY {COPY_ROWS}", "COPY FROM command tag")
            eq(await c.fetchval(f"select count(*) from {T}_copy where client = $1", i), COPY_ROWS, "rows in table")
            out = io.BytesIO()
            tag = await c.copy_from_query(
                f"select n, s from {T}_copy where client = {i} order by n",
                output=out, format="csv", null="\\N",
            )
            eq(tag, f"COPY {COPY_ROWS}", "COPY TO command tag")
            got = [
                (int(n), None if s == "\\N" else s)
                for n, s in csv.reader(io.StringIO(out.getvalue().decode(), newline=""))
            ]
            eq(len(got), COPY_ROWS, "rows copied out")
            for g, w in zip(got, want):
                eq(g, w, "row copied out")
            eq(await c.fetchval("select 1"), 1, "after copy")

    await gather_clients(ENV.clients, client)


async def cancel() -> None:
    tag = f"{T}_cancel"

    async def active(mon: asyncpg.Connection, marker: str):
        return await mon.fetchval(
            "select pid from pg_stat_activity where state = 'active' and query like $1"
            " and pid <> pg_backend_pid()",
            f"%{marker}%",
        )

    async with connection(ENV.direct_port) as mon, connection() as a, connection() as b:
        # 1. Task cancellation of a long query; a concurrent client's query
        #    on the same pool goes on.
        long_q = f"select pg_sleep(30) as {tag}_a"
        task = asyncio.ensure_future(a.fetchval(long_q))
        pid = await await_until(lambda: active(mon, f"{tag}_a"), 10, "the long query never became active")
        other = asyncio.ensure_future(b.fetchrow(f"select pg_sleep(2)::text, 'b' as {tag}_b"))
        await await_until(lambda: active(mon, f"{tag}_b"), 10, "the concurrent query never became active")
        t0 = time.monotonic()
        task.cancel()
        try:
            await asyncio.wait_for(task, 10)
            raise Fail("the cancelled query completed")
        except asyncio.CancelledError:
            pass
        # asyncpg's next operation waits until the server ended the query.
        eq(await asyncio.wait_for(a.fetchval("select 1"), 10), 1, "the cancelled connection afterwards")
        took = time.monotonic() - t0
        check(took < 10, f"the cancelled query ended after {took:.1f} s")
        eq(tuple(await asyncio.wait_for(other, 10)), ("", "b"), "the concurrent query")
        check(await active(mon, f"{tag}_a") is None, "the long query is still active on the server")
        eq(await mon.fetchval("select count(*) from pg_stat_activity where pid = $1", pid), 1,
           "the cancelled server connection still exists")

        # 2. `timeout=` inside a transaction: the server's 57014 aborts the
        #    transaction, so the next statement in it fails with 25P02.
        tr = a.transaction()
        await tr.start()
        t0 = time.monotonic()
        try:
            await a.fetchval(f"select pg_sleep(30) as {tag}_c", timeout=1.5)
            raise Fail("the query with timeout=1.5 completed")
        except asyncio.TimeoutError:
            pass
        await expect_error("25P02", asyncio.wait_for(a.fetchval("select 1"), 10))
        took = time.monotonic() - t0
        check(took < 10, f"the timed-out query ended after {took:.1f} s")
        await tr.rollback()
        for k in range(5):
            eq(await a.fetchval("select $1::int", k), k, "the cancelled connection afterwards")
        eq(await b.fetchval("select 2"), 2, "the concurrent connection afterwards")


async def server_error() -> None:
    await setup(
        f"drop table if exists {T}_err",
        f"create table {T}_err (id int primary key)",
        f"insert into {T}_err values (1)",
    )
    cases = [
        ("23505", f"insert into {T}_err values ($1)", (1,)),
        ("42P01", f"select * from {T}_no_such_table", ()),
        ("42601", "selec 1", ()),
        ("22012", "select 1/$1::int", (0,)),
    ]
    async with connection() as c:
        for state, sql, args in cases:
            # Named, cached statements (fetch) and, without arguments, the
            # simple query protocol (execute).
            for _ in range(2):
                await expect_error(state, c.fetch(sql, *args))
            if not args:
                await expect_error(state, c.execute(sql))
            eq(await c.fetchval("select 1"), 1, f"after {state}")
        eq(await c.fetchval(f"select count(*) from {T}_err"), 1, "rows at the end")


async def alter_sequence(port: int, table: str) -> dict[str, list[str]]:
    """prepare `select * from t`, run it, ALTER TABLE from another
    connection, run it twice more; the outcomes as asyncpg reports them, for
    an explicit prepare() and for the statement cache."""
    outcomes: dict[str, list[str]] = {}
    async with connection(port) as other:
        for way in ("prepare", "cache"):
            t = f"{table}_{way}"
            await other.execute(f"drop table if exists {t}; create table {t} (a int); insert into {t} values (1)")
            got: list[str] = []
            async with connection(port) as c:
                stmt = await c.prepare(f"select * from {t}") if way == "prepare" else None

                async def run() -> None:
                    try:
                        rows = await (stmt.fetch() if stmt else c.fetch(f"select * from {t}"))
                        got.append(f"{len(rows[0])} columns, {[tuple(r) for r in rows]}")
                    except asyncpg.PostgresError as exc:
                        got.append(f"SQLSTATE {sqlstate(exc)}")

                await run()
                await other.execute(f"alter table {t} add column b int default 2")
                await run()
                await run()
            await other.execute(f"drop table {t}")
            outcomes[way] = got
    return outcomes


async def alter_table_reprepare() -> None:
    want = await alter_sequence(ENV.direct_port, f"{T}_alter_direct")
    got = await alter_sequence(ENV.port, f"{T}_alter")
    log(f"alter_table_reprepare: directly {want}, through the proxy {got}")
    eq(got, want, "outcomes through the proxy vs. directly")


if __name__ == "__main__":
    run_async("asyncpg", {name: globals()[name] for name in (
        "simple_query", "prepared_default", "prepared_forced", "same_name_different_text",
        "transactions", "error_then_rollback", "savepoints", "startup_params", "copy",
        "cancel", "server_error", "alter_table_reprepare",
    )})
