// The A/B dashboard: polls ab/history (GET /ab/history) and draws it with uPlot.
// Every value from the server is untrusted: numbers pass Number.isFinite, strings are cut and written with
// textContent only (never as markup), arm names are read with hasOwnProperty (a "__proto__" arm is data).
// When every chart has drawn at least two points the page sets <html data-ready="true"> and its title
// (the headless-browser test waits for that).
"use strict";

(function () {
  const POLL_MS = 2000;
  const MAX_ARMS = 8;
  const MAX_TEXT = 300;
  const HISTORY_ROWS = 20;
  const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"];
  const ACTIONS = ["advance", "hold", "rollback", "done"];
  const charts = {};

  // -- reading untrusted data ------------------------------------------------------------------------

  function own(obj, key) {
    return obj !== null && typeof obj === "object" && Object.prototype.hasOwnProperty.call(obj, key)
      ? obj[key]
      : undefined;
  }
  function num(value) {
    return typeof value === "number" && Number.isFinite(value) ? value : null;
  }
  function text(value) {
    return typeof value === "string" ? value.slice(0, MAX_TEXT) : "";
  }
  function weightsOf(value, arms) {
    const out = {};
    for (const arm of arms) out[arm] = num(own(value, arm));
    return out;
  }

  function parseHistory(raw) {
    const armsRaw = own(raw, "arms");
    const arms = [];
    if (Array.isArray(armsRaw)) {
      for (const a of armsRaw) {
        const name = text(a);
        if (name && !arms.includes(name) && arms.length < MAX_ARMS) arms.push(name);
      }
    }
    const snapshots = [];
    const rawSnapshots = own(raw, "snapshots");
    for (const s of Array.isArray(rawSnapshots) ? rawSnapshots : []) {
      const ts = num(own(s, "ts"));
      if (ts === null) continue;
      const perArm = {};
      for (const arm of arms) {
        const a = own(own(s, "arms"), arm);
        const lat = own(a, "latency_ms");
        perArm[arm] = {
          requests: num(own(a, "requests")),
          ctr: num(own(a, "ctr")),
          ctrLow: num(own(a, "ctr_low")),
          ctrHigh: num(own(a, "ctr_high")),
          feedback: num(own(a, "feedback")),
          p50: num(own(lat, "p50")),
          p95: num(own(lat, "p95")),
          p99: num(own(lat, "p99")),
        };
      }
      const c = own(s, "canary");
      const action = text(own(c, "action"));
      snapshots.push({
        ts: ts,
        arms: perArm,
        weights: weightsOf(own(s, "weights"), arms),
        canary: c ? { action: ACTIONS.includes(action) ? action : "", reason: text(own(c, "reason")),
          weights: weightsOf(own(c, "weights"), arms) } : null,
      });
    }
    snapshots.sort((x, y) => x.ts - y.ts);
    const changes = [];
    const rawChanges = own(raw, "weight_changes");
    for (const w of Array.isArray(rawChanges) ? rawChanges : []) {
      const ts = num(own(w, "ts"));
      if (ts !== null) changes.push({ ts: ts, weights: weightsOf(own(w, "weights"), arms) });
    }
    const steps = own(raw, "canary_steps");
    return {
      arms: arms,
      snapshots: snapshots,
      changes: changes,
      steps: Array.isArray(steps) ? steps.map(num).filter((v) => v !== null) : [],
    };
  }

  // -- drawing -----------------------------------------------------------------------------------------

  function color(i) {
    return PALETTE[i % PALETTE.length];
  }
  function fmtTime(ts) {
    return new Date(ts * 1000).toISOString().slice(11, 19);
  }
  function pct(v) {
    return v === null ? "-" : (100 * v).toFixed(1) + "%";
  }
  function weightsText(weights, arms) {
    return arms.map((a) => a + " " + pct(weights[a])).join(" / ");
  }
  function el(tag, content, className) {
    const node = document.createElement(tag);
    if (content !== undefined) node.textContent = content;
    if (className) node.className = className;
    return node;
  }

  // One uPlot per container, rebuilt only when its series change; its data replaced on every poll.
  function draw(id, series, data, extra) {
    const box = document.getElementById(id);
    const key = JSON.stringify(series.map((s) => s.label));
    const width = Math.max(300, box.clientWidth);
    let chart = charts[id];
    if (chart && chart.key !== key) {
      chart.plot.destroy();
      chart = undefined;
    }
    if (!chart) {
      const opts = Object.assign(
        { width: width, height: 240, series: [{}].concat(series), legend: { live: false } },
        extra || {}
      );
      chart = { key: key, plot: new uPlot(opts, data, box) };
      charts[id] = chart;
    } else {
      chart.plot.setData(data);
    }
    return data.slice(1).some((column) => column.filter((v) => v !== null).length >= 2) && data[0].length >= 2;
  }

  function line(label, stroke, dash, width) {
    return { label: label, stroke: stroke, width: width || 2, dash: dash, spanGaps: true, points: { show: false } };
  }

  function drawRequests(h, xs) {
    const series = h.arms.map((arm, i) => line(arm, color(i)));
    const data = [xs].concat(h.arms.map((arm) => h.snapshots.map((s) => s.arms[arm].requests)));
    return draw("chart-requests", series, data);
  }

  function drawCtr(h, xs) {
    const series = [];
    const data = [xs];
    const bands = [];
    h.arms.forEach((arm, i) => {
      const base = series.length + 1; // uPlot series indices start after x
      series.push(line(arm + " CTR", color(i)));
      series.push(line(arm + " low", color(i), [4, 4], 1));
      series.push(line(arm + " high", color(i), [4, 4], 1));
      data.push(h.snapshots.map((s) => s.arms[arm].ctr));
      data.push(h.snapshots.map((s) => s.arms[arm].ctrLow));
      data.push(h.snapshots.map((s) => s.arms[arm].ctrHigh));
      bands.push({ series: [base + 2, base + 1], fill: color(i) + "2e" });
    });
    return draw("chart-ctr", series, data, { bands: bands, scales: { y: { range: (u, lo, hi) => [0, Math.max(hi || 0, 0.01)] } } });
  }

  function drawLatency(h, xs) {
    const series = [];
    const data = [xs];
    h.arms.forEach((arm, i) => {
      [["p50", undefined, 2], ["p95", [6, 4], 1.5], ["p99", [2, 3], 1.5]].forEach(([q, dash, width]) => {
        series.push(line(arm + " " + q, color(i), dash, width));
        data.push(h.snapshots.map((s) => s.arms[arm][q]));
      });
    });
    return draw("chart-latency", series, data);
  }

  function drawWeights(h, xs) {
    const stepped = uPlot.paths.stepped({ align: 1 });
    const series = h.arms.map((arm, i) => Object.assign(line(arm, color(i)), { paths: stepped }));
    const data = [xs].concat(h.arms.map((arm) => h.snapshots.map((s) => s.weights[arm])));
    return draw("chart-weights", series, data, { scales: { y: { range: [0, 1] } } });
  }

  function showWeights(h) {
    const box = document.getElementById("weights");
    const last = h.snapshots[h.snapshots.length - 1];
    const rows = h.arms.map((arm, i) => {
      const share = last ? last.weights[arm] : null;
      const row = el("div", undefined, "weight-row");
      const name = el("span", undefined);
      const swatch = el("span", undefined, "swatch");
      swatch.style.background = color(i);
      name.append(swatch, document.createTextNode(arm));
      const track = el("div", undefined, "weight-track");
      const bar = el("div", undefined, "weight-bar");
      bar.style.background = color(i) + "99"; // paler than the chart lines
      bar.style.width = share === null ? "0" : Math.min(100, Math.max(0, 100 * share)) + "%";
      track.append(bar);
      row.append(name, track, el("span", pct(share), "weight-value"));
      return row;
    });
    box.replaceChildren(...rows);
  }

  function showCanary(h) {
    const box = document.getElementById("canary");
    const last = h.snapshots[h.snapshots.length - 1];
    const c = last && last.canary;
    const items = [];
    const add = (term, node) => items.push(el("dt", term), node);
    if (!c) {
      add("state", el("dd", "no canary (it needs exactly two arms and weights)"));
    } else {
      add("next move", el("dd", c.action || "?", "action action-" + (c.action || "unknown")));
      add("reason", el("dd", c.reason));
      add("would set", el("dd", weightsText(c.weights, h.arms)));
    }
    add("ramp steps", el("dd", h.steps.length ? h.steps.map(pct).join(" → ") : "-"));
    add("candidate", el("dd", h.arms[0] || "-"));
    box.replaceChildren(...items);
  }

  function showCanaryHistory(h) {
    const events = h.changes.map((w) => ({ ts: w.ts, event: "weights applied", detail: weightsText(w.weights, h.arms) }));
    let previous = "";
    for (const s of h.snapshots) {
      if (!s.canary) continue;
      // a new row when the move changes, not each time its reason's counts do
      const key = s.canary.action + "|" + weightsText(s.canary.weights, h.arms);
      if (key !== previous) {
        events.push({ ts: s.ts, event: "decision: " + (s.canary.action || "?"), detail: s.canary.reason });
        previous = key;
      }
    }
    events.sort((a, b) => b.ts - a.ts);
    const rows = events.slice(0, HISTORY_ROWS).map((e) => {
      const tr = el("tr");
      tr.append(el("td", fmtTime(e.ts)), el("td", e.event), el("td", e.detail));
      return tr;
    });
    document.querySelector("#canary-history tbody").replaceChildren(...rows);
  }

  function render(h) {
    const xs = h.snapshots.map((s) => s.ts);
    const drawn = [drawRequests(h, xs), drawCtr(h, xs), drawLatency(h, xs), drawWeights(h, xs)];
    showWeights(h);
    showCanary(h);
    showCanaryHistory(h);
    const status = document.getElementById("status");
    status.className = "";
    const last = h.snapshots[h.snapshots.length - 1];
    status.textContent =
      h.snapshots.length + " snapshots" + (last ? ", latest " + fmtTime(last.ts) + " UTC" : "") +
      "; polling every " + POLL_MS / 1000 + " s";
    if (drawn.every(Boolean) && document.documentElement.dataset.ready !== "true") {
      document.documentElement.dataset.ready = "true";
      document.title = "MARN A/B dashboard (ready)";
    }
  }

  // The operator key: from the URL fragment (dashboard#key=KEY; a fragment is never sent to a server),
  // then kept for this tab only and taken out of the address bar and the browser history.
  const KEY_STORE = "marn-operator-key";
  let refusal = null; // why the last key was dropped: shown until a new key is given
  function operatorKey() {
    const match = /(?:^#|&)key=([^&]+)/.exec(location.hash);
    if (match) {
      refusal = null;
      sessionStorage.setItem(KEY_STORE, decodeURIComponent(match[1]));
      history.replaceState(null, "", location.pathname + location.search);
    }
    return sessionStorage.getItem(KEY_STORE);
  }

  async function poll() {
    try {
      const key = operatorKey();
      if (!key) throw new Error(refusal || "needs the operator key: open dashboard#key=KEY (marn serve up keeps it in serve/keys.json)");
      const response = await fetch("ab/history", {
        cache: "no-store",
        headers: { accept: "application/json", authorization: "Bearer " + key },
      });
      if (response.status === 401 || response.status === 403) {
        sessionStorage.removeItem(KEY_STORE);
        refusal = "the key was refused (HTTP " + response.status + "): open dashboard#key=KEY with an operator key";
        throw new Error(refusal);
      }
      if (!response.ok) throw new Error("HTTP " + response.status);
      render(parseHistory(await response.json()));
    } catch (err) {
      const status = document.getElementById("status");
      status.className = "error";
      status.textContent = "cannot read ab/history: " + text(String(err && err.message));
    }
  }

  poll();
  setInterval(poll, POLL_MS);
})();
