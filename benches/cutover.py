#!/usr/bin/env python3
"""Helpers of benches/cutover.sh (see benches/README.md, "Cutover benchmark").

  recipe  --pgbouncer-port P --pgbouncer-ini F --blue-port B --green-port G --password PW
          --switches N --first-at EPOCH --gap S --deadline EPOCH --out-dir DIR
      The usual PgBouncer cutover recipe, N times alternating blue -> green -> blue, one
      every S seconds from EPOCH: PAUSE, flush and wait until the other side has applied
      everything (the exact target pgswitch uses), copy sequences, switch the replication
      direction from exactly this point (as src/replication/direction.rs does), point the
      database at the other side in pgbouncer.ini, RELOAD, RESUME. Writes one JSON report
      per switch (DIR/NN.json), shaped like pgswitch's, with the pause window in wall-clock
      time.
  stats   --port P --password PW
      Prints JSON: pgbench_history rows and sums, balance sums (for the no-lost-row check).
  report  --scenario NAME=DIR ... --meta FILE [--out FILE.md]
      Reads each scenario's pgbench logs, pgbench output and switch reports and prints the
      Markdown comparison (and writes it to --out).

A scenario directory holds: tx.* (pgbench -l logs), pgbench.out, pgbench.err, pgbench.rc,
switches/NN.json ({"report": {...}, "curl_start_ms", "curl_end_ms", "attempts"}),
stats-before.json, stats-after.json (per side), cpu.json.

pgbench -l line (PostgreSQL 15, with -R): client_id tx_no latency_us script_no epoch_s epoch_us
schedule_lag_us; latency is counted from the scheduled start, so it includes the time a
transaction waited at a paused proxy. `failed` / `skipped` instead of a latency for
transactions that did not complete.
"""
import argparse
import glob
import json
import os
import re
import statistics
import sys
import time

STALL_WINDOW_MS = 1000  # "around the switch": from 1 s before the pause to 1 s after it
SLOW_MS = 100
# Targets from issue 9.
PAUSE_MEDIAN_MAX = 30.0
PAUSE_MAX_MAX = 100.0
STALL_MEDIAN_MAX = 50.0


def lsn_int(text):
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def now_ms():
    return time.time() * 1000.0


