#!/usr/bin/env python3
"""Helpers for benches/run.sh: parse pgbench runs, record results, render the report.

  parse   --log-prefix P --stdout F --rc N --workload W --target T --round R --results FILE
          reads pgbench's stdout (tps) and its per-transaction logs (P.*), appends one
          JSON line to FILE and prints a one-line summary.
  mark    --workload W --target T --status n/a|skipped --note TEXT --results FILE
          records that a cell was deliberately not run.
  memory  --target T [--transport plain|tls] --clients N --logged-in N --rss-before KiB --rss-after KiB
          [--hwm KiB] --results FILE
  report  --results FILE [--memory FILE] [--meta FILE] [--out FILE.md]
          prints the Markdown report (and writes it to --out).

pgbench -l line format (PostgreSQL 15): client_id transaction_no time script_no time_epoch time_us
[schedule_lag] [retries]; `time` is the transaction latency in microseconds, or the word
`failed` / `skipped` for transactions that did not complete.
"""
import argparse
import glob
import json
import math
import os
import re
import statistics
import sys

WORKLOADS = [
    ("select", "-S (simple)"),
    ("select-extended", "-S -M extended"),
    ("select-prepared", "-S -M prepared"),
    ("tpcb", "TPC-B-like (default)"),
    ("select-tls", "-S, client TLS (sslmode=require)"),
]
TARGETS = [("pgswitch", "pgswitch"), ("pgbouncer", "PgBouncer"), ("direct", "direct")]

# Targets from the brief.
TPS_VS_PGBOUNCER_MIN = 1.10  # issue 17: ahead of PgBouncer by a margin
CPU_PER_TX_VS_PGBOUNCER_MAX = 0.85  # the proxy's own CPU per transaction (issue 17)
TPS_VS_DIRECT_MIN_SELECT = 0.85
TPS_VS_DIRECT_MIN_PREPARED = 0.70  # -S -M prepared, which PgBouncer 1.18 can't run (issue 17)
KIB_PER_IDLE_CLIENT_MAX = 8.0
KIB_PER_IDLE_CLIENT_GOAL = 1.5  # the project's target for an idle plain-TCP client
TRANSPORTS = [("plain", "plain"), ("tls", "TLS")]  # client connection of the idle-client test
OTHER_CPU_WARN_PCT = 10  # CPU used by processes not ours during a run above this marks the run


def disturbed(r):
    return (r.get("other_cpu_pct") or 0) > OTHER_CPU_WARN_PCT


def percentile(sorted_vals, p):
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_vals:
        return None
    k = max(1, math.ceil(p / 100.0 * len(sorted_vals)))
    return sorted_vals[k - 1]


def parse_logs(prefix):
    lat = []
    failed = 0
    files = sorted(glob.glob(prefix + ".*"))
    for path in files:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) < 6:
                    continue
                t = parts[2]
                if t.isdigit():
                    lat.append(int(t))
                else:
                    failed += 1
    return files, lat, failed


