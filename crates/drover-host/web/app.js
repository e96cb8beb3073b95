// Drover's web console: plain script, no build step. Every figure on the page comes from the
// JSON API with the token the user logged in with, so droverd checks each call exactly as it
// checks the CLI's. Buttons a role cannot use are not shown (GET /v1/auth/whoami), and the API
// refuses them anyway. Live state: the page polls the API every POLL_MS.
"use strict";

const POLL_MS = 1500;
const TOKEN_KEY = "drover.token";
const $ = (sel) => document.querySelector(sel);

let me = null;          // WhoAmI
let pollTimer = null;
let consoleSession = null;

// ------------------------------------------------------------------ API

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.code = body && body.code;
  }
}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

async function api(method, path, body) {
  const headers = { "Authorization": "Bearer " + token() };
  const init = { method, headers };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = text; }
  if (!r.ok) {
    if (r.status === 401) logout("The token was refused: " + ((data && data.message) || r.status));
    throw new ApiError(r.status, data);
  }
  return data;
}

const can = (perm) => !!me && me.permissions.includes(perm);

// ------------------------------------------------------------------ helpers

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : String(c ?? ""));
  return e;
}

function bytes(n) {
  if (n == null) return "";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
}

function when(ms) { return ms ? new Date(ms).toLocaleString() : ""; }

