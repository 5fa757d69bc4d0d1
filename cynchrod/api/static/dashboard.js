// cynchrod dashboard: live statuses (polling the store every 2 s), the row
// buttons as fetch calls, and the live log view. Our own code, no libraries.
// Every value from the server is written with textContent, never as HTML
// (the row fragment fetched on a new app is rendered, and escaped, by Jinja).
"use strict";

const csrf = () => document.querySelector('meta[name="csrf-token"]').content;
const STATUSES = ["queued", "pending", "deploying", "running", "stopped", "failed", "removed"];

function announce(text, isError) {
  const live = document.getElementById("live");
  if (!live) return;
  live.textContent = text;
  live.className = "notice " + (isError ? "error" : "info");
}

function setBadge(badge, status) {
  badge.textContent = status;
  for (const cls of [...badge.classList]) if (cls.startsWith("status-")) badge.classList.remove(cls);
  badge.classList.add("status-" + status);
}

function toSignIn(response) {
  if (response.status === 401) { window.location.assign("/signin"); return true; }
  return false;
}

// -- the row buttons ---------------------------------------------------------------

function actionName(form) { return form.action.split("/").pop(); }

async function act(form) {
  const action = actionName(form);
  const name = form.dataset.confirm || form.closest("[data-name]")?.dataset.name || document.title.split(" ·")[0];
  if (action === "delete" && !window.confirm(`Delete ${name}? Its containers are removed; the app stays listed as removed with its history.`)) {
    return;
  }
  const button = form.querySelector("button");
  button.disabled = true;
  try {
    const response = await fetch(form.action, {
      method: "POST", credentials: "same-origin",
      headers: {"X-CSRF-Token": csrf(), "Accept": "application/json", "X-Confirm": action === "delete" ? name : ""},
    });
    if (toSignIn(response)) return;
    const body = await response.json();
    if (!response.ok) {
      announce(`${action} ${name} failed: ${body.error}: ${body.message}`, true);
      return;
    }
    if (body.changed) {
      document.querySelectorAll(`[data-status-of="${body.app_id}"]`).forEach((b) => setBadge(b, "queued"));
      announce(`${action} ${name}: committed ${body.commit.slice(0, 12)}, queued.`, false);
    } else {
      announce(`${action} ${name}: nothing to change.`, false);
    }
    poll();
  } catch (err) {
    announce(`${action} ${name} failed: ${err}`, true);
  } finally {
    button.disabled = false;
  }
}

document.addEventListener("submit", (event) => {
  const form = event.target;
  if (!form.classList.contains("act")) return;
  event.preventDefault();
  act(form);
});

// -- live statuses ---------------------------------------------------------------------

let pollTimer = null;
let polling = false;

function updateRow(row, app) {
  const badge = row.querySelector('[data-field="status"]');
  if (badge.textContent !== app.status) setBadge(badge, app.status);
  const serving = row.querySelector('[data-field="serving"]');
  if (serving) serving.hidden = !(app.status === "failed" && app.serving === "previous");
  const health = row.querySelector('[data-field="health"]');
  if (health && app.health && health.textContent !== app.health) health.textContent = app.health;
  const error = row.querySelector('[data-field="last_error"]');
  if (error.textContent !== (app.last_error || "")) error.textContent = error.title = app.last_error || "";
  const dep = row.querySelector('[data-field="deployment"]');
  const d = app.deployment;
  const key = d ? `${d.id}|${d.status}` : "";
  if (dep.dataset.key !== key) {
    dep.dataset.key = key;
    dep.textContent = "";
    if (d) {
      const time = document.createElement("time");
      time.dateTime = d.at;
      time.title = "UTC";
      time.textContent = d.at.replace("T", " ").replace(/Z$/, "");
      const code = document.createElement("code");
      code.textContent = d.commit;
      dep.append(time, ` · ${d.trigger} · `, code);
    }
  }
  const restart = row.querySelector("form[data-restart]");
  if (restart) restart.hidden = app.status === "stopped";  // refused on a stopped app: Start is the button
  const toggle = row.querySelector("form[data-toggle]");
  if (toggle) {
    const want = app.status === "stopped" ? "start" : "stop";
    if (actionName(toggle) !== want) {
      toggle.action = toggle.action.replace(/\/(start|stop)$/, "/" + want);
      toggle.querySelector("button").textContent = want === "start" ? "Start" : "Stop";
    }
  }
  if (app.status === "removed") {
    row.querySelectorAll(".actions > *").forEach((el) => el.remove());
  }
}

async function poll() {
  const table = document.querySelector("[data-poll-url]");
  if (!table || polling) return;
  polling = true;
  try {
    const response = await fetch(table.dataset.pollUrl, {credentials: "same-origin", headers: {"Accept": "application/json"}});
    if (toSignIn(response) || !response.ok) return;
    const {apps} = await response.json();
    let unknown = false;
    for (const app of apps) {
      if (!STATUSES.includes(app.status)) continue;
      const row = document.getElementById("row-" + app.id);
      if (row) updateRow(row, app);
      else if (table.dataset.rowsUrl && app.status !== "removed") unknown = true;  // a new app: fetch the rows
      document.querySelectorAll(`.page-badge[data-status-of="${app.id}"]`).forEach((b) => {
        if (b.textContent !== app.status) setBadge(b, app.status);
      });
    }
    if (unknown) await refreshRows(table);
  } catch (err) {
    // The daemon restarting: keep the page, try again on the next tick.
  } finally {
    polling = false;
  }
}

