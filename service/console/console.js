// branchy-serve console: talks only to the server that served it (relative URLs), so it
// works offline and behind a path prefix. Text from the server is always set with
// textContent, never as HTML.
"use strict";

const EXIT_COLOURS = ["#2b8a3e", "#e8a317", "#c92a2a", "#7048e8", "#1098ad", "#d6336c"];
const TOKEN_KEY = "branchy-admin-token";
const state = { models: {}, selected: null, token: sessionStorage.getItem(TOKEN_KEY) || "" };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "style") node.style.cssText = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

const fmtT = (t) => (t === "inf" ? "inf" : Number(t).toPrecision(4).replace(/\.?0+$/, ""));
const fmtMacs = (m) => (m >= 1e6 ? (m / 1e6).toFixed(2) + " M" : (m / 1e3).toFixed(1) + " k");
const pct = (x) => (100 * x).toFixed(2) + "%";
const ms = (x) => (x === null || x === undefined ? "–" : x < 10 ? x.toFixed(2) : x.toFixed(1));

// The server's JSON error body -> one line.
async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error) return `${body.error.message} (HTTP ${response.status} ${body.error.code})`;
  } catch (_) { /* not JSON */ }
  return `HTTP ${response.status}`;
}

async function getJSON(url, options = {}) {
  const response = await fetch(url, options);
  if (!response.ok) {
    const err = new Error(await errorText(response));
    err.status = response.status;
    throw err;
  }
  return response.json();
}

function adminHeaders(extra = {}) {
  return { ...extra, Authorization: `Bearer ${state.token}` };
}

// ------------------------------------------------------------------------ models

async function loadModels() {
  const list = await getJSON("v1/models");
  const details = await Promise.all(
    list.models.map((m) => getJSON(`v1/models/${encodeURIComponent(m.name)}`)),
  );
  state.models = Object.fromEntries(details.map((d) => [d.name, d]));
  if (!state.selected || !state.models[state.selected]) {
    const branchy = details.find((d) => d.num_exits > 1);
    state.selected = (branchy || details[0] || {}).name || null;
  }
  renderModels();
}

function renderModels() {
  const body = document.querySelector("#models tbody");
  body.replaceChildren();
  for (const m of Object.values(state.models)) {
    const exits = m.exit_macs.map((macs, i) =>
      el("span", { style: `color:${EXIT_COLOURS[i % EXIT_COLOURS.length]}` }, `${i}: ${fmtMacs(macs)}`));
    const exitCell = el("td", {});
    exits.forEach((e, i) => { if (i) exitCell.append(", "); exitCell.append(e); });
    const row = el("tr", { "data-model": m.name, class: m.name === state.selected ? "selected" : "" },
      el("td", {}, el("strong", {}, m.name)),
      el("td", {}, m.architecture),
      exitCell,
      el("td", { class: "thresholds" }, m.thresholds.length ? m.thresholds.map(fmtT).join(", ") : "–"),
      el("td", { class: "source" }, m.threshold_source),
      el("td", {}, m.device + (m.half_precision ? " (fp16)" : "")),
      el("td", {}, m.has_calibration ? "yes" : "no"));
    row.addEventListener("click", () => select(m.name));
    body.append(row);
  }
  if (!body.children.length) body.append(el("tr", {}, el("td", { colSpan: 7, class: "muted" }, "no models loaded yet")));
  const picker = document.getElementById("model-select");
  picker.replaceChildren(...Object.keys(state.models).map((n) =>
    el("option", { value: n, selected: n === state.selected }, n)));
}

function select(name) {
  state.selected = name;
  renderModels();
  if (state.token) loadFrontier();
}

// -------------------------------------------------------------------- live stats

async function refreshStats() {
  const status = document.getElementById("status");
  try {
    const ready = await fetch("readyz");
    status.textContent = ready.ok ? "ready" : "loading models…";
    status.className = "pill " + (ready.ok ? "ok" : "");
    const stats = await getJSON("console/api/stats");
    renderStats(stats);
  } catch (e) {
    status.textContent = "server unreachable";
    status.className = "pill bad";
  }
}