# ------------------------------------------------------------------ the PgBouncer recipe
class Recipe:
    def __init__(self, a):
        import psycopg
        self.a = a
        self.psycopg = psycopg

        def admin(port):
            return psycopg.connect(host="127.0.0.1", port=port, user="postgres", password=a.password,
                                   dbname=a.db, autocommit=True, application_name="bench-recipe")
        self.conn = {"blue": admin(a.blue_port), "green": admin(a.green_port)}
        self.port = {"blue": a.blue_port, "green": a.green_port}
        # The admin console speaks the simple query protocol only: client-side binding.
        self.bouncer = psycopg.connect(host="127.0.0.1", port=a.pgbouncer_port, user="postgres",
                                       password=a.password, dbname="pgbouncer", autocommit=True,
                                       cursor_factory=psycopg.ClientCursor)
        # Subscription on each side that replicates the *other* side into it, and its slot.
        self.sub = {"green": (a.subscription, a.subscription), "blue": (a.reverse, a.reverse)}

    def q(self, side, sql, params=None):
        return self.conn[side].execute(sql, params).fetchall()

    def bq(self, sql):
        with self.bouncer.cursor() as c:
            c.execute(sql)

    def sub_info(self, side, name):
        rows = self.q(side, "SELECT s.oid, s.subenabled, ARRAY(SELECT pid FROM pg_stat_subscription st "
                            "WHERE st.subid = s.oid AND st.pid IS NOT NULL) FROM pg_subscription s "
                            "WHERE s.subname = %s", (name,))
        return rows[0] if rows else None

    def prepare(self):
        """Ahead of all pauses, as pgswitch does: the reverse direction's publication and slot
        on green and its disabled subscription on blue (no initial copy)."""
        name = self.a.reverse
        if not self.q("green", "SELECT 1 FROM pg_publication WHERE pubname = %s", (name,)):
            self.conn["green"].execute(f'CREATE PUBLICATION "{name}" FOR ALL TABLES')
        if not self.q("green", "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (name,)):
            self.q("green", "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))
        if self.sub_info("blue", name) is None:
            conninfo = (f"host=127.0.0.1 port={self.a.green_port} user=postgres "
                        f"password={self.a.password} dbname={self.a.db}")
            self.conn["blue"].execute(
                f"CREATE SUBSCRIPTION \"{name}\" CONNECTION '{conninfo}' PUBLICATION \"{name}\" "
                f"WITH (create_slot = false, slot_name = '{name}', copy_data = false, enabled = false)")

    def streaming(self, side):
        info = self.sub_info(side, self.sub[side][0])
        return bool(info and info[1] and info[2])

    def wait_applied(self, frm, to, target, timeout_s=5.0):
        sub, slot = self.sub[to]
        oid = self.sub_info(to, sub)[0]
        t0 = time.monotonic()
        while True:
            r = self.q(frm, "SELECT r.write_lsn::text FROM pg_stat_replication r WHERE r.pid = "
                            "(SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s)", (slot,))
            s = self.q(to, "SELECT latest_end_lsn::text FROM pg_stat_subscription WHERE subid = %s "
                           "AND relid IS NULL AND pid IS NOT NULL", (oid,))
            reached = max([lsn_int(x[0]) for x in r + s if x[0]] or [0])
            if reached >= target:
                return
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"catch-up: not applied within {timeout_s}s")
            time.sleep(0.001)

    def switch(self, frm, to):
        a = self.a
        rep = {"kind": "cutover" if frm == "blue" else "fallback", "from": frm, "to": to,
               "outcome": "aborted", "phases": [], "sequences_synced": 0}
        phases = rep["phases"]

        def phase(name, t):
            phases.append({"name": name, "ms": (time.perf_counter() - t) * 1000.0})

        # Preflight, outside the pause (as pgswitch's): the direction we wait on streams.
        t = time.perf_counter()
        rep["started_at_unix_ms"] = int(now_ms())
        waited = 0
        while not self.streaming(to):
            if waited > 200:
                rep["reason"] = f"subscription on {to} not streaming after 20 s"
                return rep
            time.sleep(0.1)
            waited += 1
        phase("preflight", t)

        pause_wall = now_ms()
        pause_t = time.perf_counter()
        try:
            t = time.perf_counter()
            self.bq(f"PAUSE {a.db}")  # returns once running transactions are done
            phase("pause_drain", t)

            # Catch-up: flush every acknowledged commit on the old side (synchronous commit
            # of a tiny transaction) and wait for the end LSN of its message.
            t = time.perf_counter()
            cur = self.conn[frm].cursor()
            cur.execute("BEGIN; SET LOCAL synchronous_commit = on; "
                        "SELECT pg_logical_emit_message(true, 'bench', 'x')::text; COMMIT")
            target = None
            while True:
                if cur.pgresult is not None and cur.pgresult.ntuples:
                    target = cur.fetchone()[0]
                if not cur.nextset():
                    break
            rep["target_lsn"] = target
            self.wait_applied(frm, to, lsn_int(target))
            phase("catch_up", t)

            # Sequences: setval per sequence.
            t = time.perf_counter()
            seqs = self.q(frm, "SELECT format('%%I.%%I', schemaname, sequencename) FROM pg_sequences "
                               "WHERE schemaname NOT IN ('pg_catalog', 'information_schema')")
            for (seq,) in seqs:
                (val, called), = self.q(frm, f"SELECT last_value, is_called FROM {seq}")
                self.q(to, "SELECT setval(%s::regclass, %s, %s)", (seq, val, called))
            rep["sequences_synced"] = len(seqs)
            phase("sequences", t)

            # Replication direction (direction.rs switch_direction): stop the subscription on the
            # side becoming active, wait for its worker to be gone, take that side's WAL insert
            # position X, advance the origin of the other side's subscription to X and enable it.
            t = time.perf_counter()
            stop_sub = self.sub[to][0]
            start_sub = self.sub[frm][0]
            start_oid, _, workers = self.sub_info(frm, start_sub)
            self.conn[to].execute(f'ALTER SUBSCRIPTION "{stop_sub}" DISABLE')
            stop_oid = self.sub_info(to, stop_sub)[0]
            deadline = time.monotonic() + 5
            while True:
                (running, _), = self.q(to, "SELECT count(*), count(pg_terminate_backend(pid)) FROM "
                                           "pg_stat_subscription WHERE subid = %s AND pid IS NOT NULL",
                                       (stop_oid,))
                if running == 0:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("forward worker still running")
                time.sleep(0.001)
            (x,), = self.q(to, "SELECT pg_current_wal_insert_lsn()::text")
            rep["switch_lsn"] = x
            with self.conn[frm].transaction():
                self.q(frm, "SELECT pg_replication_origin_advance(%s, %s::pg_lsn)", (f"pg_{start_oid}", x))
                self.conn[frm].execute(f'ALTER SUBSCRIPTION "{start_sub}" ENABLE')
            phase("reverse", t)

            # Point the database at the other side, RELOAD.
            t = time.perf_counter()
            with open(a.pgbouncer_ini) as f:
                ini = f.read()
            ini = re.sub(r"(?m)^(bench = host=127\.0\.0\.1 port=)\d+", rf"\g<1>{self.port[to]}", ini)
            with open(a.pgbouncer_ini, "w") as f:
                f.write(ini)
            self.bq("RELOAD")
            phase("reload", t)
            rep["outcome"] = "switched"
        except Exception as e:  # resume on whatever side the ini names
            rep["reason"] = f"{type(e).__name__}: {e}"
        finally:
            t = time.perf_counter()
            self.bq(f"RESUME {a.db}")
            phase("resume", t)
            rep["pause_ms"] = (time.perf_counter() - pause_t) * 1000.0
            rep["pause_start_unix_ms"] = pause_wall
            rep["pause_end_unix_ms"] = pause_wall + rep["pause_ms"]
        return rep

    def run(self):
        a = self.a
        self.prepare()
        side = "blue"
        os.makedirs(a.out_dir, exist_ok=True)
        for i in range(1, a.switches + 1):
            at = a.first_at + (i - 1) * a.gap
            if at > a.deadline:
                print(f"recipe: switch {i} would start after the load ends; stopping", file=sys.stderr)
                break
            time.sleep(max(0.0, at - time.time()))
            if time.time() > a.deadline:
                print(f"recipe: switch {i} is late (load ends); stopping", file=sys.stderr)
                break
            other = "green" if side == "blue" else "blue"
            t0 = now_ms()
            rep = self.switch(side, other)
            rec = {"report": rep, "curl_start_ms": t0, "curl_end_ms": now_ms(), "attempts": 1}
            with open(os.path.join(a.out_dir, f"{i:02d}.json"), "w") as f:
                json.dump(rec, f, indent=1)
            phases = ", ".join("%s %.1f" % (p["name"], p["ms"]) for p in rep["phases"])
            print(f"recipe: switch {i} {side} -> {other}: {rep['outcome']}, pause "
                  f"{rep.get('pause_ms', 0):.1f} ms ({phases})"
                  + (f" reason: {rep['reason']}" if rep.get("reason") else ""), file=sys.stderr)
            if rep["outcome"] != "switched":
                break
            side = other
        return 0


def cmd_recipe(a):
    return Recipe(a).run()


def cmd_stats(a):
    import psycopg
    with psycopg.connect(host="127.0.0.1", port=a.port, user="postgres", password=a.password,
                         dbname=a.db, autocommit=True) as c:
        row = c.execute(
            "SELECT (SELECT count(*) FROM pgbench_history), (SELECT coalesce(sum(delta), 0) FROM pgbench_history), "
            "(SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(tbalance) FROM pgbench_tellers), "
            "(SELECT sum(bbalance) FROM pgbench_branches)").fetchone()
    print(json.dumps(dict(zip(["history_rows", "history_delta", "abalance", "tbalance", "bbalance"],
                              [int(x) for x in row]))))
    return 0


# ------------------------------------------------------------------ analysis
def read_logs(d):
    txs, failed = [], 0  # (start_ms, end_ms, latency_ms)
    for path in sorted(glob.glob(os.path.join(d, "tx.*"))):
        with open(path) as f:
            for line in f:
                p = line.split()
                if len(p) < 6:
                    continue
                if not p[2].isdigit():
                    failed += 1
                    continue
                lat = int(p[2]) / 1000.0
                end = int(p[4]) * 1000.0 + int(p[5]) / 1000.0
                txs.append((end - lat, end, lat))
    return txs, failed


def pgbench_summary(d):
    out = open(os.path.join(d, "pgbench.out")).read() if os.path.exists(os.path.join(d, "pgbench.out")) else ""
    err = open(os.path.join(d, "pgbench.err")).read() if os.path.exists(os.path.join(d, "pgbench.err")) else ""
    rc = open(os.path.join(d, "pgbench.rc")).read().strip() if os.path.exists(os.path.join(d, "pgbench.rc")) else "?"

    def num(pattern):
        m = re.search(pattern, out)
        return int(m.group(1)) if m else None
    return {
        "processed": num(r"number of transactions actually processed: (\d+)"),
        "failed": num(r"number of failed transactions: (\d+)"),
        "tps": (lambda m: float(m.group(1)) if m else None)(re.search(r"tps = ([\d.]+)", out)),
        "aborted_clients": len(re.findall(r"client \d+ aborted", err)),
        "errors": [l for l in err.splitlines() if "error" in l.lower() or "aborted" in l.lower()][:5],
        "rc": rc,
    }


def pause_window(rec):
    """(start_ms, end_ms) of the pause in wall-clock time, or None."""
    r = rec["report"]
    if r.get("pause_ms") is None:
        return None
    if "pause_start_unix_ms" in r:
        return r["pause_start_unix_ms"], r["pause_end_unix_ms"]
    if rec.get("gate_open_unix_ms"):
        # pgswitch's "switch finished" log line, written right after the gate opened.
        return rec["gate_open_unix_ms"] - r["pause_ms"], rec["gate_open_unix_ms"]
    # Without the log line: the gate closes after the phases before "drain" (preflight,
    # prepare, unfence, warm) and opens pause_ms later. The untimed gaps between phases make
    # this start a few ms early (5.5 ms measured).
    before = 0.0
    for p in r.get("phases", []):
        if p["name"] == "drain":
            break
        before += p["ms"]
    start = r["started_at_unix_ms"] + before
    return start, start + r["pause_ms"]


def analyse(d):
    txs, log_failed = read_logs(d)
    recs = []
    for path in sorted(glob.glob(os.path.join(d, "switches", "*.json"))):
        with open(path) as f:
            recs.append(json.load(f))
    windows = []
    rows = []
    for rec in recs:
        r = rec["report"]
        w = pause_window(rec)
        row = {"dir": f"{r.get('from')} → {r.get('to')}", "outcome": r.get("outcome"),
               "reason": r.get("reason"), "pause_ms": r.get("pause_ms"), "stall_ms": None, "slow": None,
               "overlap": 0, "attempts": rec.get("attempts", 1),
               "phases": {p["name"]: p["ms"] for p in r.get("phases", [])}}
        if w:
            ps, pe = w
            windows.append((ps - STALL_WINDOW_MS, pe + STALL_WINDOW_MS))
            over = [t for t in txs if t[0] < pe and t[1] > ps]
            row["overlap"] = len(over)
            row["stall_ms"] = max((t[2] for t in over), default=None)
            lo, hi = ps - STALL_WINDOW_MS, pe + STALL_WINDOW_MS
            row["slow"] = sum(1 for t in txs if t[2] > SLOW_MS and t[0] < hi and t[1] > lo)
        rows.append(row)
    slow_outside = sum(1 for t in txs if t[2] > SLOW_MS and not any(t[0] < hi and t[1] > lo for lo, hi in windows))
    lats = sorted(t[2] for t in txs)

    def load(name):
        p = os.path.join(d, name)
        return json.load(open(p)) if os.path.exists(p) else None
    return {"rows": rows, "pgbench": pgbench_summary(d), "log_failed": log_failed, "tx_logged": len(txs),
            "slow_outside": slow_outside,
            "p50": lats[len(lats) // 2] if lats else None,
            "p99": lats[int(len(lats) * 0.99)] if lats else None,
            "before": load("stats-before.json"), "after": load("stats-after.json"), "cpu": load("cpu.json")}


def fmt(v, nd=1):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def cmd_report(a):
    scen = []
    for s in a.scenario:
        name, d = s.split("=", 1)
        scen.append((name, analyse(d)))
    meta = json.load(open(a.meta)) if a.meta else {}
    L = []
    L.append(a.title or f"# pgswitch cutover benchmark {time.strftime('%Y-%m-%d')}")
    L.append("")
    for k, v in meta.items():
        L.append(f"- {k}: {v}")
    L.append("")
    L.append("## Per switch")
    L.append("")
    L.append("pause = how long new transactions were held (pgswitch: report `pause_ms`; PgBouncer: PAUSE "
             "sent → RESUME answered). stall = largest pgbench latency (from the scheduled start) among "
             f"transactions overlapping the pause. >{SLOW_MS} ms = transactions over {SLOW_MS} ms overlapping "
             f"the pause ± {STALL_WINDOW_MS / 1000:.0f} s.")
    L.append("")
    hdr = "| # | direction |"
    sep = "|---:|---|"
    for name, _ in scen:
        hdr += f" {name} outcome | {name} pause ms | {name} stall ms | {name} >{SLOW_MS} ms |"
        sep += "---|---:|---:|---:|"
    L += [hdr, sep]
    n = max(len(r["rows"]) for _, r in scen) if scen else 0
    for i in range(n):
        direction = next((r["rows"][i]["dir"] for _, r in scen if i < len(r["rows"])), "")
        line = f"| {i + 1} | {direction} |"
        for _, r in scen:
            if i < len(r["rows"]):
                x = r["rows"][i]
                oc = x["outcome"] + (f" ({x['reason']})" if x.get("reason") else "")
                line += f" {oc} | {fmt(x['pause_ms'])} | {fmt(x['stall_ms'])} | {fmt(x['slow'])} |"
            else:
                line += " not run | | | |"
        L.append(line)
    line = "| **median** | |"
    for _, r in scen:
        ok = [x for x in r["rows"] if x["outcome"] == "switched"]
        line += (f" {len(ok)}/{len(r['rows'])} switched | **{fmt(med([x['pause_ms'] for x in ok]))}** | "
                 f"**{fmt(med([x['stall_ms'] for x in ok]))}** | {fmt(med([x['slow'] for x in ok]))} |")
    L.append(line)
    line = "| **max** | |"
    for _, r in scen:
        ok = [x for x in r["rows"] if x["outcome"] == "switched"]
        line += (f" | {fmt(max((x['pause_ms'] for x in ok), default=None))} | "
                 f"{fmt(max((x['stall_ms'] for x in ok if x['stall_ms'] is not None), default=None))} | "
                 f"{fmt(max((x['slow'] for x in ok if x['slow'] is not None), default=None))} |")
    L.append(line)
    L.append("")

    L.append("## Phases (median / max ms over the switches)")
    L.append("")
    for name, r in scen:
        names, inside = [], set()
        for x in r["rows"]:
            paused = False
            for p in x["phases"]:
                paused = paused or p in ("drain", "pause_drain")
                if paused:
                    inside.add(p)
                if p not in names:
                    names.append(p)

        def part(p):
            vals = [x["phases"][p] for x in r["rows"] if p in x["phases"]]
            return f"{p} {fmt(med(vals))} / {fmt(max(vals))}"
        L.append(f"- {name}, inside the pause: " + "; ".join(part(p) for p in names if p in inside))
        L.append(f"- {name}, before the pause: " + "; ".join(part(p) for p in names if p not in inside))
    L.append("")

    L.append("## Totals")
    L.append("")
    L.append("| | " + " | ".join(name for name, _ in scen) + " |")
    L.append("|---|" + "---:|" * len(scen))

    def row(label, f):
        L.append(f"| {label} | " + " | ".join(f(r) for _, r in scen) + " |")

    def delta(r, side, key="history_rows"):
        try:
            return r["after"][side][key] - r["before"][side][key]
        except (TypeError, KeyError):
            return None

    def lost(r):
        p = r["pgbench"]["processed"]
        out = []
        for side in ("blue", "green"):
            d = delta(r, side)
            out.append("?" if d is None or p is None else str(p - d))
        return " / ".join(out)

    def balanced(r):
        out = []
        for side in ("blue", "green"):
            try:
                s = r["after"][side]
                ok = s["history_delta"] == s["abalance"] == s["tbalance"] == s["bbalance"]
                out.append("yes" if ok else "NO")
            except (TypeError, KeyError):
                out.append("?")
        return " / ".join(out)

    row("pgbench committed transactions (its own count)", lambda r: fmt(r["pgbench"]["processed"]))
    row("pgbench tps", lambda r: fmt(r["pgbench"]["tps"]))
    row("failed transactions (pgbench summary)", lambda r: fmt(r["pgbench"]["failed"]))
    row("failed/skipped lines in the -l logs", lambda r: fmt(r["log_failed"]))
    row("aborted clients (pgbench stderr) / exit code",
        lambda r: f"{r['pgbench']['aborted_clients']} / {r['pgbench']['rc']}")
    row("pgbench_history rows added: blue / green",
        lambda r: f"{fmt(delta(r, 'blue'))} / {fmt(delta(r, 'green'))}")
    row("rows missing vs pgbench (blue / green; negative = extra)", lost)
    row("balances = Σ history.delta (blue / green)", balanced)
    row("latency p50 / p99 over the whole run, ms", lambda r: f"{fmt(r['p50'])} / {fmt(r['p99'])}")
    row(f"transactions > {SLOW_MS} ms away from any switch", lambda r: fmt(r["slow_outside"]))
    row("CPU taken by other processes during the run",
        lambda r: fmt(r["cpu"].get("other_cpu_pct"), 0) + " %" if r.get("cpu") else "–")
    L.append("")
    errs = [(name, r["pgbench"]["errors"]) for name, r in scen if r["pgbench"]["errors"]]
    for name, e in errs:
        L.append(f"pgbench stderr ({name}): " + "; ".join(f"`{x}`" for x in e))
    if errs:
        L.append("")

    # Targets.
    L.append("## Targets (issue 9)")
    L.append("")
    res = dict(scen)
    sw, pb = res.get("pgswitch"), res.get("PgBouncer")

    def ok_rows(r):
        return [x for x in r["rows"] if x["outcome"] == "switched"]

    def verdict(cond):
        return "PASS" if cond else "FAIL"

    for name, r in scen:
        p = r["pgbench"]
        zero_fail = (p["failed"] in (0, None) and r["log_failed"] == 0 and p["aborted_clients"] == 0
                     and p["rc"] == "0")
        lost_ok = all(delta(r, s) == p["processed"] for s in ("blue", "green")) and p["processed"] is not None
        L.append(f"- {name}: zero failed transactions: {verdict(zero_fail)}; no lost (or extra) row on "
                 f"either side: {verdict(lost_ok)}; all switches switched: "
                 f"{verdict(len(ok_rows(r)) == len(r['rows']) and r['rows'])}")
    if sw:
        okr = ok_rows(sw)
        pm = med([x["pause_ms"] for x in okr])
        px = max((x["pause_ms"] for x in okr), default=None)
        sm = med([x["stall_ms"] for x in okr])
        L.append(f"- pgswitch pause median ≤ {PAUSE_MEDIAN_MAX:.0f} ms: {fmt(pm)} ms, "
                 f"{verdict(pm is not None and pm <= PAUSE_MEDIAN_MAX)}"
                 + (f" (over by {pm - PAUSE_MEDIAN_MAX:.1f} ms)" if pm and pm > PAUSE_MEDIAN_MAX else ""))
        L.append(f"- pgswitch pause max ≤ {PAUSE_MAX_MAX:.0f} ms: {fmt(px)} ms, "
                 f"{verdict(px is not None and px <= PAUSE_MAX_MAX)}"
                 + (f" (over by {px - PAUSE_MAX_MAX:.1f} ms)" if px and px > PAUSE_MAX_MAX else ""))
        L.append(f"- pgswitch client-visible stall median ≤ {STALL_MEDIAN_MAX:.0f} ms: {fmt(sm)} ms, "
                 f"{verdict(sm is not None and sm <= STALL_MEDIAN_MAX)}"
                 + (f" (over by {sm - STALL_MEDIAN_MAX:.1f} ms)" if sm and sm > STALL_MEDIAN_MAX else ""))
        if pb:
            okb = ok_rows(pb)
            bpm = med([x["pause_ms"] for x in okb])
            bsm = med([x["stall_ms"] for x in okb])
            bpx = max((x["pause_ms"] for x in okb), default=None)
            for label, mine, theirs in (("pause median", pm, bpm), ("pause max", px, bpx),
                                        ("stall median", sm, bsm)):
                L.append(f"- pgswitch {label} better than the PgBouncer recipe: {fmt(mine)} vs {fmt(theirs)} ms, "
                         f"{verdict(mine is not None and theirs is not None and mine < theirs)}")
    text = "\n".join(L) + "\n"
    sys.stdout.write(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("recipe")
    p.add_argument("--pgbouncer-port", type=int, required=True)
    p.add_argument("--pgbouncer-ini", required=True)
    p.add_argument("--blue-port", type=int, required=True)
    p.add_argument("--green-port", type=int, required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--db", default="bench")
    p.add_argument("--subscription", default="pgswitch")
    p.add_argument("--reverse", default="pgb_reverse")
    p.add_argument("--switches", type=int, default=10)
    p.add_argument("--first-at", type=float, required=True)
    p.add_argument("--gap", type=float, default=5)
    p.add_argument("--deadline", type=float, required=True)
    p.add_argument("--out-dir", required=True)
    p.set_defaults(f=cmd_recipe)
    p = sub.add_parser("stats")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--db", default="bench")
    p.set_defaults(f=cmd_stats)
    p = sub.add_parser("report")
    p.add_argument("--scenario", action="append", required=True)
    p.add_argument("--meta")
    p.add_argument("--title")
    p.add_argument("--out")
    p.set_defaults(f=cmd_report)
    a = ap.parse_args()
    return a.f(a)


if __name__ == "__main__":
    sys.exit(main())
