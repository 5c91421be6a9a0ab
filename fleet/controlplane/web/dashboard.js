// mtls-fleet dashboard: renders the snapshots that /api/stream/<page> sends once a second.
"use strict";

const COLOURS = {
  ok: "#27ae60", revoked: "#c0392b", unknown_ca: "#8e44ad", expired: "#d35400",
  not_yet_valid: "#e67e22", no_certificate: "#7f8c8d", bad_eku: "#16a085",
  crl_stale: "#f1c40f", issuer_revoked: "#922b21", identity_mismatch: "#2980b9",
  env_mismatch: "#5dade2", policy_refused: "#6c3483", outside_window: "#a569bd",
  handshake_timeout: "#95a5a6", protocol_error: "#34495e", other: "#bdc3c7",
};
const LAYOUT = { margin: { l: 45, r: 10, t: 10, b: 40 }, barmode: "stack", showlegend: true,
                 legend: { orientation: "h", y: -0.25 }, font: { size: 11 } };
const CONFIG = { displayModeBar: false, responsive: true };

function el(id) { return document.getElementById(id); }

function text(value) { return value === null || value === undefined ? "–" : String(value); }

function fillRows(tbody, rows) {
  tbody.replaceChildren(...rows.map(cells => {
    const tr = document.createElement("tr");
    for (const cell of cells) {
      const td = document.createElement("td");
      if (typeof cell === "object" && cell !== null) {
        td.textContent = text(cell.text);
        if (cell.cls) td.className = cell.cls;
        if (cell.data) for (const [k, v] of Object.entries(cell.data)) td.dataset[k] = v;
      } else {
        td.textContent = text(cell);
        if (typeof cell === "number") td.className = "n";
      }
      tr.appendChild(td);
    }
    return tr;
  }));
}

function countsTable(id, counts) {
  const rows = Object.entries(counts || {}).map(([k, v]) => [{ text: k, data: { key: k } }, v]);
  fillRows(el(id).querySelector("tbody"), rows);
}

function plot(id, traces, extra) {
  Plotly.react(el(id), traces, Object.assign({}, LAYOUT, extra || {}), CONFIG);
}

// -- the fleet page ---------------------------------------------------------------------

function renderFleet(s) {
  const inv = s.inventory;
  el("inventory-total").textContent = `${inv.total} devices`;
  countsTable("by-state", inv.by_state);
  countsTable("by-tier", inv.by_tier);
  countsTable("by-env", inv.by_env);
  countsTable("by-issuer", inv.by_issuer);
  issuerChoices(Object.keys(inv.by_issuer || {}));

  const ex = s.expiry;
  plot("expiry", [{ type: "bar", x: ex.days, y: ex.counts, name: "expire that day", marker: { color: "#2980b9" } }],
       { showlegend: false });
  fillRows(el("expiry-buckets").querySelector("tbody"), [
    ["expired", ex.expired], ["within 1h", ex.within["1h"]], ["within 1d", ex.within["1d"]],
    ["within 7d", ex.within["7d"]], ["within 30d", ex.within["30d"]], [`after ${ex.days.length} days`, ex.later],
  ]);

  if (s.outcomes) {
    const o = s.outcomes;
    const names = Object.keys(o.series);
    plot("outcomes", names.map(name => ({
      type: "bar", name: name, x: o.t, y: o.series[name], marker: { color: COLOURS[name] || "#999" },
    })));
    el("outcomes-note").textContent = `per ${o.bucket_seconds} s, from the broker's events`;
    const totals = names.map(name => [{ text: name, data: { reason: name } }, o.series[name].reduce((a, b) => a + b, 0)]);
    fillRows(el("outcomes-table").querySelector("tbody"), totals);
  } else {
    el("outcomes-note").textContent = "no broker events (start fleet serve with --broker)";
  }

  if (s.connections) {
    const c = s.connections;
    el("connected-total").textContent = `${c.total} sessions`;
    plot("connections", [
      { type: "bar", name: "by tier", x: Object.keys(c.by_tier), y: Object.values(c.by_tier), marker: { color: "#2980b9" } },
      { type: "bar", name: "by env", x: Object.keys(c.by_env), y: Object.values(c.by_env), marker: { color: "#16a085" } },
    ], { barmode: "group" });
  }

  const r = s.revocation;
  fillRows(el("crl").querySelector("tbody"), [
    ["CRL number", r.crl_number], ["published", r.this_update], ["age (s)", r.age_seconds],
    ["next update", r.next_update], ["stale", { text: r.stale ? "yes" : "no", cls: r.stale ? "state-revoked" : "" }],
    ["revoked devices", r.revoked_devices],
  ]);
  fillRows(el("recent-revocations").querySelector("tbody"), r.recent.map(x => [
    { text: x.id, data: { id: x.id } }, x.revoked_at, x.reason,
    x.cut_after_seconds === null ? "no session cut seen" : `${x.cut_after_seconds} s`,
  ]));

  const alerts = s.alerts || [];
  el("alerts-empty").hidden = alerts.length > 0;
  fillRows(el("alerts-table").querySelector("tbody"), alerts.slice().reverse().map(a => [
    a.at, { text: a.rule, data: { rule: a.rule } }, { text: a.severity, cls: `sev-${a.severity}` }, a.summary,
  ]));
}