function sharesBar(shares) {
  const bar = el("div", { class: "shares" });
  shares.forEach((s, i) => bar.append(el("span", {
    title: `exit ${i}: ${pct(s)}`, style: `width:${100 * s}%;background:${EXIT_COLOURS[i % EXIT_COLOURS.length]}`,
  })));
  return el("div", {}, bar, el("div", { class: "legend" }, shares.map((s, i) => `${i}: ${pct(s)}`).join("  ")));
}

function renderStats(stats) {
  document.getElementById("window").textContent = stats.window_s
    ? `(last ${stats.window_s.toFixed(0)} s, from the server's counters)` : "(since start)";
  const body = document.querySelector("#live tbody");
  body.replaceChildren();
  for (const [name, m] of Object.entries(stats.models)) {
    const lat = m.latency_ms;
    body.append(el("tr", { "data-model": name },
      el("td", {}, el("strong", {}, name)),
      el("td", { class: "exit-shares" }, sharesBar(m.exit_shares)),
      el("td", { class: "images-per-s" }, m.images_per_s === null ? "–" : m.images_per_s.toFixed(1)),
      el("td", {}, m.requests_per_s === null ? "–" : m.requests_per_s.toFixed(1)),
      el("td", {}, lat ? `${ms(lat.p50)} / ${ms(lat.p95)} / ${ms(lat.p99)} ms` : "–"),
      el("td", { class: "queue" }, String(m.queue_depth)),
      el("td", {}, m.mean_batch_size === null ? "–" : m.mean_batch_size.toFixed(1)),
      el("td", { class: "images-total" }, String(m.images_total))));
  }
}

// ---------------------------------------------------------------------- classify

async function classify(file) {
  const model = state.models[state.selected];
  const error = document.getElementById("classify-error");
  error.hidden = true;
  if (!model) return;
  const form = new FormData();
  form.append("images", file, file.name || "image");
  const url = `v1/models/${encodeURIComponent(model.name)}/classify?top_k=${model.classes.length}`;
  try {
    const answer = await getJSON(url, { method: "POST", body: form });
    showResult(file, answer);
  } catch (e) {
    document.getElementById("result").hidden = true;
    error.textContent = e.message;
    error.hidden = false;
  }
  refreshStats();
}

function showResult(file, answer) {
  const r = answer.results[0];
  document.getElementById("preview").src = URL.createObjectURL(file);
  document.getElementById("r-class").textContent = r.class_name;
  document.getElementById("r-confidence").textContent = `${pct(r.confidence)} confident`;
  const last = r.exit.count - 1;
  const exitText = `answered at exit ${r.exit.index} (exits 0–${last}): ` +
    (r.exit.index < last ? "left early" : "the final exit");
  const exitLine = document.getElementById("r-exit");
  exitLine.textContent = exitText;
  exitLine.dataset.exit = r.exit.index;
  const thresholds = answer.thresholds.map(fmtT).join(", ") || "none";
  document.getElementById("r-entropy").textContent =
    `entropy ${r.entropy.toFixed(4)} nats (thresholds ${thresholds})`;
  document.getElementById("r-timing").textContent =
    `${answer.model}: ${ms(answer.timings.total_ms)} ms in the server, batch of ${r.batch_size}`;
  const probs = document.querySelector("#r-probs tbody");
  probs.replaceChildren(...(r.top_k || []).map((c) => el("tr", {},
    el("td", {}, c.class_name),
    el("td", {}, el("span", { class: "bar", style: `width:${Math.max(1, 160 * c.probability)}px` })),
    el("td", { class: "muted" }, pct(c.probability)))));
  document.getElementById("result").hidden = false;
}

function setUpDrop() {
  const drop = document.getElementById("drop");
  const input = document.getElementById("file-input");
  input.addEventListener("change", () => { if (input.files.length) classify(input.files[0]); });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) classify(e.dataTransfer.files[0]);
  });
  document.getElementById("model-select").addEventListener("change", (e) => select(e.target.value));
}

// ---------------------------------------------------------------------- frontier

function adminMessage(text, isError = false) {
  const msg = document.getElementById("admin-msg");
  msg.textContent = text;
  msg.className = isError ? "error" : "muted";
}

async function loadFrontier() {
  const box = document.getElementById("frontier");
  box.replaceChildren();
  const name = state.selected;
  if (!name) return;
  try {
    const f = await getJSON(`admin/models/${encodeURIComponent(name)}/frontier`, { headers: adminHeaders() });
    drawFrontier(f);
  } catch (e) {
    adminMessage(e.message, true);
  }
}

