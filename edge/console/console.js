// The Tollgate console: plain DOM and SVG, no framework, nothing fetched from outside this edge.
// Everything it shows comes from the admin API with the admin token, kept in this tab's sessionStorage.
"use strict";

const TOKEN_KEY = "tollgate.adminToken";
const LIVE_EVERY_MS = 5000; // queues, workers, usage and failures are re-read this often
const SERIES_SHOWN = 6; // tenant and model pairs drawn apart in the chart; the rest are "other"
const $ = (id) => document.getElementById(id);
let liveTimer = null;

// -- the admin API -----------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, body) {
  const headers = {Authorization: "Bearer " + sessionStorage.getItem(TOKEN_KEY)};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new ApiError(resp.status, (data.error && data.error.message) || resp.statusText);
  return data;
}

function notify(message) { $("notice").textContent = message; }

// Runs an action, showing its error in the header; an admin token that stops working signs out.
async function attempt(action) {
  try {
    await action();
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) return signOut("The admin token was refused: sign in again.");
    notify(err.message);
  }
}

// -- small DOM helpers -------------------------------------------------------------------

function el(tag, {dataset = {}, ...props} = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  Object.assign(node.dataset, dataset); // data-* attributes: the tests find rows by them
  node.append(...children);
  return node;
}

const num = (n) => Number(n).toLocaleString("en-US");
const cell = (value, className = "") => el("td", {className}, value);
const numCell = (name, value) => cell(num(value), "num " + name);

function fill(tableId, rows, empty) {
  const body = $(tableId).tBodies[0];
  body.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", {className: "muted", colSpan: 9}, empty))]));
}