async function refreshRows(table) {
  const response = await fetch(table.dataset.rowsUrl, {credentials: "same-origin"});
  if (!response.ok) return;
  const tpl = document.createElement("template");
  tpl.innerHTML = await response.text();  // server-rendered and escaped by Jinja
  document.getElementById("rows").replaceChildren(tpl.content);
  filterRows();
}

function filterRows() {
  const box = document.getElementById("q");
  if (!box) return;
  const q = box.value.trim().toLowerCase();
  document.querySelectorAll("#rows tr").forEach((row) => {
    row.hidden = q !== "" && !row.dataset.search.toLowerCase().includes(q);
  });
}

function startPolling() {
  const table = document.querySelector("[data-poll-url]");
  if (!table) return;
  const every = Number(table.dataset.pollMs) || 2000;
  pollTimer = setInterval(() => { if (!document.hidden) poll(); }, every);
}

// -- logs ------------------------------------------------------------------------------

const MAX_LINES = 5000;

function logView() {
  const root = document.getElementById("log");
  if (!root) return;
  const body = document.getElementById("lines");
  const view = document.getElementById("logview");
  const follow = document.getElementById("follow");
  const filter = document.getElementById("filter");
  const state = document.getElementById("stream-state");
  const counts = document.getElementById("counts");
  const multi = root.dataset.multi === "1";
  let pending = [];
  let dropped = 0;
  let scheduled = false;
  let needle = "";

  function row(item) {
    const tr = document.createElement("tr");
    const time = document.createElement("td");
    time.className = "ts";
    time.textContent = (item.timestamp || "").slice(11, 23);
    time.title = item.timestamp || "";
    tr.append(time);
    if (multi) {
      const svc = document.createElement("td");
      svc.className = "svc";
      svc.textContent = item.service;
      tr.append(svc);
    }
    const text = document.createElement("td");
    text.textContent = item.line;
    tr.append(text);
    tr.dataset.text = (item.service + " " + item.line).toLowerCase();
    if (needle && !tr.dataset.text.includes(needle)) tr.hidden = true;
    return tr;
  }

  // New lines are batched: at most one DOM update per animation frame, however fast they come.
  function flush() {
    scheduled = false;
    if (!follow.checked) { showCounts(); return; }
    const batch = pending.length > MAX_LINES ? pending.slice(-MAX_LINES) : pending;
    dropped += pending.length - batch.length;
    pending = [];
    const frag = document.createDocumentFragment();
    for (const item of batch) frag.append(row(item));
    body.append(frag);
    let extra = body.childElementCount - MAX_LINES;
    while (extra-- > 0) body.firstElementChild.remove();
    view.scrollTop = view.scrollHeight;
    showCounts();
  }

  function add(items) {
    // Each message is a JSON array of lines (one object from an older daemon).
    for (const item of Array.isArray(items) ? items : [items]) pending.push(item);
    if (pending.length > 2 * MAX_LINES) { dropped += pending.length - MAX_LINES; pending = pending.slice(-MAX_LINES); }
    if (!scheduled) { scheduled = true; requestAnimationFrame(flush); }
  }

  function showCounts() {
    const held = follow.checked ? "" : `, ${pending.length} waiting`;
    counts.textContent = `${body.childElementCount} lines${held}${dropped ? `, ${dropped} older dropped` : ""}`;
  }

  follow.addEventListener("change", () => { if (follow.checked) flush(); else showCounts(); });
  filter.addEventListener("input", () => {
    needle = filter.value.trim().toLowerCase();
    for (const tr of body.children) tr.hidden = needle !== "" && !tr.dataset.text.includes(needle);
  });

  async function connect() {
    state.textContent = "connecting…";
    try {
      const response = await fetch(root.dataset.ticketUrl, {
        method: "POST", credentials: "same-origin", headers: {"X-CSRF-Token": csrf(), "Accept": "application/json"}});
      if (toSignIn(response)) return;
      if (!response.ok) { state.textContent = "cannot open the stream"; return; }
      const {ticket} = await response.json();
      const scheme = location.protocol === "https:" ? "wss:" : "ws:";
      const ws = new WebSocket(`${scheme}//${location.host}${root.dataset.streamPath}?ticket=${encodeURIComponent(ticket)}`);
      ws.onopen = () => { state.textContent = "live"; root.dataset.live = "1"; };
      let streamed = 0;
      ws.onmessage = (event) => { root.dataset.streamed = String(++streamed); add(JSON.parse(event.data)); };
      ws.onclose = (event) => {
        root.dataset.live = "0";
        if (event.code === 4401) { state.textContent = "signed out"; window.location.assign("/signin"); return; }
        if (event.code === 4404) { state.textContent = "the app is gone"; return; }
        state.textContent = `stream closed (${event.reason || event.code}); reconnecting…`;
        setTimeout(connect, 2000);
      };
    } catch (err) {
      state.textContent = "stream unavailable; retrying…";
      setTimeout(connect, 2000);
    }
  }

  (async () => {
    try {
      const response = await fetch(root.dataset.tailUrl, {credentials: "same-origin", headers: {"Accept": "application/json"}});
      if (toSignIn(response)) return;
      if (response.ok) for (const item of (await response.json()).lines) add(item);
    } finally {
      connect();
    }
  })();
}

document.addEventListener("DOMContentLoaded", () => {
  const q = document.getElementById("q");
  if (q) { q.addEventListener("input", filterRows); filterRows(); }
  const org = document.getElementById("org");
  if (org) org.addEventListener("change", () => org.form.submit());
  startPolling();
  logView();
});