function describePoint(p) {
  return `thresholds ${p.thresholds.map(fmtT).join(", ") || "none"}: accuracy ${pct(p.accuracy)}, ` +
    `relative cost ${p.relative_cost.toFixed(3)}, exit shares ${p.exit_shares.map(pct).join(" / ")}`;
}

function drawFrontier(f) {
  const box = document.getElementById("frontier");
  const W = 640, H = 340, L = 74, R = 16, T = 14, B = 40;
  const pts = f.points;
  const all = pts.concat([f.current]);
  const xs = all.map((p) => p.relative_cost), ys = all.map((p) => p.accuracy);
  let x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (x1 - x0 < 1e-6) { x0 -= 0.05; x1 += 0.05; }
  if (y1 - y0 < 1e-6) { y0 -= 0.01; y1 += 0.01; }
  const px = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const py = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  const plot = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img" });
  plot.append(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }));
  plot.append(svg("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }));
  for (let i = 0; i <= 4; i++) {
    const xv = x0 + (i / 4) * (x1 - x0), yv = y0 + (i / 4) * (y1 - y0);
    plot.append(svg("text", { x: px(xv), y: H - B + 14, "text-anchor": "middle" }, xv.toFixed(2)));
    plot.append(svg("text", { x: L - 6, y: py(yv) + 4, "text-anchor": "end" }, pct(yv)));
  }
  plot.append(svg("text", { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle" },
    "expected cost (MACs relative to the final exit)"));
  plot.append(svg("text", { x: 12, y: T + (H - T - B) / 2, transform: `rotate(-90 12 ${T + (H - T - B) / 2})`,
    "text-anchor": "middle" }, "accuracy on calibration data"));
  plot.append(svg("polyline", { points: pts.map((p) => `${px(p.relative_cost)},${py(p.accuracy)}`).join(" ") }));
  for (const p of pts) {
    const dot = svg("circle", { cx: px(p.relative_cost), cy: py(p.accuracy), r: 4.5, class: "point",
      "data-thresholds": JSON.stringify(p.thresholds) });
    dot.append(svg("title", {}, describePoint(p)));
    dot.addEventListener("click", () => choosePoint(p));
    plot.append(dot);
  }
  plot.append(svg("circle", { cx: px(f.current.relative_cost), cy: py(f.current.accuracy), r: 8, class: "current" }));
  box.replaceChildren(plot, el("p", { id: "current-point" },
    el("strong", {}, "In force (red ring): "), describePoint(f.current),
    ` (from ${f.threshold_source}; ${f.calibration_samples} calibration samples, ${pts.length} frontier points)`));
  adminMessage(`${f.model}: click a point to set its thresholds.`);
}

async function choosePoint(p) {
  const name = state.selected;
  const numeric = p.thresholds.map((t) => (t === "inf" ? 1e30 : t));
  try {
    const answer = await getJSON(`admin/models/${encodeURIComponent(name)}/thresholds`, {
      method: "PUT", headers: adminHeaders({ "Content-Type": "application/json" }),
      body: JSON.stringify({ thresholds: numeric }),
    });
    await loadModels();
    await loadFrontier();
    adminMessage(`${name}: thresholds set to ${answer.thresholds.map(fmtT).join(", ")}.`);
  } catch (e) {
    adminMessage(e.message, true);
  }
}

function setUpAdmin() {
  const input = document.getElementById("token");
  input.value = state.token;
  document.getElementById("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.token = input.value.trim();
    sessionStorage.setItem(TOKEN_KEY, state.token);
    if (state.token) loadFrontier();
  });
  document.getElementById("lock").addEventListener("click", () => {
    state.token = "";
    input.value = "";
    sessionStorage.removeItem(TOKEN_KEY);
    document.getElementById("frontier").replaceChildren();
    adminMessage("Token forgotten.");
  });
}

async function start() {
  setUpDrop();
  setUpAdmin();
  try {
    await loadModels();
  } catch (e) {
    document.querySelector("#models tbody").replaceChildren(
      el("tr", {}, el("td", { colSpan: 7, class: "error" }, e.message)));
  }
  refreshStats();
  setInterval(refreshStats, 2000);
  setInterval(() => loadModels().catch(() => {}), 10000);
  if (state.token) loadFrontier();
}

start();