function when(seconds) { return new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC"; }

function ago(seconds) {
  const s = Math.max(0, Math.round(Date.now() / 1000 - seconds));
  return s < 120 ? s + " s" : s < 7200 ? Math.round(s / 60) + " min" : Math.round(s / 3600) + " h";
}

// -- usage: a chart over time and totals per tenant and model -------------------------------

function usageWindow() {
  const option = $("window").selectedOptions[0];
  return {start: Math.floor(Date.now() / 1000) - Number(option.value), bucket: option.dataset.bucket,
          seconds: Number(option.value)};
}

async function loadUsage() {
  const w = usageWindow();
  const query = (groups) => api("GET", `/admin/usage?group_by=${groups}&start=${w.start}&limit=10000`);
  const [totals, series, byStatus] = await Promise.all([
    query("tenant,model"), query(`${w.bucket},tenant,model`), query("model,status")]);
  fill("usage-table", totals.data.map((row) => el("tr", {dataset: {tenant: row.group.tenant, model: row.group.model}},
    cell(row.group.tenant, "tenant"), cell(row.group.model, "model"), numCell("requests", row.requests),
    numCell("input", row.input_units), numCell("output", row.output_units), numCell("cost", row.cost_micros))),
  "No usage in this window.");
  drawChart(series.data, w);
  const failed = byStatus.data.filter((row) => row.group.status !== "ok");
  fill("failed-table", failed.map((row) => el("tr", {dataset: {model: row.group.model, status: row.group.status}},
    cell(row.group.model), cell(row.group.status), numCell("requests", row.requests))), "None.");
}

// Bucket start times over the window: every hour (or day) whether or not it has usage.
function buckets(w) {
  const step = w.bucket === "hour" ? 3600 : 86400;
  const first = Math.floor(w.start / step) * step;
  const out = [];
  for (let t = first; t <= Date.now() / 1000; t += step) out.push(t);
  return {step, times: out};
}

function bucketTime(label) { // ClickHouse's toString of an hour or a date, in UTC
  return Date.parse(label.length === 10 ? label + "T00:00:00Z" : label.replace(" ", "T") + "Z") / 1000;
}

function drawChart(rows, w) {
  const metric = $("metric").value;
  const totals = new Map();
  for (const row of rows) {
    const name = `${row.group.tenant} · ${row.group.model}`;
    totals.set(name, (totals.get(name) || 0) + row[metric]);
  }
  const named = [...totals.entries()].filter(([, v]) => v > 0).sort((a, b) => b[1] - a[1]).map(([k]) => k);
  const shown = named.slice(0, SERIES_SHOWN);
  const names = named.length > SERIES_SHOWN ? [...shown, "other"] : shown;
  const {step, times} = buckets(w);
  const stacks = times.map(() => new Array(names.length).fill(0));
  for (const row of rows) {
    const i = Math.floor((bucketTime(row.group[w.bucket]) - times[0]) / step);
    const name = `${row.group.tenant} · ${row.group.model}`;
    const s = shown.includes(name) ? shown.indexOf(name) : names.indexOf("other");
    if (i >= 0 && i < times.length && s >= 0) stacks[i][s] += row[metric];
  }
  const peak = Math.max(1, ...stacks.map((stack) => stack.reduce((a, b) => a + b, 0)));
  const W = 800, H = 200, left = 60, bottom = 20, barW = (W - left) / times.length;
  const svg = svgEl("svg", {viewBox: `0 0 ${W} ${H + bottom}`, role: "img", "aria-label": "usage over time"});
  svg.append(svgEl("line", {x1: left, y1: H, x2: W, y2: H, class: "axis"}),
             svgEl("line", {x1: left, y1: 0, x2: left, y2: H, class: "axis"}),
             svgText(left - 4, 10, num(peak), "end"), svgText(left - 4, H, "0", "end"));
  times.forEach((t, i) => {
    let y = H;
    stacks[i].forEach((value, s) => {
      if (!value) return;
      const h = (value / peak) * (H - 4);
      y -= h;
      const bar = svgEl("rect", {x: left + i * barW + 1, y, width: Math.max(1, barW - 2), height: h, class: "c" + s});
      bar.append(svgEl("title", {}, `${names[s]}: ${num(value)} (${when(t)})`));
      svg.append(bar);
    });
    if (i % Math.ceil(times.length / 6) === 0) {
      const label = w.bucket === "hour" ? when(t).slice(11, 16) : when(t).slice(5, 10);
      svg.append(svgText(left + i * barW + barW / 2, H + 14, label, "middle"));
    }
  });
  const legend = el("div", {className: "legend"}, ...names.map((name, s) =>
    el("span", {}, el("span", {className: "swatch c" + s}), name)));
  $("chart").replaceChildren(names.length ? legend : el("p", {className: "muted"}, "No usage to chart."), svg);
}

function svgEl(tag, attrs, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  node.append(...children);
  return node;
}

function svgText(x, y, text, anchor) { return svgEl("text", {x, y, "text-anchor": anchor}, text); }

// -- the bus: queues per lane, workers per model, dead letters --------------------------------

async function loadQueues() {
  const queues = await api("GET", "/admin/queues");
  fill("queue-table", queues.data.map((q) => el("tr", {dataset: {model: q.model, lane: q.lane}},
    cell(q.model), cell(q.lane), cell(num(q.queued), "num queued" + (q.queued ? " busy" : "")),
    numCell("running", q.running))), "No model has a queue yet.");
}

async function loadWorkers() {
  const [workers, health] = await Promise.all([api("GET", "/admin/workers"), fetch("/healthz").then((r) => r.json())]);
  const byModel = new Map(Object.keys(health.models || {}).map((m) => [m, []]));
  for (const w of workers.data) byModel.set(w.model, [...(byModel.get(w.model) || []), w]);
  fill("worker-table", [...byModel.entries()].map(([model, live]) => el("tr", {dataset: {model}},
    cell(model), cell(live.length ? num(live.length) : "none", "num live" + (live.length ? "" : " none")),
    cell(live.map((w) => ago(w.started)).join(", "), "muted"))), "No models configured.");
}

async function loadDeadLetters() {
  const dead = await api("GET", "/admin/dead-letters");
  $("dead-total").textContent = `(${num(dead.total)} in all, latest first)`;
  fill("dead-table", dead.data.map((d) => el("tr", {dataset: {seq: d.seq}},
    cell(when(d.time)), cell(d.source, "source"), cell(d.subject, "subject"), cell(d.reason, "reason"))), "None.");
}

// -- tenants, keys, credits and budgets --------------------------------------------------------

async function loadTenants() {
  const tenants = (await api("GET", "/admin/tenants")).data;
  fill("tenant-table", tenants.map((t) => el("tr", {dataset: {tenant: t.id}}, cell(t.id), cell(t.tier),
    cell(t.prepaid ? "yes" : "no"), cell(t.disabled ? "disabled" : "active"))), "No tenants.");
  const select = $("tenant-select"), chosen = select.value;
  select.replaceChildren(...tenants.map((t) => el("option", {value: t.id, textContent: t.id})));
  if (tenants.some((t) => t.id === chosen)) select.value = chosen;
  await loadAccount();
}

const tenant = () => $("tenant-select").value;

async function loadAccount() {
  if (!tenant()) return;
  const id = encodeURIComponent(tenant());
  const [keys, credit, budgets] = await Promise.all([
    api("GET", `/admin/keys?tenant=${id}`), api("GET", `/admin/tenants/${id}/credits`),
    api("GET", `/admin/budgets?tenant=${id}`)]);
  fill("key-table", keys.data.map((k) => el("tr", {dataset: {key: k.id}}, cell(k.id), cell(k.name), cell(when(k.created)),
    cell(k.revoked ? "revoked" : "active", "state"),
    el("td", {}, k.revoked ? "" : el("button", {type: "button", textContent: "Revoke", onclick: () => revoke(k.id)})))),
  "No keys.");
  $("credits").textContent = num(credit.available_micros);
  fill("budget-table", budgets.data.map((b) => el("tr", {dataset: {budget: b.id}}, cell(b.name),
    numCell("amount", b.amount_micros), cell(b.period), cell(b.mode),
    numCell("spent", b.state ? b.state.spent_micros : 0))), "No budgets.");
}

async function revoke(keyId) {
  if (!confirm(`Revoke key ${keyId}? Requests with it fail at once.`)) return;
  await attempt(async () => {
    await api("DELETE", `/admin/keys/${encodeURIComponent(keyId)}`);
    notify(`Key ${keyId} revoked.`);
    await loadAccount();
  });
}

function onSubmit(formId, action) {
  $(formId).addEventListener("submit", (event) => {
    event.preventDefault();
    attempt(async () => { await action(); $(formId).reset(); });
  });
}

onSubmit("tenant-form", async () => {
  const id = $("tenant-id").value.trim();
  await api("POST", "/admin/tenants", {id, tier: $("tenant-tier").value.trim(), prepaid: $("tenant-prepaid").checked});
  notify(`Tenant ${id} created.`);
  await loadTenants();
  $("tenant-select").value = id;
  $("new-key").hidden = true;
  await loadAccount();
});

onSubmit("key-form", async () => {
  const key = await api("POST", `/admin/tenants/${encodeURIComponent(tenant())}/keys`, {name: $("key-name").value.trim()});
  $("new-key-secret").textContent = key.key;
  $("new-key").hidden = false;
  notify(`Key ${key.id} created for ${key.tenant}.`);
  await loadAccount();
});

onSubmit("credit-form", async () => {
  await api("POST", `/admin/tenants/${encodeURIComponent(tenant())}/credits`, {
    amount_micros: Number($("credit-amount").value), kind: $("credit-kind").value, note: $("credit-note").value});
  notify("Credits recorded; billing applies them within moments.");
  await loadAccount();
});

onSubmit("budget-form", async () => {
  await api("POST", "/admin/budgets", {tenant: tenant(), name: $("budget-name").value.trim(),
    amount_micros: Number($("budget-amount").value), period: $("budget-period").value, mode: $("budget-mode").value});
  notify("Budget set.");
  await loadAccount();
});

// -- signing in and refreshing -------------------------------------------------------------------

const loadLive = () => attempt(() => Promise.all([loadUsage(), loadQueues(), loadWorkers(), loadDeadLetters()]));

async function signIn(token) {
  sessionStorage.setItem(TOKEN_KEY, token);
  try {
    await loadTenants(); // proves the token before the page is shown
  } catch (err) {
    sessionStorage.removeItem(TOKEN_KEY);
    $("login-error").textContent = err.message;
    return;
  }
  $("login").hidden = true;
  for (const id of ["app", "refresh", "sign-out"]) $(id).hidden = false;
  $("login-error").textContent = "";
  await loadLive();
  liveTimer = setInterval(loadLive, LIVE_EVERY_MS);
}

function signOut(message = "") {
  sessionStorage.removeItem(TOKEN_KEY);
  clearInterval(liveTimer);
  $("login").hidden = false;
  for (const id of ["app", "refresh", "sign-out"]) $(id).hidden = true;
  notify(message);
}

$("login").addEventListener("submit", (event) => { event.preventDefault(); signIn($("token").value); });
$("sign-out").addEventListener("click", () => signOut());
$("refresh").addEventListener("click", () => attempt(() => Promise.all([loadTenants(), loadLive()])));
$("tenant-select").addEventListener("change", () => { $("new-key").hidden = true; attempt(loadAccount); });
for (const id of ["window", "metric"]) $(id).addEventListener("change", () => attempt(loadUsage));
if (sessionStorage.getItem(TOKEN_KEY)) signIn(sessionStorage.getItem(TOKEN_KEY));
