"""Shared helpers of the Python driver-matrix programs.

The contract (environment, `RESULT` lines, scenarios) is
`tests/drivers/README.md`. This module only knows that contract, no driver:
reading the environment, running the selected scenarios one after the other
with a time limit each (and one for the whole program), printing one `RESULT`
line per scenario and the exit code, and running `CLIENTS` clients at once
(threads for the blocking drivers, tasks for asyncio ones).
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
import traceback
from typing import Any, Awaitable, Callable

# Every program runs these, in this order (the same list as tests/drivers.rs).
SCENARIOS = [
    "simple_query",
    "prepared_default",
    "prepared_forced",
    "same_name_different_text",
    "transactions",
    "error_then_rollback",
    "savepoints",
    "startup_params",
    "copy",
    "cancel",
    "server_error",
    "alter_table_reprepare",
]

# The program must end on its own within 120 s; leave room for teardown.
PROGRAM_BUDGET = 105.0
# Whatever still runs then is reported as failed and the program exits.
HARD_LIMIT = 115.0
# One scenario may take at most this long (they normally take < 3 s).
SCENARIO_TIMEOUT = 40.0
# Connecting may wait for a pool slot in session mode.
CONNECT_TIMEOUT = 20


class Env:
    def __init__(self) -> None:
        e = os.environ
        self.host = e.get("PGHOST", "127.0.0.1")
        self.port = int(e.get("PGPORT", "5432"))
        self.user = e.get("PGUSER", "app")
        self.password = e.get("PGPASSWORD", "secret")
        self.database = e.get("PGDATABASE", "postgres")
        self.direct_port = int(e.get("DIRECT_PORT") or self.port)
        self.pool_mode = e.get("POOL_MODE", "transaction")
        self.pool_size = int(e.get("POOL_SIZE", "2"))
        self.clients = int(e.get("CLIENTS", str(2 * self.pool_size)))
        self.scenarios = [s.strip() for s in e.get("SCENARIOS", "").split(",") if s.strip()]

    @property
    def session_mode(self) -> bool:
        return self.pool_mode == "session"


ENV = Env()


class Fail(Exception):
    """A scenario's expectation did not hold; the message is the reason."""


def check(cond: Any, reason: str) -> None:
    if not cond:
        raise Fail(reason)


def eq(got: Any, want: Any, what: str) -> None:
    if got != want:
        raise Fail(f"{what}: got {got!r}, want {want!r}")