function facts(dl, pairs) {
  dl.replaceChildren(...pairs.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

function fillTable(table, rows) {
  table.querySelector("tbody").replaceChildren(...rows);
}

function agentText(a) {
  if (!a) return "";
  if (a.ready) return "ready" + (a.info && a.info.agent_version ? " (" + a.info.agent_version + ")" : "");
  if (a.none_seen) return "none seen";
  if (a.guest_opened) return "starting";
  return a.connected ? "connected" : "not seen yet";
}

function show(section) {
  for (const s of ["login", "overview", "vm"]) $("#" + s).hidden = s !== section;
}

// ------------------------------------------------------------------ login

async function login(t) {
  sessionStorage.setItem(TOKEN_KEY, t);
  try {
    me = await api("GET", "/v1/auth/whoami");
  } catch (e) {
    sessionStorage.removeItem(TOKEN_KEY);
    me = null;
    $("#login-error").textContent = e.message;
    show("login");
    return false;
  }
  $("#whoami").textContent = me.name + " (" + (me.role || "no role") + ")";
  $("#whoami").dataset.role = me.role || "";
  $("#logout").hidden = false;
  return true;
}

function logout(why) {
  sessionStorage.removeItem(TOKEN_KEY);
  me = null;
  stopConsole();
  clearTimeout(pollTimer);
  $("#whoami").textContent = "";
  $("#logout").hidden = true;
  $("#login-error").textContent = why || "";
  show("login");
}

// ------------------------------------------------------------------ pages

async function renderOverview() {
  const [host, vms] = await Promise.all([api("GET", "/v1/host"), api("GET", "/v1/vms")]);
  $("#hostname").textContent = host.hostname;
  const q = host.qemu || {};
  facts($("#host"), [
    ["host", host.hostname + (host.identity ? " (id " + host.identity.id + ")" : "")],
    ["accelerator", host.accel + " — " + host.accel_reason],
    ["QEMU", host.qemu_version + (q.package ? " (" + q.package + ")" : "")],
    ["CPUs", host.cpus],
    ["memory", bytes(host.memory_available) + " free of " + bytes(host.memory_total) +
      ", " + bytes(host.memory_allocated) + " given to running VMs"],
    ["disk", bytes(host.disk_free) + " free of " + bytes(host.disk_total) + " in " + host.state_dir],
    ["VMs", host.vms_running + " running of " + host.vms_defined],
    ["droverd", host.daemon_version],
  ]);
  fillTable($("#vm-list"), vms.map((v) =>
    el("tr", { "data-vm": v.name },
      el("td", {}, el("a", { href: "#/vm/" + encodeURIComponent(v.name) }, v.name)),
      el("td", { class: "state state-" + v.state }, v.state),
      el("td", {}, v.config.cpus),
      el("td", {}, bytes(v.config.memory)),
      el("td", {}, agentText(v.agent)),
      el("td", {}, v.accel || ""))));
  $("#vm-list-empty").hidden = vms.length > 0;
}

// Which buttons a state offers, beside what the role allows.
const ACTIONS = {
  start: { perm: "vm.lifecycle", states: ["stopped"] },
  stop: { perm: "vm.lifecycle", states: ["running", "paused", "starting"] },
  snapshot: { perm: "vm.lifecycle", states: ["running", "paused"] },
  migrate: { perm: "vm.lifecycle", states: ["running", "stopped"] },
};

async function renderVm(name) {
  const enc = encodeURIComponent(name);
  const vm = await api("GET", "/v1/vms/" + enc);
  $("#vm-name").textContent = vm.name;
  $("#vm-state").textContent = vm.state;
  $("#vm-state").className = "state state-" + vm.state;
  for (const b of document.querySelectorAll("#vm-actions button")) {
    const a = ACTIONS[b.dataset.action];
    // Not allowed for the role: not on the page at all.
    b.hidden = !can(a.perm);
    b.disabled = !a.states.includes(vm.state);
  }
  const c = vm.running_config || vm.config;
  facts($("#vm-shape"), [
    ["CPUs", c.cpus],
    ["memory", bytes(c.memory) + (c.max_memory ? " (up to " + bytes(c.max_memory) + ")" : "")],
    ["disks", c.disks.map((d) => d.id + " " + bytes(d.size) + (d.readonly ? " ro" : "")).join(", ") || "none"],
    ["NICs", (c.nics || []).map((n) => n.id).join(", ") || "none"],
    ["machine", (vm.platform && vm.platform.machine) || ""],
    ["CPU model", (vm.platform && vm.platform.cpu) || ""],
    ["started from", vm.started_from || ""],
    ["since", when(vm.started_at_ms)],
  ]);
  const a = vm.agent || {};
  facts($("#vm-agent"), [
    ["status", agentText(vm.agent) || "(VM not running)"],
    ["ready after", a.ready_after_ms ? (a.ready_after_ms / 1000).toFixed(1) + " s" : ""],
    ["agent uptime", a.info ? (a.info.uptime_ms / 1000).toFixed(0) + " s (at its hello)" : ""],
  ]);
  const [hist, states] = await Promise.all([
    api("GET", "/v1/vms/" + enc + "/config"),
    api("GET", "/v1/vms/" + enc + "/states"),
  ]);
  fillTable($("#vm-generations"), hist.generations.map((g) =>
    el("tr", {},
      el("td", {}, g.id + (g.id === hist.default_start ? " (next start)" : "")),
      el("td", {}, when(g.created_at_ms)),
      el("td", {}, g.who),
      el("td", {}, g.why),
      el("td", {}, el("pre", { class: "diff" }, (g.changes || []).join("\n"))))));
  fillTable($("#vm-states"), states.map((s) => {
    const restore = el("button", { "data-restore": s.name, onclick: () => act(name, "restore", s.name) }, "Restore");
    restore.hidden = !can("vm.lifecycle");
    return el("tr", { "data-state": s.name },
      el("td", {}, s.name),
      el("td", {}, when(s.created_at_ms)),
      el("td", {}, s.created_by),
      el("td", {}, s.mode),
      el("td", {}, s.phase + (s.failure ? ": " + s.failure : "")),
      el("td", {}, restore));
  }));
  $("#vm-audit-hidden").hidden = can("guest.access");
  $("#vm-audit").hidden = !can("guest.access");
  if (can("guest.access")) {
    const audit = await api("GET", "/v1/vms/" + enc + "/audit");
    fillTable($("#vm-audit"), audit.slice(-50).reverse().map((e) =>
      el("tr", {},
        el("td", {}, when(e.at_ms)),
        el("td", {}, e.principal),
        el("td", {}, e.op),
        el("td", {}, e.outcome),
        el("td", {}, e.detail || ""))));
  }
}

async function act(name, action, arg) {
  const enc = encodeURIComponent(name);
  const msg = $("#vm-message");
  msg.className = "message";
  msg.textContent = action + "…";
  try {
    if (action === "start") await api("POST", "/v1/vms/" + enc + "/start", {});
    else if (action === "stop") await api("POST", "/v1/vms/" + enc + "/stop", {});
    else if (action === "snapshot") {
      const s = await api("POST", "/v1/vms/" + enc + "/states", {});
      msg.textContent = "saved state " + s.name;
    } else if (action === "restore") {
      await api("POST", "/v1/vms/" + enc + "/states/" + encodeURIComponent(arg) + "/restore");
    } else if (action === "migrate") {
      msg.textContent = await migrate(enc, arg);
    }
    if (!["snapshot", "migrate"].includes(action)) msg.textContent = action + ": done";
  } catch (e) {
    msg.className = "message error";
    msg.textContent = action + " failed: " + e.message;
  }
  refresh();
}

// Migration answers NDJSON: progress lines, then the result or an error.
async function migrate(enc, form) {
  const body = {
    to: { url: form.url.value, token: form.token.value || undefined, ca: form.ca.value },
    to_name: form.url.value,
  };
  const r = await fetch("/v1/vms/" + enc + "/migrate", {
    method: "POST",
    headers: { "Authorization": "Bearer " + token(), "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  const lines = (await r.text()).split("\n").filter(Boolean).map((l) => JSON.parse(l));
  if (!r.ok) throw new ApiError(r.status, lines[0]);
  const last = lines[lines.length - 1] || {};
  if (last.error) throw new ApiError(500, last.error);
  return "migrated to " + form.url.value;
}

// ------------------------------------------------------------------ serial console

function stopConsole() {
  if (consoleSession) {
    consoleSession.closed = true;
    consoleSession.ws.close();
    consoleSession.term.dispose();
    consoleSession = null;
  }
}

function startConsole(name) {
  if (consoleSession && consoleSession.name === name) return;
  stopConsole();
  const box = $("#console");
  box.replaceChildren();
  const term = new Terminal({ convertEol: true, rows: 24, cols: 80, fontSize: 13, scrollback: 2000 });
  term.open(box);
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host +
    "/v1/vms/" + encodeURIComponent(name) + "/console/ws";
  // Browsers cannot set Authorization on a WebSocket: the token rides as a subprotocol.
  const ws = new WebSocket(url, ["drover.console.v1", "bearer." + token()]);
  ws.binaryType = "arraybuffer";
  const session = { name, term, ws, input: false, live: false, closed: false };
  consoleSession = session;
  const mode = $("#console-mode");
  mode.textContent = "connecting…";
  ws.onmessage = (ev) => {
    if (typeof ev.data === "string") {
      const m = JSON.parse(ev.data);
      if (m.live) {
        // Old output is parsed before this mark; only what the user types from now on (and
        // the terminal's answers to live queries) goes to the guest.
        term.write("", () => { session.live = true; });
      } else if ("input" in m) {
        session.input = m.input;
        mode.textContent = m.input ? "(interactive)" : "(read-only: " + (m.why || "no vm.exec") + ")";
        mode.dataset.input = String(m.input);
      } else if (m.message) {
        mode.textContent = "(" + m.message + ")";
      }
      return;
    }
    term.write(new Uint8Array(ev.data));
  };
  ws.onclose = () => {
    if (!session.closed) mode.textContent = "(disconnected; reload the VM page to reconnect)";
  };
  term.onData((d) => {
    if (session.input && session.live && ws.readyState === WebSocket.OPEN) {
      ws.send(new TextEncoder().encode(d));
    }
  });
}

// ------------------------------------------------------------------ routing and polling

function route() {
  const m = location.hash.match(/^#\/vm\/(.+)$/);
  return m ? { page: "vm", name: decodeURIComponent(m[1]) } : { page: "overview" };
}

async function refresh() {
  clearTimeout(pollTimer);
  if (!me) return;
  const r = route();
  try {
    if (r.page === "vm") {
      show("vm");
      await renderVm(r.name);
      startConsole(r.name);
    } else {
      stopConsole();
      show("overview");
      await renderOverview();
    }
  } catch (e) {
    if (e.status === 401) return;
    const msg = r.page === "vm" ? $("#vm-message") : $("#vm-list-empty");
    msg.hidden = false;
    msg.className = "message error";
    msg.textContent = e.message;
  }
  pollTimer = setTimeout(refresh, POLL_MS);
}

function wire() {
  $("#login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    $("#login-error").textContent = "";
    if (await login($("#login-token").value.trim())) {
      $("#login-token").value = "";
      refresh();
    }
  });
  $("#logout").addEventListener("click", () => logout());
  for (const b of document.querySelectorAll("#vm-actions button")) {
    b.addEventListener("click", () => {
      const r = route();
      if (b.dataset.action === "migrate") {
        $("#migrate-form").hidden = !$("#migrate-form").hidden;
      } else {
        act(r.name, b.dataset.action);
      }
    });
  }
  $("#migrate-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    $("#migrate-form").hidden = true;
    act(route().name, "migrate", ev.target);
  });
  window.addEventListener("hashchange", refresh);
}

wire();
if (token()) {
  login(token()).then((ok) => ok && refresh());
} else {
  show("login");
}
