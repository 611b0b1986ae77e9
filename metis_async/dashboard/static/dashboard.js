// metis-async dashboard: renders /api/events summaries and pages /api/learners.
// No inline code anywhere (the page's Content-Security-Policy forbids it), no innerHTML with
// data: learner ids, reasons and metric names are written as text only.
/* global Chart */
(function () {
  "use strict";

  const STATES = ["waiting", "training", "paused", "draining", "finished"];
  const TABLE_REFRESH_MS = 5000;
  const integer = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
  const decimal = new Intl.NumberFormat("en-US", { maximumFractionDigits: 2 });

  // ---- formatting ------------------------------------------------------------------------
  function fmtInt(v) { return v === null || v === undefined ? "—" : integer.format(v); }
  function fmtNum(v) { return v === null || v === undefined ? "—" : decimal.format(v); }
  function fmtBytes(v) {
    if (v === null || v === undefined) return "—";
    const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let i = 0;
    while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
    return (i === 0 ? integer.format(v) : v.toFixed(1)) + " " + units[i];
  }
  function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "—";
    const s = Math.max(0, Math.floor(seconds));
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600);
    const m = Math.floor((s % 3600) / 60), r = s % 60;
    const two = (n) => String(n).padStart(2, "0");
    if (d) return d + "d " + h + "h";
    if (h) return h + "h " + two(m) + "m";
    if (m) return m + "m " + two(r) + "s";
    return r + "s";
  }
  function fmtClock(unixSeconds) {
    const t = new Date(unixSeconds * 1000);
    const two = (n) => String(n).padStart(2, "0");
    return two(t.getHours()) + ":" + two(t.getMinutes()) + ":" + two(t.getSeconds());
  }
  function fmtPercent(part, whole) { return whole ? decimal.format((100 * part) / whole) + "%" : "—"; }

  // Writes the text and keeps the raw value in data-value, for people and tests alike.
  function show(id, value, text) {
    const el = document.getElementById(id);
    if (!el) return;
    el.textContent = text;
    el.dataset.value = value === null || value === undefined ? "" : String(value);
  }

  // ---- charts ----------------------------------------------------------------------------
  const css = getComputedStyle(document.documentElement);
  const color = (name) => css.getPropertyValue(name).trim();
  const palette = ["--chart-1", "--chart-2", "--chart-3", "--chart-4", "--chart-5", "--chart-6"].map(color);

  Chart.defaults.animation = false; // live data: redraw at once, spare the CPU
  Chart.defaults.color = color("--muted");
  Chart.defaults.borderColor = color("--line");
  Chart.defaults.font.family = getComputedStyle(document.body).fontFamily;
  Chart.defaults.maintainAspectRatio = false;

  // A new object per chart: Chart.js writes option changes (fitTime) into the object given.
  const timeAxis = () => ({
    type: "linear",
    ticks: { callback: (v) => fmtClock(v), maxTicksLimit: 7, maxRotation: 0 },
  });
  const timeTitle = (items) => {
    if (!items.length) return "";
    const raw = items[0].raw;
    return (raw.version !== undefined ? "v" + raw.version + " · " : "") + fmtClock(raw.x);
  };

  function lineChart(canvas, datasets, extraScales) {
    return new Chart(canvas, {
      type: "line",
      data: { datasets: datasets },
      options: {
        parsing: false,
        normalized: true,
        interaction: { mode: "nearest", axis: "x", intersect: false },
        elements: { point: { radius: 0, hitRadius: 6 }, line: { borderWidth: 2 } },
        scales: Object.assign({ x: timeAxis(), y: { ticks: { precision: 0 } } }, extraScales || {}),
        plugins: {
          legend: { display: datasets.length > 1, labels: { boxWidth: 12 } },
          tooltip: { callbacks: { title: timeTitle } },
        },
      },
    });
  }

  function barChart(canvas, label, horizontal) {
    return new Chart(canvas, {
      type: "bar",
      data: { labels: [], datasets: [{ label: label, data: [], backgroundColor: palette[0] }] },
      options: {
        indexAxis: horizontal ? "y" : "x",
        scales: horizontal
          ? { x: { beginAtZero: true, ticks: { precision: 0 } } }
          : { y: { beginAtZero: true, ticks: { precision: 0 } } },
        plugins: { legend: { display: false } },
      },
    });
  }

  const charts = {
    versions: lineChart(
      document.getElementById("chart-versions"),
      [
        { label: "version", data: [], borderColor: palette[0], backgroundColor: palette[0], stepped: true, yAxisID: "y" },
        { label: "mean staleness", data: [], borderColor: palette[1], backgroundColor: palette[1], yAxisID: "y1" },
      ],
      { y1: { position: "right", beginAtZero: true, grid: { drawOnChartArea: false } } }
    ),
    staleness: barChart(document.getElementById("chart-staleness"), "accepted updates", false),
    rejected: barChart(document.getElementById("chart-rejected"), "rejected updates", true),
    participation: barChart(document.getElementById("chart-participation"), "accepted updates", false),
    metrics: {}, // metric name -> Chart, created as metrics appear
  };
  charts.rejected.data.datasets[0].backgroundColor = palette[4];

  function metricChart(name) {
    if (charts.metrics[name]) return charts.metrics[name];
    const index = Object.keys(charts.metrics).length;
    const box = document.createElement("div");
    const title = document.createElement("h3");
    title.textContent = name;
    const holder = document.createElement("div");
    holder.className = "chart";
    const canvas = document.createElement("canvas");
    canvas.id = "chart-metric-" + name.replace(/[^A-Za-z0-9_-]/g, "_");
    canvas.dataset.metric = name;
    canvas.dataset.testid = "chart-metric";
    holder.appendChild(canvas);
    box.appendChild(title);
    box.appendChild(holder);
    box.dataset.metric = name;
    document.getElementById("metric-charts").appendChild(box);
    const c = palette[index % palette.length];
    const chart = lineChart(canvas, [{ label: name, data: [], borderColor: c, backgroundColor: c }], {
      y: { ticks: {} },
    });
    chart.options.elements.point.radius = 2;
    charts.metrics[name] = chart;
    return chart;
  }

  function stalenessLabels(edges) {
    return edges.map((lo, i) => {
      if (i === edges.length - 1) return "≥" + lo;
      const hi = edges[i + 1] - 1;
      return hi === lo ? String(lo) : lo + "–" + hi;
    });
  }

  // Time axes span the data exactly (Chart.js would round out to nice numbers), and all
  // metric charts share one span, so their curves line up.
  function fitTime(chart, times) {
    const x = chart.options.scales.x;
    const wide = times.length > 1 && times[0] !== times[times.length - 1];
    x.min = wide ? times[0] : undefined;
    x.max = wide ? times[times.length - 1] : undefined;
    x.ticks.display = times.length > 0; // no clock ticks around nothing
  }

  function setBars(chart, labels, values) {
    chart.data.labels = labels;
    chart.data.datasets[0].data = values;
    chart.update("none");
  }

  // ---- the summary -----------------------------------------------------------------------
  function renderHeader(s) {
    show("run-id", s.run_id, s.run_id || "—");
    const state = document.getElementById("state");
    state.textContent = s.state;
    state.dataset.value = s.state;
    state.className = "badge" + (STATES.includes(s.state) ? " state-" + s.state : "");
    show("version", s.version, fmtInt(s.version));
    show("connected", s.learners.connected, fmtInt(s.learners.connected));
    show("protocol", s.protocol, s.protocol || "—");
    show("policy-name", s.policy.name, s.policy.name || "—");
    const chips = document.getElementById("policy-parameters");
    const params = Object.entries(s.policy.parameters || {});
    chips.replaceChildren(...params.map(([k, v]) => {
      const chip = document.createElement("span");
      chip.className = "chip";
      chip.dataset.parameter = k;
      chip.dataset.value = String(v);
      chip.textContent = k + "=" + (typeof v === "number" ? decimal.format(v) : String(v));
      return chip;
    }));
    show("uptime", s.now - s.started, s.started ? fmtDuration(s.now - s.started) : "—");
    show("model-parameters", s.model_parameters, fmtInt(s.model_parameters));
    show("encrypted", s.encrypted, s.encrypted ? "yes" : "no");
    show("workers", s.workers, fmtInt(s.workers));
    document.title = (s.run_id ? s.run_id + " · " : "") + "v" + s.version + " — metis-async";
  }

  function renderCards(s) {
    const l = s.learners, speed = l.speed_examples_per_second;
    show("training", l.training, fmtInt(l.training));
    show("benched", l.benched, fmtInt(l.benched));
    show("never-contributed", l.never_contributed, fmtInt(l.never_contributed));
    show("never-contributed-note", l.never_contributed, fmtInt(l.never_contributed));
    for (const p of ["p10", "p50", "p90"]) show("speed-" + p, speed[p], fmtNum(speed[p]));
    show("updates-per-second", s.rates.updates_per_second, fmtNum(s.rates.updates_per_second));
    show("bytes-in-per-second", s.rates.bytes_in_per_second, fmtBytes(s.rates.bytes_in_per_second) + "/s");
    show("bytes-out-per-second", s.rates.bytes_out_per_second, fmtBytes(s.rates.bytes_out_per_second) + "/s");
    show("updates-accepted", s.totals.updates_accepted, fmtInt(s.totals.updates_accepted));
    show("updates-rejected", s.totals.updates_rejected, fmtInt(s.totals.updates_rejected));
    show("bytes-in", s.totals.bytes_in, fmtBytes(s.totals.bytes_in));
    show("bytes-out", s.totals.bytes_out, fmtBytes(s.totals.bytes_out));
    const part = s.participation;
    show("contributing", part.contributing, fmtInt(part.contributing));
    show("participants", part.learners, fmtInt(part.learners));
    show("contributing-share", part.learners ? part.contributing / part.learners : null,
      fmtPercent(part.contributing, part.learners));
    for (const p of ["p10", "p50", "p90", "max"]) show("accepted-" + p, part.accepted[p], fmtInt(part.accepted[p]));
    document.getElementById("no-contributors").hidden = part.top.length > 0;
    const top = document.getElementById("top-contributors");
    top.replaceChildren(...part.top.map((t) => {
      const li = document.createElement("li");
      const id = document.createElement("code");
      id.textContent = t.learner_id;
      const n = document.createElement("span");
      n.textContent = fmtInt(t.accepted);
      li.dataset.learner = t.learner_id;
      li.dataset.value = String(t.accepted);
      li.append(id, n);
      return li;
    }));
  }

  function renderCharts(s) {
    const v = charts.versions;
    v.data.datasets[0].data = s.versions.map((e) => ({ x: e.time, y: e.version, version: e.version }));
    v.data.datasets[1].data = s.versions.map((e) => ({ x: e.time, y: e.mean_staleness, version: e.version }));
    fitTime(v, s.versions.map((e) => e.time));
    v.update("none");

    const evaluated = s.evaluations.map((e) => e.time);
    const names = new Set();
    for (const e of s.evaluations) for (const name of Object.keys(e.metrics)) names.add(name);
    for (const name of names) {
      const chart = metricChart(name);
      chart.data.datasets[0].data = s.evaluations
        .filter((e) => e.metrics[name] !== null && e.metrics[name] !== undefined)
        .map((e) => ({ x: e.time, y: e.metrics[name], version: e.version }));
      fitTime(chart, evaluated);
      chart.update("none");
    }
    for (const [name, chart] of Object.entries(charts.metrics)) {
      chart.canvas.parentElement.parentElement.hidden = !names.has(name); // a metric of an earlier run
    }
    document.getElementById("no-evaluations").hidden = names.size > 0;

    setBars(charts.staleness, stalenessLabels(s.staleness.edges), s.staleness.counts);
    const reasons = Object.entries(s.rejected).sort((a, b) => b[1] - a[1]);
    setBars(charts.rejected, reasons.map((r) => r[0]), reasons.map((r) => r[1]));
    document.getElementById("no-rejections").hidden = reasons.length > 0;
    const acc = s.participation.accepted;
    setBars(charts.participation, ["p10", "p50", "p90", "max"], [acc.p10, acc.p50, acc.p90, acc.max]);
  }

  let lastSummary = null;
  function render(s) {
    lastSummary = s;
    // One broken part (a summary not in the documented shape) must not blank the others; the
    // console error tells browser tests and people what is wrong.
    for (const part of [renderHeader, renderCards, renderCharts]) {
      try {
        part(s);
      } catch (err) {
        console.error("dashboard: " + part.name + " failed:", err);
      }
    }
    show("updated", s.now, fmtClock(s.now));
  }

  // ---- the learner table -----------------------------------------------------------------
  const table = { offset: 0, limit: 50, sort: "learner_id", desc: false, total: 0, busy: false };

  function cell(row, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    row.appendChild(td);
  }

  function renderLearners(page) {
    table.total = page.total;
    const rows = page.learners.map((l) => {
      const tr = document.createElement("tr");
      tr.dataset.learner = l.learner_id;
      cell(tr, l.learner_id, "id");
      cell(tr, l.connected ? "yes" : "no", l.connected ? "" : "off");
      cell(tr, String(l.worker), "num");
      cell(tr, fmtDuration(l.connected_seconds), "num");
      cell(tr, fmtDuration(l.last_seen_seconds) + " ago", "num");
      cell(tr, fmtNum(l.speed_examples_per_second), "num");
      cell(tr, fmtInt(l.accepted), "num");
      cell(tr, fmtInt(l.rejected), "num");
      cell(tr, fmtInt(l.last_staleness), "num");
      return tr;
    });
    document.getElementById("learners-body").replaceChildren(...rows);
    const first = page.total ? page.offset + 1 : 0;
    const last = page.offset + page.learners.length;
    show("learners-range", page.total, fmtInt(first) + "–" + fmtInt(last) + " of " + fmtInt(page.total));
    document.getElementById("page-first").disabled = page.offset === 0;
    document.getElementById("page-prev").disabled = page.offset === 0;
    document.getElementById("page-next").disabled = last >= page.total;
    document.getElementById("page-last").disabled = last >= page.total;
    for (const th of document.querySelectorAll("#learners th[data-sort]")) {
      const sorted = th.dataset.sort === table.sort;
      th.setAttribute("aria-sort", sorted ? (table.desc ? "descending" : "ascending") : "none");
    }
  }

  async function fetchLearners() {
    if (table.busy) return;
    table.busy = true;
    const query = new URLSearchParams({
      offset: String(table.offset), limit: String(table.limit), sort: table.sort, desc: table.desc ? "1" : "0",
    });
    try {
      const response = await fetch("/api/learners?" + query, { cache: "no-store" });
      if (response.status === 401) { location.reload(); return; }
      const body = await response.json();
      if (!response.ok) throw new Error(body.error || response.statusText);
      document.getElementById("learners-error").textContent = "";
      renderLearners(body);
    } catch (err) {
      document.getElementById("learners-error").textContent = "Learners: " + err.message;
    } finally {
      table.busy = false;
    }
  }

  function goTo(offset) {
    const lastPage = Math.max(0, Math.ceil(table.total / table.limit) - 1) * table.limit;
    table.offset = Math.min(Math.max(0, offset), lastPage);
    fetchLearners();
  }

  for (const th of document.querySelectorAll("#learners th[data-sort]")) {
    th.querySelector("button").addEventListener("click", () => {
      const key = th.dataset.sort;
      // Numbers read best largest first; ids alphabetically.
      table.desc = key === table.sort ? !table.desc : key !== "learner_id";
      table.sort = key;
      table.offset = 0;
      fetchLearners();
    });
  }
  document.getElementById("page-first").addEventListener("click", () => goTo(0));
  document.getElementById("page-prev").addEventListener("click", () => goTo(table.offset - table.limit));
  document.getElementById("page-next").addEventListener("click", () => goTo(table.offset + table.limit));
  document.getElementById("page-last").addEventListener("click", () => goTo(table.total));
  document.getElementById("page-size").addEventListener("change", (e) => {
    table.limit = Number(e.target.value);
    table.offset = 0;
    fetchLearners();
  });
  setInterval(() => { if (!document.hidden) fetchLearners(); }, TABLE_REFRESH_MS);

  // ---- live updates ----------------------------------------------------------------------
  const live = document.getElementById("live");
  function setLive(on, text) {
    live.dataset.live = on ? "true" : "false";
    live.textContent = text;
  }

  function connect() {
    const events = new EventSource("/api/events");
    events.addEventListener("summary", (e) => {
      render(JSON.parse(e.data));
      setLive(true, "live");
    });
    events.addEventListener("error", () => {
      setLive(false, "reconnecting…");
      // The browser retries a dropped stream itself, but gives up on an HTTP error: find out
      // whether the session ended (log in again) or the controller is away (retry later).
      if (events.readyState === EventSource.CLOSED) recheck();
    });
  }

  async function recheck() {
    try {
      const response = await fetch("/api/summary", { cache: "no-store" });
      if (response.status === 401) { location.reload(); return; }
      if (response.ok) render(await response.json());
    } catch (err) {
      // the controller is away: try again below
    }
    setTimeout(connect, 3000);
  }

  // For browser tests and curious people: `metisDashboard.charts.versions.data`.
  window.metisDashboard = {
    charts: charts,
    table: table,
    get summary() { return lastSummary; },
  };

  connect();
  fetchLearners();
})();
