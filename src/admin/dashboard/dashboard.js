// pgswitch dashboard. No library, no build step: the admin server embeds
// this file. The admin token is asked for in a form, kept in this tab's
// sessionStorage (never in the page or a URL) and sent as
// `Authorization: Bearer` with every data call.
"use strict";

(function () {
  const TOKEN_KEY = "pgswitch.admin_token";
  const POLL_MS = 1000;
  const WINDOW_MS = 5 * 60 * 1000; // the charts show the last 5 minutes
  const SVG_NS = "http://www.w3.org/2000/svg";
  // Phases a switch runs while new transactions wait at the gate, and the
  // ones that run side by side (their bars overlap).
  const IN_PAUSE = new Set(["drain", "catch_up", "sequences", "reverse", "fence", "persist"]);
  const CONCURRENT = new Set(["sequences", "reverse", "fence"]);

  const $ = (id) => document.getElementById(id);
  let token = null;
  let status = null;
  let lagHistory = []; // {at, bytes, seconds, from}
  let traffic = []; // {at, tps, eps}
  let lastCounters = null;
  let lastSwitchSeen;
  let historyShown = "";
  let pollTimer = null;
  let busy = false;

  // ------------------------------------------------------------ token

  function loadToken() {
    try { return sessionStorage.getItem(TOKEN_KEY); } catch (_) { return null; }
  }
  function saveToken(t) {
    try { sessionStorage.setItem(TOKEN_KEY, t); } catch (_) { /* kept in memory only */ }
  }
  function forgetToken() {
    token = null;
    try { sessionStorage.removeItem(TOKEN_KEY); } catch (_) { /* nothing kept */ }
  }

  function showLogin(message) {
    stopPolling();
    const err = $("login-error");
    err.textContent = message || "";
    err.hidden = !message;
    $("login").hidden = false;
    $("token-input").value = "";
    $("token-input").focus();
  }

  // ------------------------------------------------------------- HTTP

  class Unauthorized extends Error {}

  async function api(method, path, body) {
    const headers = { "Accept": "application/json" };
    if (token) headers["Authorization"] = "Bearer " + token;
    const init = { method, headers, cache: "no-store", credentials: "omit" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    if (response.status === 401) throw new Unauthorized("the admin API refused the token");
    let json = null;
    try { json = await response.json(); } catch (_) { /* not JSON */ }
    return { status: response.status, json };
  }

  // ------------------------------------------------------------ formatting

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    if (attrs) {
      for (const [k, v] of Object.entries(attrs)) {
        if (v === undefined || v === null || v === false) continue;
        if (k === "text") node.textContent = v;
        else if (k === "class") node.className = v;
        else node.setAttribute(k, v === true ? "" : v);
      }
    }
    for (const c of children || []) {
      if (c !== null && c !== undefined) node.append(c);
    }
    return node;
  }
  function svg(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    return node;
  }
  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "kB", "MB", "GB", "TB"];
    let i = 0;
    let v = n;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (i === 0 ? String(v) : v.toFixed(v < 10 ? 1 : 0)) + " " + units[i];
  }
  function ms(v) {
    if (v === null || v === undefined) return "–";
    if (v >= 10000) return (v / 1000).toFixed(1) + " s";
    if (v >= 100) return Math.round(v) + " ms";
    if (v >= 10) return v.toFixed(1) + " ms";
    return v.toFixed(2) + " ms";
  }
  function rate(v) {
    if (v === null || v === undefined) return "–";
    return v >= 100 ? String(Math.round(v)) : v.toFixed(1);
  }
  function clock(unixMs) {
    const d = new Date(unixMs);
    return d.toLocaleString(undefined, { year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }
  function badge(text, kind) {
    return el("span", { class: "badge badge-" + (kind || text), text: String(text).replace("_", " ") });
  }

  // ------------------------------------------------------------- polling

  function stopPolling() {
    if (pollTimer) clearTimeout(pollTimer);
    pollTimer = null;
  }

  async function start() {
    $("login").hidden = true;
    stopPolling();
    lagHistory = [];
    traffic = [];
    lastCounters = null;
    lastSwitchSeen = undefined;
    try {
      await refreshStatus();
      await Promise.all([loadLag(), refreshHistory()]);
    } catch (e) {
      if (e instanceof Unauthorized) {
        forgetToken();
        showLogin("Wrong token: the admin API answered 401.");
        return;
      }
      setConn(false, e.message);
    }
    schedule();
  }

  function schedule() {
    stopPolling();
    pollTimer = setTimeout(tick, POLL_MS);
  }

  async function tick() {
    try {
      await refreshStatus();
    } catch (e) {
      if (e instanceof Unauthorized) {
        forgetToken();
        showLogin("The admin API refused the token.");
        return;
      }
      setConn(false, "no answer: " + e.message);
    }
    schedule();
  }

  function setConn(ok, text) {
    const c = $("conn-state");
    c.className = "conn-state " + (ok ? "ok" : "bad");
    c.textContent = text;
  }

  async function loadLag() {
    const { status: code, json } = await api("GET", "/lag");
    if (code !== 200 || !Array.isArray(json)) return;
    const seen = new Set(lagHistory.map((s) => s.at));
    const older = json
      .filter((s) => !seen.has(s.at_unix_ms))
      .map((s) => ({ at: s.at_unix_ms, bytes: s.bytes, seconds: s.seconds, from: s.from }));
    lagHistory = older.concat(lagHistory).sort((a, b) => a.at - b.at);
    drawLag();
  }

  async function refreshStatus() {
    const { status: code, json } = await api("GET", "/status");
    if (code !== 200 || !json) throw new Error("GET /status answered " + code);
    status = json;
    const now = Date.now();
    setConn(true, "live · " + new Date(now).toLocaleTimeString());
    renderSummary();
    recordLag(now);
    recordTraffic(now);
    renderPools();
    if (json.last_switch_at_ms !== lastSwitchSeen) {
      if (lastSwitchSeen !== undefined) refreshHistory().catch(() => {});
      lastSwitchSeen = json.last_switch_at_ms;
    }
  }

  // ------------------------------------------------------------- summary

  function renderSummary() {
    const side = status.active || "unknown";
    const a = $("active-side");
    a.textContent = side;
    a.className = "side-badge side-" + side;
    a.setAttribute("data-side", side);
    $("phase").textContent = status.phase || "idle";
    const g = $("gate");
    if (status.paused) {
      g.textContent = "closed (" + (status.paused_by || []).join(", ") + ")";
      g.className = "value gate-closed";
    } else {
      g.textContent = "open";
      g.className = "value";
    }
    const idle = (status.phase || "idle") === "idle";
    $("btn-cutover").disabled = busy || !idle || side !== "blue";
    $("btn-fallback").disabled = busy || !idle || side !== "green";
    $("btn-dry-run").disabled = busy || !idle;
    $("btn-dry-run").textContent = side === "green" ? "Dry run (fallback)" : "Dry run";
    const operatorHold = (status.paused_by || []).includes("operator");
    $("btn-pause").disabled = busy || operatorHold;
    $("btn-resume").disabled = busy || !operatorHold;
  }

  // ------------------------------------------------------------- lag chart

  function recordLag(now) {
    const lag = status.replication_lag;
    lagHistory.push({
      at: now,
      from: status.active,
      bytes: lag ? lag.bytes : null,
      seconds: lag ? lag.seconds : null,
    });
    lagHistory = lagHistory.filter((s) => s.at >= now - WINDOW_MS);
    const other = status.active === "blue" ? "green" : "blue";
    $("lag-direction").textContent = status.active ? status.active + " → " + other : "";
    $("lag-bytes").textContent = lag ? bytes(lag.bytes) : "–";
    $("lag-seconds").textContent = lag && lag.seconds !== null && lag.seconds !== undefined ? ms(lag.seconds * 1000) : "–";
    $("lag-streaming").textContent = lag ? (lag.streaming ? "streaming" : "not streaming") : "no replication";
    drawLag();
  }

  function drawLag() {
    const now = Date.now();
    const points = lagHistory.filter((s) => s.at >= now - WINDOW_MS);
    drawChart($("lag-chart"), {
      now,
      series: [{ points: points.map((s) => [s.at, s.bytes]), line: "line-lag", area: "area-lag" }],
      format: bytes,
      unit: 1024,
      empty: "No reading yet (the active side needs admin credentials and a slot).",
      marks: switchMarks(points),
    });
  }

  // Where the publishing side changed: a cutover or fallback.
  function switchMarks(points) {
    const marks = [];
    for (let i = 1; i < points.length; i++) {
      if (points[i].from && points[i - 1].from && points[i].from !== points[i - 1].from) {
        marks.push({ at: points[i].at, label: "→ " + points[i].from });
      }
    }
    return marks;
  }

  // ------------------------------------------------------------- traffic

  function recordTraffic(now) {
    const c = status.counters;
    if (!c) return;
    if (lastCounters) {
      const dt = (now - lastCounters.at) / 1000;
      if (dt > 0.2) {
        const d = (k) => Math.max(0, (c[k] - lastCounters[k]) / dt);
        traffic.push({ at: now, tps: d("transactions"), qps: d("queries"), eps: d("errors") });
        lastCounters = Object.assign({ at: now }, c);
      }
    } else {
      lastCounters = Object.assign({ at: now }, c);
    }
    traffic = traffic.filter((s) => s.at >= now - WINDOW_MS);
    drawTraffic(now);
  }

  function drawTraffic(now) {
    const last = traffic[traffic.length - 1];
    $("tps").textContent = last ? rate(last.tps) : "–";
    $("qps").textContent = last ? rate(last.qps) : "–";
    $("eps").textContent = last ? rate(last.eps) : "–";
    drawChart($("traffic-chart"), {
      now,
      series: [
        { points: traffic.map((s) => [s.at, s.tps]), line: "line-tps" },
        { points: traffic.map((s) => [s.at, s.eps]), line: "line-err" },
      ],
      format: rate,
      empty: "Measuring…",
      marks: [],
    });
  }

  // A time chart over the last WINDOW_MS, drawn as inline SVG at the
  // container's pixel size (text stays crisp on any screen).
  function drawChart(container, { now, series, format, empty, marks, unit }) {
    const w = Math.max(200, container.clientWidth);
    const h = Math.max(80, container.clientHeight);
    const pad = { l: 64, r: 10, t: 8, b: 20 };
    const root = svg("svg", { width: w, height: h, viewBox: `0 0 ${w} ${h}` });
    const x = (t) => pad.l + ((t - (now - WINDOW_MS)) / WINDOW_MS) * (w - pad.l - pad.r);
    let max = 0;
    let any = false;
    for (const s of series) {
      for (const [, v] of s.points) {
        if (v !== null && v !== undefined) { any = true; max = Math.max(max, v); }
      }
    }
    // A round top in the axis's own unit (1024 for bytes).
    const base = unit && max > 0 ? Math.pow(unit, Math.floor(Math.log(max) / Math.log(unit))) : 1;
    max = niceMax(max / base) * base;
    const y = (v) => pad.t + (1 - v / max) * (h - pad.t - pad.b);
    for (let i = 0; i <= 2; i++) {
      const v = (max * i) / 2;
      root.append(svg("line", { class: "grid-line", x1: pad.l, x2: w - pad.r, y1: y(v), y2: y(v) }));
      const label = svg("text", { class: "axis-text", x: pad.l - 6, y: y(v) + 4, "text-anchor": "end" });
      label.textContent = format(v);
      root.append(label);
    }
    for (const [t, text] of [[now - WINDOW_MS, "−5 min"], [now - WINDOW_MS / 2, "−2.5 min"], [now, "now"]]) {
      const label = svg("text", { class: "axis-text", x: x(t), y: h - 4, "text-anchor": t === now ? "end" : (t === now - WINDOW_MS ? "start" : "middle") });
      label.textContent = text;
      root.append(label);
    }
    for (const m of marks) {
      root.append(svg("line", { class: "switch-mark", x1: x(m.at), x2: x(m.at), y1: pad.t, y2: h - pad.b }));
      const right = x(m.at) > w - 80;
      const label = svg("text", { class: "axis-text", x: x(m.at) + (right ? -4 : 4), y: pad.t + 11, "text-anchor": right ? "end" : "start" });
      label.textContent = m.label;
      root.append(label);
    }
    if (!any) {
      const t = svg("text", { class: "empty-text", x: pad.l + 8, y: (h - pad.b) / 2 + 4 });
      t.textContent = empty;
      root.append(t);
    }
    for (const s of series) {
      // Split the line where a reading is missing.
      const runs = [];
      let run = [];
      for (const [t, v] of s.points) {
        if (v === null || v === undefined) { if (run.length) runs.push(run); run = []; } else run.push([x(t), y(v)]);
      }
      if (run.length) runs.push(run);
      for (const r of runs) {
        const d = r.map(([px, py], i) => (i ? "L" : "M") + px.toFixed(1) + " " + py.toFixed(1)).join(" ");
        if (s.area && r.length > 1) {
          const base = y(0).toFixed(1);
          root.append(svg("path", { class: "area " + s.area, d: d + ` L${r[r.length - 1][0].toFixed(1)} ${base} L${r[0][0].toFixed(1)} ${base} Z` }));
        }
        root.append(svg("path", { class: "line " + s.line, d: r.length > 1 ? d : d + " l1 0" }));
      }
    }
    container.replaceChildren(root);
  }

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
    return 10 * p;
  }

  // ------------------------------------------------------------- pools

  function renderPools() {
    $("clients-total").textContent = "· " + status.clients + " client" + (status.clients === 1 ? "" : "s") + " connected";
    const backends = $("backends");
    backends.className = "backends";
    backends.replaceChildren(...Object.entries(status.backends || {}).map(([side, b]) => {
      const state = b.reachable === true ? "up" : b.reachable === false ? "down" : "unknown";
      const servers = (status.pools || []).filter((p) => p.backend === side).reduce((n, p) => n + p.stats.open, 0);
      return el("span", { class: "backend", title: b.last_error || "" }, [
        badge(side, side), el("code", { text: b.addr }), badge(state === "unknown" ? "not checked" : state, state),
        el("span", { class: "muted", text: servers + " server conn." }),
      ]);
    }));
    const rows = (status.pools || []).map((p) => el("tr", null, [
      el("td", null, [badge(p.backend, p.backend)]),
      el("td", { text: p.database + " / " + p.user }),
      el("td", { class: "num", text: p.stats.active }),
      el("td", { class: "num", text: p.stats.waiting }),
      el("td", { class: "num", text: p.stats.open }),
      el("td", { class: "num", text: p.stats.idle }),
      el("td", { class: "num", text: p.stats.size }),
    ]));
    if (!rows.length) rows.push(el("tr", null, [el("td", { colspan: 7, class: "muted", text: "no pool yet" })]));
    $("pools").replaceChildren(...rows);
  }

  // ------------------------------------------------------------- history

  async function refreshHistory() {
    const { status: code, json } = await api("GET", "/cutovers");
    if (code !== 200 || !Array.isArray(json)) return;
    const key = JSON.stringify(json);
    if (key === historyShown) return;
    historyShown = key;
    const reports = json.slice().reverse(); // newest first
    const box = $("history");
    if (!reports.length) {
      box.replaceChildren(el("p", { class: "muted", text: "No cutover or fallback yet." }));
      return;
    }
    const recent = reports.slice(0, 3).map(renderReport);
    const older = reports.slice(3);
    if (older.length) {
      recent.push(el("details", { class: "older" }, [
        el("summary", { text: older.length + " older" }),
        ...older.map(renderReport),
      ]));
    }
    box.replaceChildren(...recent);
  }

  function renderReport(r) {
    const head = el("div", { class: "cutover-head" }, [
      el("span", { class: "what", text: (r.dry_run ? "dry run of " : "") + r.kind + " " + r.from + " → " + r.to }),
      badge(r.outcome),
      el("span", { class: "pause", text: r.pause_ms !== null && r.pause_ms !== undefined ? "pause " + ms(r.pause_ms) : "no pause" }),
      el("span", { class: "muted", text: clock(r.started_at_unix_ms) }),
      r.sequences_synced ? el("span", { class: "muted", text: r.sequences_synced + (r.sequences_synced === 1 ? " sequence" : " sequences") + " synced" }) : null,
    ]);
    return el("article", { class: "cutover", "data-outcome": r.outcome, "data-kind": r.kind }, [
      head,
      r.reason ? el("p", { class: "reason", text: r.reason }) : null,
      timeline(r),
    ]);
  }

  // Phases on a common time axis: each after the previous one, except
  // sequences, reverse and fence, which run side by side. The pause (from
  // the start of drain for pause_ms) is the shaded band. Each part of the
  // axis (before the pause, the pause, after it) has its own scale, the
  // pause the widest, so that its milliseconds are readable next to a
  // preflight a hundred times longer.
  function timeline(r) {
    const phases = r.phases || [];
    let t = 0;
    let groupStart = null;
    let groupEnd = 0;
    let pausedFrom = null;
    const placed = phases.map((p) => {
      const paused = p.in_pause !== undefined ? p.in_pause : IN_PAUSE.has(p.name);
      if (p.name === "drain" && r.pause_ms) pausedFrom = t;
      // A phase after the pause starts when the gate opened (the swap
      // between persist and the release is not a phase of its own).
      if (!paused && pausedFrom !== null) {
        if (groupStart !== null) { t = groupEnd; groupStart = null; }
        t = Math.max(t, pausedFrom + r.pause_ms);
      }
      let start;
      if (CONCURRENT.has(p.name)) {
        if (groupStart === null) { groupStart = t; groupEnd = t; }
        start = groupStart;
        groupEnd = Math.max(groupEnd, start + p.ms);
      } else {
        if (groupStart !== null) { t = groupEnd; groupStart = null; }
        start = t;
        t += p.ms;
      }
      return { name: p.name, ms: p.ms, start, paused };
    });
    if (groupStart !== null) t = groupEnd;
    const drain = placed.find((p) => p.name === "drain");
    const pauseStart = drain && r.pause_ms ? drain.start : null;
    const total = Math.max(t, pauseStart !== null ? pauseStart + r.pause_ms : 0, 0.001);
    // Segments of the axis, each with its share of the width: before the
    // pause, the pause, and what ran after it (waiting for the reverse
    // subscription to stream), with a small gap between them.
    const GAP = 2;
    const segments = [];
    if (pauseStart !== null) {
      const pauseEnd = pauseStart + r.pause_ms;
      const after = total - pauseEnd > 0.0005;
      if (pauseStart > 0) segments.push({ from: 0, to: pauseStart, width: after ? 30 : 36, label: "before the pause · " + ms(pauseStart) });
      segments.push({ from: pauseStart, to: pauseEnd, width: 0, label: "pause · " + ms(r.pause_ms), pause: true });
      if (after) segments.push({ from: pauseEnd, to: total, width: 18, label: "after · " + ms(total - pauseEnd) });
      const others = segments.reduce((n, g) => n + g.width, 0);
      segments.find((g) => g.pause).width = 100 - others - GAP * (segments.length - 1);
    } else {
      segments.push({ from: 0, to: total, width: 100, label: null });
    }
    let left = 0;
    for (const g of segments) { g.left = left; left += g.width + GAP; }
    const at = (v) => {
      for (const g of segments) {
        if (v <= g.to || g === segments[segments.length - 1]) {
          const span = Math.max(g.to - g.from, 0.000001);
          return g.left + Math.min(1, Math.max(0, (v - g.from) / span)) * g.width;
        }
      }
      return 100;
    };
    const place = (node, from, to) => {
      const l = Math.min(100, Math.max(0, at(from)));
      node.style.left = l + "%";
      node.style.width = Math.max(0, Math.min(100, at(to)) - l) + "%";
    };
    const split = segments.length > 1;
    const grid = el("div", { class: "timeline", "data-phases": placed.length });
    if (split) {
      const scale = el("div", { class: "tl-scale" });
      for (const g of segments) {
        const label = el("span", { class: g.pause ? "tl-scale-pause" : "tl-scale-other", text: g.label, title: g.label });
        label.style.left = g.left + "%";
        label.style.width = g.width + "%";
        scale.append(label);
      }
      grid.append(el("div"), scale, el("div"));
    }
    for (const p of placed) {
      const track = el("div", { class: "tl-track" });
      for (const g of segments.slice(1)) {
        const gap = el("div", { class: "tl-break" });
        gap.style.left = g.left - GAP + "%";
        gap.style.width = GAP + "%";
        track.append(gap);
      }
      if (pauseStart !== null) {
        const band = el("div", { class: "tl-pause" });
        place(band, pauseStart, pauseStart + r.pause_ms);
        track.append(band);
      }
      const bar = el("div", { class: "tl-bar" + (p.paused ? " in-pause" : ""), title: p.name + ": " + ms(p.ms) });
      place(bar, p.start, p.start + p.ms);
      track.append(bar);
      grid.append(el("div", { class: "tl-name", text: p.name.replace("_", " "), title: p.name }), track, el("div", { class: "tl-ms", text: ms(p.ms) }));
    }
    const legend = el("div", { class: "tl-legend" }, [
      "total " + ms(total),
      el("span", { class: "swatch swatch-other" }), "before the pause (traffic flows)",
      el("span", { class: "swatch swatch-pause" }), "inside the pause (new transactions wait)",
      split ? " · each part has its own scale" : null,
    ]);
    return el("div", null, [grid, legend]);
  }

  // ------------------------------------------------------------- checks

  async function runChecks() {
    const button = $("btn-check");
    button.disabled = true;
    $("check-note").textContent = "Running the checks on both servers…";
    try {
      const { status: code, json } = await api("GET", "/check");
      if (code !== 200 || !json || !Array.isArray(json.findings)) {
        $("check-note").textContent = "The checks could not run: " + ((json && json.error) || "HTTP " + code);
        return;
      }
      // Failures first, then warnings; the passes folded away.
      const order = { fail: 0, warn: 1, pass: 2 };
      const findings = json.findings.slice().sort((a, b) => (order[a.level] ?? 3) - (order[b.level] ?? 3));
      const rows = findings.map((f) => el("tr", { "data-level": f.level, class: f.level === "pass" ? "pass-row" : null }, [
        el("td", null, [badge(f.level)]),
        el("td", null, [el("code", { text: f.check })]),
        el("td", { text: f.side || "–" }),
        el("td", null, [el("div", { text: f.detail }), f.fix ? el("div", { class: "fix", text: "fix: " + f.fix }) : null]),
      ]));
      $("checks").replaceChildren(...rows);
      const table = $("check-table");
      table.hidden = false;
      table.classList.remove("show-pass");
      const passed = findings.filter((f) => f.level === "pass").length;
      const toggle = $("btn-show-pass");
      toggle.hidden = passed === 0;
      toggle.textContent = "Show the " + passed + " passed";
      const count = (l) => json.findings.filter((f) => f.level === l).length;
      $("check-note").textContent = `Checked at ${new Date().toLocaleTimeString()}: ${count("pass")} pass, ${count("warn")} warn, ${count("fail")} fail.`;
    } catch (e) {
      if (e instanceof Unauthorized) { forgetToken(); showLogin("The admin API refused the token."); return; }
      $("check-note").textContent = "The checks could not run: " + e.message;
    } finally {
      button.disabled = false;
    }
  }

  // ------------------------------------------------------------- actions

  const ACTIONS = {
    cutover: () => ({
      title: "Cut over to green?",
      text: "New transactions wait at the gate while running ones finish, green catches up, and all traffic moves from blue to green.",
      method: "POST", path: "/cutover", body: {},
    }),
    fallback: () => ({
      title: "Fall back to blue?",
      text: "New transactions wait at the gate while running ones finish, blue catches up, and all traffic moves from green back to blue.",
      method: "POST", path: "/fallback", body: {},
    }),
    dry_run: () => {
      const fallback = status && status.active === "green";
      return {
        title: "Dry run of the " + (fallback ? "fallback" : "cutover") + "?",
        text: "Runs the checks, pauses new transactions, drains and catches up, then resumes on the same side. Nothing switches.",
        method: "POST", path: fallback ? "/fallback" : "/cutover", body: { dry_run: true },
      };
    },
    pause: () => ({
      title: "Pause new transactions?",
      text: "New transactions wait at the gate until you resume. Running transactions finish.",
      method: "POST", path: "/pause",
    }),
    resume: () => ({
      title: "Resume?",
      text: "Releases the transactions waiting at the gate.",
      method: "POST", path: "/resume",
    }),
  };

  let pending = null;

  function ask(name) {
    const action = ACTIONS[name]();
    pending = { name, action };
    $("confirm-title").textContent = action.title;
    $("confirm-text").textContent = action.text;
    $("confirm-yes").textContent = { cutover: "Cut over", fallback: "Fall back", dry_run: "Start dry run", pause: "Pause", resume: "Resume" }[name];
    $("confirm").hidden = false;
    $("confirm-no").focus();
  }

  function closeConfirm() {
    $("confirm").hidden = true;
    pending = null;
  }

  async function confirmed() {
    if (!pending) return;
    const { name, action } = pending;
    closeConfirm();
    busy = true;
    if (status) renderSummary();
    showResult(action.title.replace("?", "") + " …", [el("p", { class: "muted", text: "Running." })]);
    try {
      const { status: code, json } = await api(action.method, action.path, action.body);
      if (name === "pause" || name === "resume") {
        showResult(name === "pause" ? "Paused" : "Resumed", [el("p", { text: code === 200 ? (json && json.paused ? "The gate is closed: new transactions wait." : "The gate is open.") : "HTTP " + code })]);
      } else if (json && json.outcome) {
        showResult("Last " + (json.dry_run ? "dry run" : json.kind), [reportSummary(json)]);
      } else {
        showResult("Failed", [el("p", { class: "error", text: (json && json.error) || "HTTP " + code })]);
      }
    } catch (e) {
      if (e instanceof Unauthorized) { forgetToken(); showLogin("The admin API refused the token."); return; }
      showResult("Failed", [el("p", { class: "error", text: e.message })]);
    } finally {
      busy = false;
    }
    try {
      await refreshStatus();
      await refreshHistory();
    } catch (_) { /* the next poll says */ }
  }

  function reportSummary(r) {
    const kv = el("div", { class: "kv" }, [
      el("span", null, ["outcome ", badge(r.outcome)]),
      el("span", null, [r.from + " → " + r.to]),
      el("span", null, ["pause ", el("b", { text: r.pause_ms !== null && r.pause_ms !== undefined ? ms(r.pause_ms) : "none" })]),
      r.target_lsn ? el("span", { class: "muted", text: "target LSN " + r.target_lsn }) : null,
      r.switch_lsn ? el("span", { class: "muted", text: "switch LSN " + r.switch_lsn }) : null,
    ]);
    const out = el("div", null, [kv]);
    if (r.reason) out.append(el("p", { class: "reason", text: "reason: " + r.reason }));
    for (const w of r.warnings || []) out.append(el("p", { class: "reason", text: "warning: " + w }));
    return out;
  }

  function showResult(title, children) {
    $("result").hidden = false;
    $("result-title").textContent = title;
    $("result-body").replaceChildren(...children);
  }

  // ------------------------------------------------------------- wiring

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      token = $("token-input").value;
      $("token-input").value = "";
      saveToken(token);
      start();
    });
    $("btn-logout").addEventListener("click", () => { forgetToken(); showLogin(""); });
    for (const button of document.querySelectorAll(".actions [data-action]")) {
      button.addEventListener("click", () => ask(button.getAttribute("data-action")));
    }
    $("confirm-no").addEventListener("click", closeConfirm);
    $("confirm-yes").addEventListener("click", confirmed);
    document.addEventListener("keydown", (e) => { if (e.key === "Escape" && !$("confirm").hidden) closeConfirm(); });
    $("btn-check").addEventListener("click", runChecks);
    $("btn-show-pass").addEventListener("click", () => {
      const shown = $("check-table").classList.toggle("show-pass");
      const passed = document.querySelectorAll("#checks .pass-row").length;
      $("btn-show-pass").textContent = (shown ? "Hide the " : "Show the ") + passed + " passed";
    });
    window.addEventListener("resize", () => { if (status) { drawLag(); drawTraffic(Date.now()); } });
    const kept = loadToken();
    if (kept !== null) {
      token = kept;
      start();
    } else {
      showLogin("");
    }
  });
})();