def cmd_parse(a):
    out = open(a.stdout).read() if os.path.exists(a.stdout) else ""
    m = re.search(r"^tps = ([0-9.]+) \(without initial connection time\)", out, re.M)
    tps = float(m.group(1)) if m else None
    m = re.search(r"number of failed transactions: (\d+)", out)
    failed_reported = int(m.group(1)) if m else 0
    files, lat, failed_logged = parse_logs(a.log_prefix)
    lat.sort()
    rec = {
        "workload": a.workload,
        "target": a.target,
        "round": a.round,
        "rc": a.rc,
        "tps": tps,
        "transactions": len(lat),
        "failed": max(failed_reported, failed_logged),
        "avg_ms": (sum(lat) / len(lat) / 1000.0) if lat else None,
        "p50_ms": percentile(lat, 50) / 1000.0 if lat else None,
        "p99_ms": percentile(lat, 99) / 1000.0 if lat else None,
        "max_ms": lat[-1] / 1000.0 if lat else None,
        "status": "ok",
        "busy_before_pct": a.busy,
        "other_cpu_pct": other_cpu_pct(a.cpu_before, a.cpu_after) if a.cpu_before and a.cpu_after else None,
        "cpu_snapshots": [a.cpu_before, a.cpu_after],
    }
    rec.update(proxy_cost(a.proc_before, a.proc_after, len(lat)))
    aborted = re.search(r"(client \d+ aborted.*|Run was aborted.*)", out)
    if a.rc != 0 or tps is None or not lat or aborted:
        rec["status"] = "error"
        err = ""
        if os.path.exists(a.stdout + ".err"):
            lines = [l for l in open(a.stdout + ".err").read().splitlines() if l.strip()]
            err = lines[-1] if lines else ""
        rec["note"] = (aborted.group(1) if aborted else err or f"pgbench exit code {a.rc}")[:200]
    with open(a.results, "a") as f:
        f.write(json.dumps(rec) + "\n")

    def fmt(v, spec):
        return format(v, spec) if v is not None else "-"

    print(
        f"    {a.workload:16} {a.target:9} round {a.round}: tps {fmt(tps, '.0f'):>7}  "
        f"avg {fmt(rec['avg_ms'], '.3f')} ms  p99 {fmt(rec['p99_ms'], '.3f')} ms  "
        f"({len(lat)} tx in {len(files)} log files, {rec['failed']} failed)"
        + (f"  ERROR: {rec['note']}" if rec["status"] == "error" else "")
        + (f"  [other processes used {rec['other_cpu_pct']:.0f}% of the CPUs during the run]"
           if disturbed(rec) else "")
    )
    # Log files are large; the caller may delete them once parsed.
    return 0