def one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(exc: BaseException) -> str:
    if isinstance(exc, Fail):
        return str(exc)
    state = sqlstate(exc)
    state = f" [{state}]" if state else ""
    return f"{type(exc).__name__}{state}: {exc}"


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE a driver attached to an exception (psycopg 3: `sqlstate`,
    asyncpg: `sqlstate`, psycopg2: `pgcode`)."""
    for attr in ("sqlstate", "pgcode"):
        value = getattr(exc, attr, None)
        if isinstance(value, str) and value:
            return value
    return None


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def _selected() -> tuple[list[str], list[str]]:
    if not ENV.scenarios:
        return list(SCENARIOS), []
    known = [s for s in SCENARIOS if s in ENV.scenarios]
    unknown = [s for s in ENV.scenarios if s not in SCENARIOS]
    return known, unknown


class _Report:
    def __init__(self, driver: str) -> None:
        self.driver = driver
        self.started = time.monotonic()
        self.failed = 0
        self.lock = threading.Lock()
        self.reported: set[str] = set()
        names, unknown = _selected()
        self.names = names
        watchdog = threading.Timer(HARD_LIMIT, self._hard_limit)
        watchdog.daemon = True
        watchdog.start()
        for name in unknown:
            self.result(name, f"unknown scenario (known: {', '.join(SCENARIOS)})")
        log(
            f"{driver}: port {ENV.port} (direct {ENV.direct_port}), "
            f"{ENV.pool_mode} mode, pool {ENV.pool_size}, {ENV.clients} clients"
        )

    def remaining(self) -> float:
        return PROGRAM_BUDGET - (time.monotonic() - self.started)

    def result(self, name: str, failure: str | None, took: float | None = None) -> None:
        took_s = f" ({took:.1f} s)" if took is not None else ""
        with self.lock:
            if name in self.reported:
                return
            self.reported.add(name)
            if failure is None:
                print(f"RESULT {name} PASS", flush=True)
                log(f"{name} passed{took_s}")
            else:
                self.failed += 1
                print(f"RESULT {name} FAIL {one_line(failure)}", flush=True)
                log(f"{name} failed{took_s}")

    def _hard_limit(self) -> None:
        for name in self.names:
            self.result(name, f"the program hit its {HARD_LIMIT:.0f} s limit")
        self.failed += 1
        self.finish()

    def finish(self) -> None:
        code = 1 if self.failed else 0
        log(f"{self.driver}: done in {time.monotonic() - self.started:.1f} s, exit {code}")
        sys.stdout.flush()
        sys.stderr.flush()
        # Don't wait for a scenario thread that is still stuck in a driver.
        os._exit(code)


def run_sync(driver: str, scenarios: dict[str, Callable[[], None]]) -> None:
    """Runs the selected scenarios of a blocking driver, each in its own
    thread (so a hung driver call only costs its time limit), and exits."""
    report = _Report(driver)
    for name in report.names:
        budget = min(SCENARIO_TIMEOUT, report.remaining())
        if budget <= 1:
            report.result(name, "not run: the program's time budget is used up")
            continue
        outcome: dict[str, str | None] = {}

        def body(fn: Callable[[], None] = scenarios[name]) -> None:
            try:
                fn()
                outcome["failure"] = None
            except BaseException as exc:  # noqa: BLE001 - reported, not raised
                if not isinstance(exc, Fail):
                    traceback.print_exc(file=sys.stderr)
                outcome["failure"] = describe(exc)

        t0 = time.monotonic()
        thread = threading.Thread(target=body, name=name, daemon=True)
        thread.start()
        thread.join(budget)
        took = time.monotonic() - t0
        if thread.is_alive():
            report.result(name, f"timed out after {budget:.0f} s", took)
        else:
            report.result(name, outcome.get("failure", "scenario ended without a verdict"), took)
    report.finish()


def run_async(driver: str, scenarios: dict[str, Callable[[], Awaitable[None]]]) -> None:
    """Runs the selected scenarios of an asyncio driver, each under
    `asyncio.wait_for`, and exits."""
    report = _Report(driver)

    async def main() -> None:
        for name in report.names:
            budget = min(SCENARIO_TIMEOUT, report.remaining())
            if budget <= 1:
                report.result(name, "not run: the program's time budget is used up")
                continue
            t0 = time.monotonic()
            failure: str | None
            try:
                await asyncio.wait_for(scenarios[name](), budget)
                failure = None
            except asyncio.TimeoutError:
                failure = f"timed out after {budget:.0f} s"
            except BaseException as exc:  # noqa: BLE001 - reported, not raised
                if not isinstance(exc, Fail):
                    traceback.print_exc(file=sys.stderr)
                failure = describe(exc)
            report.result(name, failure, time.monotonic() - t0)

    try:
        asyncio.run(main())
    except BaseException as exc:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        report.failed += 1
        log(f"event loop ended abnormally: {describe(exc)}")
    report.finish()


def run_clients(n: int, fn: Callable[[int], Any], timeout: float = 30.0) -> list[Any]:
    """Runs `fn(0) … fn(n-1)` in `n` threads at once and returns their
    results. Raises `Fail` naming the first client that failed or hung.
    No client waits for another: in session mode the clients beyond the pool
    wait in the proxy until an earlier client's session ends."""
    results: list[Any] = [None] * n
    errors: list[BaseException | None] = [None] * n

    def body(i: int) -> None:
        try:
            results[i] = fn(i)
        except BaseException as exc:  # noqa: BLE001
            errors[i] = exc

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    for i, t in enumerate(threads):
        if t.is_alive():
            raise Fail(f"client {i} did not finish in {timeout:.0f} s")
    for i, exc in enumerate(errors):
        if exc is not None:
            raise Fail(f"client {i}: {describe(exc)}")
    return results


async def gather_clients(
    n: int, fn: Callable[[int], Awaitable[Any]], timeout: float = 30.0
) -> list[Any]:
    """The asyncio `run_clients`: `n` tasks at once."""

    async def one(i: int) -> Any:
        try:
            return await fn(i)
        except Fail as exc:
            raise Fail(f"client {i}: {exc}") from None
        except asyncio.TimeoutError:
            raise Fail(f"client {i}: timed out") from None
        except Exception as exc:  # noqa: BLE001
            raise Fail(f"client {i}: {describe(exc)}") from None

    tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
    try:
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout)
    except asyncio.TimeoutError:
        raise Fail(f"clients did not finish in {timeout:.0f} s") from None
    finally:
        for t in tasks:
            t.cancel()


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Polls `pred` until it returns something truthy; `Fail`s after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise Fail(f"{what} (waited {timeout:.0f} s)")
        time.sleep(interval)


async def await_until(
    pred: Callable[[], Awaitable[Any]], timeout: float, what: str, interval: float = 0.05
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise Fail(f"{what} (waited {timeout:.0f} s)")
        await asyncio.sleep(interval)


# Per-client startup parameters of `startup_params`.
TIMEZONES = [
    "America/New_York",
    "Asia/Tokyo",
    "Europe/Berlin",
    "Australia/Sydney",
    "America/Sao_Paulo",
    "Africa/Cairo",
    "Asia/Kolkata",
    "Pacific/Auckland",
]


def client_schemas_sql(prefix: str, clients: int) -> list[str]:
    """SQL that makes one schema per client, `<prefix>_sch_<i>`, each with a
    table `marker` holding `i`: what startup_params sets search_path to."""
    sql = []
    for i in range(clients):
        s = f"{prefix}_sch_{i}"
        sql += [
            f"drop schema if exists {s} cascade",
            f"create schema {s}",
            f"create table {s}.marker (v int)",
            f"insert into {s}.marker values ({i})",
        ]
    return sql


def timezone_of(i: int) -> str:
    return TIMEZONES[i % len(TIMEZONES)]


# Text that COPY must carry unchanged: delimiters, escapes, newlines, non-ASCII.
def copy_text(client: int, n: int) -> str | None:
    if n % 97 == 13:
        return None
    return f"c{client} n{n}\ttab \\ back\nnl 'q' \"dq\" , é ✓ {n * n}"


COPY_ROWS = 3000