function issuerChoices(issuers) {
  const select = el("search-issuer");
  const known = [...select.options].slice(1).map(o => o.value);
  if (known.join("\n") === issuers.join("\n")) return;
  const chosen = select.value;
  select.replaceChildren(select.options[0], ...issuers.map(name => new Option(name, name)));
  select.value = issuers.includes(chosen) ? chosen : "";
}

async function search() {
  const form = new FormData(el("search"));
  const params = new URLSearchParams();
  for (const [k, v] of form.entries()) if (v) params.set(k, v);
  params.set("limit", "200");
  const answer = await fetch(`/api/devices?${params}`);
  if (!answer.ok) { el("search-count").textContent = (await answer.json()).error; return; }
  const result = await answer.json();
  el("search-count").textContent = `${result.matching} matching, ${result.devices.length} shown`;
  fillRows(el("inventory-table").querySelector("tbody"), result.devices.map(d => [
    { text: d.id, data: { id: d.id } }, { text: d.state, cls: `state-${d.state}`, data: { state: d.state } },
    d.tier, d.env, d.issuer, d.not_after,
  ]));
}

// -- the swarm page ---------------------------------------------------------------------

function renderSwarm(s) {
  el("swarm-title").textContent = s.title;
  const latest = s.latest;
  if (!latest) return;
  const sent = latest.sent, ack = latest.acknowledged;
  fillRows(el("swarm-numbers").querySelector("tbody"), [
    ["devices", latest.devices], ["connected", { text: latest.connected, data: { connected: latest.connected } }],
    ["elapsed (s)", latest.elapsed.toFixed(1)], ["messages sent / acknowledged", `${sent} / ${ack}`],
    ["latency p50 / p90 / p99 (ms)", ["p50", "p90", "p99"].map(p => latest.latency_ms[p] === null ? "–" : latest.latency_ms[p].toFixed(1)).join(" / ")],
    ["state", latest.finished ? "finished" : "running"],
  ]);
  const t = s.series.t || [];
  plot("swarm-connected", [{ type: "scatter", mode: "lines", x: t, y: s.series.connected, name: "connected" }], { showlegend: false });
  plot("swarm-rate", [{ type: "scatter", mode: "lines", x: t, y: s.series.attempt_rate, name: "attempts/s" }], { showlegend: false });
  const names = Object.keys(latest.attempts);
  plot("swarm-outcomes", [{ type: "bar", x: names, y: names.map(n => latest.attempts[n]),
                            marker: { color: names.map(n => COLOURS[n === "connected" ? "ok" : n] || "#999") } }], { showlegend: false });
  fillRows(el("swarm-outcomes-table").querySelector("tbody"), names.map(n => [{ text: n, data: { outcome: n } }, latest.attempts[n]]));
  fillRows(el("swarm-details").querySelector("tbody"), Object.entries(latest.details).map(([k, v]) => [{ text: k, data: { detail: k } }, v]));
  plot("swarm-latency", ["p50", "p90", "p99"].map(p => ({ type: "scatter", mode: "lines", x: t, y: s.series[p], name: p })));
}

// -- live updates -----------------------------------------------------------------------

function follow(page, render) {
  const status = el("status");
  const source = new EventSource(`/api/stream/${page}`);
  source.onmessage = message => {
    const snapshot = JSON.parse(message.data);
    if (snapshot.error) { status.textContent = snapshot.error; status.className = "status stale"; return; }
    render(snapshot);
    status.textContent = `live · ${new Date().toLocaleTimeString()}`;
    status.className = "status";
    if (snapshot.latest && snapshot.latest.finished) {
      status.textContent = "run finished";
      source.close();
    }
    document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
  };
  source.onerror = () => { status.textContent = "reconnecting…"; status.className = "status stale"; };
}

window.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "fleet") {
    follow("fleet", renderFleet);
    el("search").addEventListener("input", () => search());
    el("search").addEventListener("submit", e => { e.preventDefault(); search(); });
    search();
    setInterval(search, 2000);
  } else {
    follow("swarm", renderSwarm);
  }
});