def cmd_proc_snapshot(a):
    """Print: utime stime (clock ticks) voluntary nonvoluntary (context
    switches) of one process and its threads, for the proxy's own cost."""
    with open(f"/proc/{a.pid}/stat") as f:
        data = f.read()
    rest = data[data.rindex(")") + 2:].split()
    utime, stime = int(rest[11]), int(rest[12])
    vol = nonvol = 0
    # The process's status counts only its main thread; sum every thread's.
    for tid in os.listdir(f"/proc/{a.pid}/task"):
        try:
            with open(f"/proc/{a.pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        vol += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        nonvol += int(line.split()[1])
        except OSError:
            pass
    print(utime, stime, vol, nonvol)
    return 0


def proxy_cost(before, after, transactions):
    """The proxy's user and system CPU (µs) and context switches per
    transaction between two proc-snapshots; {} without them."""
    try:
        b = [int(x) for x in before.split()]
        e = [int(x) for x in after.split()]
    except (AttributeError, ValueError):
        return {}
    if len(b) != 4 or len(e) != 4 or transactions <= 0:
        return {}
    tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
    return {
        "proxy_user_us_per_tx": (e[0] - b[0]) * tick_us / transactions,
        "proxy_sys_us_per_tx": (e[1] - b[1]) * tick_us / transactions,
        "proxy_vol_cs_per_tx": (e[2] - b[2]) / transactions,
        "proxy_invol_cs_per_tx": (e[3] - b[3]) / transactions,
    }


def _stat_fields(pid):
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    # comm may contain spaces: fields after the closing parenthesis
    rest = data[data.rindex(")") + 2:].split()
    ppid = int(rest[1])
    utime, stime, cutime, cstime = (int(x) for x in rest[11:15])
    return ppid, utime + stime, cutime + cstime


def cmd_cpu_snapshot(a):
    """Print: monotonic-seconds busy-ticks(all CPUs) ticks-used-by-our-process-trees.

    Our trees are the given root pids and all their descendants (own CPU time), plus the CPU
    time of children the roots already reaped (cutime/cstime). The difference between two
    snapshots tells how much CPU other processes on the machine took in between."""
    import time
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...  irq/softirq time is not charged to any
    # process (the loopback traffic of the benchmark itself is mostly softirq), so leave it out;
    # steal (the hypervisor running something else) counts as interference.
    busy = cpu[0] + cpu[1] + cpu[2] + (cpu[7] if len(cpu) > 7 else 0)
    procs = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                procs[int(d)] = _stat_fields(d)
            except (OSError, ValueError, IndexError):
                pass
    children = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    ours, seen = 0, set()
    stack = [r for r in a.pids if r in procs]
    for r in stack:
        ours += procs[r][2]  # already-reaped children of a root
    me = os.getpid()
    while stack:
        pid = stack.pop()
        if pid in seen or pid == me:
            continue
        seen.add(pid)
        ours += procs[pid][1]
        stack.extend(children.get(pid, []))
    print(f"v2 {time.monotonic():.3f} {busy} {ours}")
    return 0


def other_cpu_pct(before, after):
    """CPU share (0-100 of all CPUs) used by processes outside our trees between two snapshots."""
    if not (before.startswith("v2 ") and after.startswith("v2 ")):
        return None
    try:
        t0, b0, o0 = (float(x) for x in before.split()[1:])
        t1, b1, o1 = (float(x) for x in after.split()[1:])
    except ValueError:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    capacity = (t1 - t0) * hz * (os.cpu_count() or 1)
    if capacity <= 0:
        return None
    return max(0.0, 100.0 * ((b1 - b0) - (o1 - o0)) / capacity)


def cmd_disturbed(a):
    """exit 0 if the (single) record in the file was disturbed by other processes"""
    recs = load(a.file)
    return 0 if recs and disturbed(recs[-1]) else 1


def cmd_mark(a):
    rec = {"workload": a.workload, "target": a.target, "status": a.status, "note": a.note}
    with open(a.results, "a") as f:
        f.write(json.dumps(rec) + "\n")
    return 0


def cmd_memory(a):
    rec = {
        "target": a.target,
        "transport": a.transport,
        "clients": a.clients,
        "logged_in": a.logged_in,
        "rss_before_kib": a.rss_before,
        "rss_after_kib": a.rss_after,
        "hwm_kib": a.hwm,
        "status": a.status,
        "note": a.note,
    }
    if a.logged_in and a.rss_after is not None and a.rss_before is not None:
        rec["kib_per_client"] = (a.rss_after - a.rss_before) / a.logged_in
    with open(a.results, "a") as f:
        f.write(json.dumps(rec) + "\n")
    return 0


def load(path):
    if not path or not os.path.exists(path):
        return []
    return [json.loads(l) for l in open(path) if l.strip()]


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def summarize(records):
    """-> {(workload, target): cell} with medians over the successful rounds."""
    cells = {}
    for w, _ in WORKLOADS:
        for t, _ in TARGETS:
            rs = [r for r in records if r["workload"] == w and r["target"] == t]
            if not rs:
                continue
            ok = [r for r in rs if r.get("status") == "ok"]
            marks = [r for r in rs if r.get("status") in ("n/a", "skipped")]
            errs = [r for r in rs if r.get("status") == "error"]
            cell = {"runs": len(ok), "errors": len(errs)}
            if ok:
                cell.update(
                    status="ok",
                    tps=med([r["tps"] for r in ok]),
                    avg_ms=med([r["avg_ms"] for r in ok]),
                    p99_ms=med([r["p99_ms"] for r in ok]),
                    tps_rounds=[r["tps"] for r in sorted(ok, key=lambda r: r["round"])],
                    tps_rounds_fmt=[
                        f"{r['tps']:.0f}" + ("*" if disturbed(r) else "")
                        for r in sorted(ok, key=lambda r: r["round"])
                    ],
                    p99_rounds=[r["p99_ms"] for r in sorted(ok, key=lambda r: r["round"])],
                    other_rounds=[r.get("other_cpu_pct") for r in sorted(ok, key=lambda r: r["round"])],
                    failed=sum(r.get("failed", 0) for r in ok),
                )
            elif marks:
                cell.update(status=marks[0]["status"], note=marks[0].get("note", ""))
            else:
                cell.update(status="error", note=errs[0].get("note", ""))
            if errs:
                cell["error_note"] = errs[0].get("note", "")
            cells[(w, t)] = cell
    return cells


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def fx(v):
    return f"{v:.2f}×" if v is not None else "n/a"


def render(records, memory, meta):
    cells = summarize(records)
    out = []
    if meta:
        out.append("## Setup\n")
        for k, v in meta.items():
            out.append(f"- {k}: {v}")
        out.append("")
    runs = [r for r in records if r.get("status") in ("ok", "error")]
    busy = [r for r in runs if disturbed(r)]
    if busy:
        out.append(
            f"**Warning: in {len(busy)} of {len(runs)} runs other processes on the machine used more than "
            f"{OTHER_CPU_WARN_PCT}% of the CPUs (marked * in the per-round table); those numbers are not "
            f"comparable.**\n"
        )
    checks = []
    if cells:
        out.append("## Throughput and latency (medians over rounds)\n")
        out.append("| workload | target | tps | avg ms | p99 ms |")
        out.append("|---|---|---:|---:|---:|")
        for w, wname in WORKLOADS:
            if not any(k[0] == w for k in cells):
                continue
            for t, tname in TARGETS:
                c = cells.get((w, t))
                if c is None:
                    continue
                if c["status"] == "ok":
                    extra = f" ({c['errors']} of rounds failed)" if c["errors"] else ""
                    out.append(
                        f"| {wname} | {tname}{extra} | {c['tps']:.0f} | {c['avg_ms']:.3f} | {c['p99_ms']:.3f} |"
                    )
                else:
                    label = c["status"]
                    note = f" ({c.get('note')})" if c.get("note") else ""
                    out.append(f"| {wname} | {tname} | {label} | {label} | {label}{note} |")
            sw, pb, di = cells.get((w, "pgswitch")), cells.get((w, "pgbouncer")), cells.get((w, "direct"))
            okc = lambda c: c if c and c["status"] == "ok" else None
            sw, pb, di = okc(sw), okc(pb), okc(di)
            for other, oname in ((pb, "PgBouncer"), (di, "direct")):
                if sw is None:
                    continue
                g = lambda c, k: c[k] if c else None
                rt = ratio(g(sw, "tps"), g(other, "tps"))
                ra = ratio(g(sw, "avg_ms"), g(other, "avg_ms"))
                rp = ratio(g(sw, "p99_ms"), g(other, "p99_ms"))
                out.append(f"| {wname} | *pgswitch/{oname}* | *{fx(rt)}* | *{fx(ra)}* | *{fx(rp)}* |")
            # target checks (a pgswitch error on a workload counts as a failure)
            sw_status = (cells.get((w, "pgswitch")) or {}).get("status")
            if sw_status in ("ok", "error"):
                fail_if_err = lambda v, ok: False if sw_status == "error" else (None if v is None else ok)
                if pb is not None:
                    rt = ratio(sw and sw["tps"], pb["tps"])
                    checks.append((f"{wname}: tps ≥ {TPS_VS_PGBOUNCER_MIN:.2f}× PgBouncer", rt,
                                   fail_if_err(rt, rt is not None and rt >= TPS_VS_PGBOUNCER_MIN)))
                    rp = ratio(sw and sw["p99_ms"], pb["p99_ms"])
                    checks.append((f"{wname}: p99 ≤ PgBouncer's", rp,
                                   fail_if_err(rp, rp is not None and rp <= 1.0)))
                elif sw_status == "error":
                    checks.append((f"{wname}: runs through pgswitch", None, False))
                direct_min = {"select": TPS_VS_DIRECT_MIN_SELECT,
                              "select-prepared": TPS_VS_DIRECT_MIN_PREPARED}.get(w)
                if direct_min is not None and di is not None:
                    rd = ratio(sw and sw["tps"], di["tps"])
                    checks.append((f"{wname}: tps ≥ {direct_min:.2f}× direct", rd,
                                   fail_if_err(rd, rd is not None and rd >= direct_min)))
        out.append("")
        out.append("Per-round tps (round order rotates the targets):\n")
        out.append("| workload | target | tps by round | p99 ms by round | other processes' CPU % by round |")
        out.append("|---|---|---|---|---|")
        for w, wname in WORKLOADS:
            for t, tname in TARGETS:
                c = cells.get((w, t))
                if c and c["status"] == "ok":
                    out.append(
                        f"| {wname} | {tname} | {', '.join(c['tps_rounds_fmt'])} | "
                        f"{', '.join(f'{v:.2f}' for v in c['p99_rounds'])} | "
                        f"{', '.join('?' if v is None else f'{v:.0f}' for v in c['other_rounds'])} |"
                    )
        cpu_rows = []
        for w, wname in WORKLOADS:
            per = {}
            for t, tname in TARGETS:
                ok = [r for r in records if r["workload"] == w and r["target"] == t
                      and r.get("status") == "ok" and r.get("proxy_user_us_per_tx") is not None]
                if not ok:
                    continue
                user = med([r["proxy_user_us_per_tx"] for r in ok])
                system = med([r["proxy_sys_us_per_tx"] for r in ok])
                vol = med([r["proxy_vol_cs_per_tx"] for r in ok])
                invol = med([r["proxy_invol_cs_per_tx"] for r in ok])
                per[t] = user + system
                cpu_rows.append(f"| {wname} | {tname} | {user:.2f} | {system:.2f} | {user + system:.2f} | "
                                f"{vol:.3f} | {invol:.3f} |")
            if "pgswitch" in per and "pgbouncer" in per:
                r = ratio(per["pgswitch"], per["pgbouncer"])
                cpu_rows.append(f"| {wname} | *pgswitch/PgBouncer* | | | *{fx(r)}* | | |")
                checks.append((f"{wname}: proxy CPU per transaction ≤ {CPU_PER_TX_VS_PGBOUNCER_MAX:.2f}× PgBouncer's",
                               r, r is not None and r <= CPU_PER_TX_VS_PGBOUNCER_MAX))
        if cpu_rows:
            out.append("")
            out.append("The proxy's own CPU per transaction (user + system of its process, from /proc, "
                       "medians over rounds; context switches of all its threads):\n")
            out.append("| workload | target | user µs | system µs | total µs | voluntary cs | involuntary cs |")
            out.append("|---|---|---:|---:|---:|---:|---:|")
            out.extend(cpu_rows)
        errs = [(w, t, c["error_note"]) for (w, t), c in cells.items() if c.get("error_note")]
        if errs:
            out.append("")
            out.append("Errors:\n")
            for w, t, n in errs:
                out.append(f"- {w} / {t}: {n}")
        out.append("")
    if memory:
        out.append("## Memory: idle clients\n")
        out.append("| target | client connection | clients logged in | RSS before (KiB) | RSS after (KiB) "
                   "| KiB per idle client |")
        out.append("|---|---|---:|---:|---:|---:|")
        kib = {}  # (target, transport) -> KiB per idle client, when every client logged in
        tls_kpc = None
        for m in memory:
            name = dict(TARGETS).get(m["target"], m["target"])
            transport = m.get("transport", "plain")  # records from before the TLS row are plain
            conn = dict(TRANSPORTS).get(transport, transport)
            if m.get("status", "ok") != "ok":
                out.append(f"| {name} | {conn} | {m.get('status')} ({m.get('note') or ''}) | | | |")
                continue
            kpc = m.get("kib_per_client")
            all_in = m["logged_in"] == m["clients"]
            if kpc is not None:
                out.append(f"| {name} | {conn} | {m['logged_in']}/{m['clients']} | {m['rss_before_kib']} | "
                           f"{m['rss_after_kib']} | {kpc:.2f} |")
            else:
                out.append(f"| {name} | {conn} | {m['logged_in']}/{m['clients']} | | | n/a |")
            if kpc is not None and all_in:
                kib[(m["target"], transport)] = kpc
            if m["target"] == "pgswitch":
                if transport == "plain":
                    for limit in (KIB_PER_IDLE_CLIENT_MAX, KIB_PER_IDLE_CLIENT_GOAL):
                        checks.append((f"idle client memory ≤ {limit:g} KiB", kpc,
                                       None if kpc is None else (kpc <= limit and all_in)))
                else:
                    tls_kpc = kpc
        for transport, conn in TRANSPORTS:
            r = ratio(kib.get(("pgswitch", transport)), kib.get(("pgbouncer", transport)))
            if r is not None:
                out.append(f"| *pgswitch/PgBouncer* | {conn} | | | | *{fx(r)}* |")
            if transport == "tls" and tls_kpc is not None:  # reported, no target
                vs = f", {fx(r)} PgBouncer's" if r is not None else ""
                checks.append((f"idle client memory over TLS (no target{vs})", tls_kpc, "info"))
        out.append("")
    if checks:
        out.append("## Targets (pgswitch)\n")
        out.append("| target | measured | result |")
        out.append("|---|---:|---|")
        for name, v, ok in checks:
            if "memory" in name:
                val = f"{v:.2f} KiB" if v is not None else "n/a"
            else:
                val = fx(v) if v is not None or ok is not False else "error"
            res = "n/a" if ok is None else "—" if ok == "info" else "PASS" if ok else "FAIL"
            out.append(f"| {name} | {val} | {res} |")
        out.append("")
    return "\n".join(out)


def cmd_report(a):
    records = load(a.results)
    memory = load(a.memory)
    meta = json.load(open(a.meta)) if a.meta and os.path.exists(a.meta) else {}
    text = render(records, memory, meta)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write((a.title + "\n\n" if a.title else "") + text + "\n")
    return 0


def main():
    ap = argparse.ArgumentParser(description="pgbench comparison helpers")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("parse")
    p.add_argument("--log-prefix", required=True)
    p.add_argument("--stdout", required=True)
    p.add_argument("--rc", type=int, default=0)
    p.add_argument("--workload", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--round", type=int, required=True)
    p.add_argument("--busy", type=int, default=None, help="CPU %% busy just before the run")
    p.add_argument("--cpu-before", default="", help="cpu-snapshot output taken before the run")
    p.add_argument("--cpu-after", default="", help="cpu-snapshot output taken after the run")
    p.add_argument("--proc-before", default="", help="proc-snapshot of the proxy before the run")
    p.add_argument("--proc-after", default="", help="proc-snapshot of the proxy after the run")
    p.add_argument("--results", required=True)
    p.set_defaults(fn=cmd_parse)
    p = sub.add_parser("proc-snapshot")
    p.add_argument("pid", type=int)
    p.set_defaults(fn=cmd_proc_snapshot)
    p = sub.add_parser("cpu-snapshot")
    p.add_argument("pids", type=int, nargs="*")
    p.set_defaults(fn=cmd_cpu_snapshot)
    p = sub.add_parser("disturbed")
    p.add_argument("file")
    p.set_defaults(fn=cmd_disturbed)
    p = sub.add_parser("mark")
    p.add_argument("--workload", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--status", required=True)
    p.add_argument("--note", default="")
    p.add_argument("--results", required=True)
    p.set_defaults(fn=cmd_mark)
    p = sub.add_parser("memory")
    p.add_argument("--target", required=True)
    p.add_argument("--transport", choices=[t for t, _ in TRANSPORTS], default="plain",
                   help="client connection: plain TCP or client TLS")
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--logged-in", type=int, default=0)
    p.add_argument("--rss-before", type=int)
    p.add_argument("--rss-after", type=int)
    p.add_argument("--hwm", type=int)
    p.add_argument("--status", default="ok")
    p.add_argument("--note", default="")
    p.add_argument("--results", required=True)
    p.set_defaults(fn=cmd_memory)
    p = sub.add_parser("report")
    p.add_argument("--results")
    p.add_argument("--memory")
    p.add_argument("--meta")
    p.add_argument("--out")
    p.add_argument("--title", default="")
    p.set_defaults(fn=cmd_report)
    a = ap.parse_args()
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
