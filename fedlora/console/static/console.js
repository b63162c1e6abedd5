// fedlora console: renders the JSON views of fedlora.console.views.
// Every value is written with textContent (a node's failure reason is text a
// hostile node chose); no inline script, no eval: the page's CSP forbids both.
"use strict";

window.fedloraCharts = {};
let source = null;
const ROUND_STEPS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000];

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function fmt(v, digits) {
  if (v === null || v === undefined) return "";
  return typeof v === "number" ? v.toFixed(digits === undefined ? 4 : digits) : String(v);
}

function row(cells, attrs) {
  const tr = document.createElement("tr");
  for (const [text, cls] of cells) tr.appendChild(el("td", text, cls));
  for (const [k, v] of Object.entries(attrs || {})) tr.setAttribute(k, v);
  return tr;
}

async function getJSON(url) {
  const r = await fetch(url, { credentials: "same-origin" });
  if (!r.ok) throw new Error(url + ": " + r.status);
  return r.json();
}

async function refreshList() {
  const data = await getJSON("/api/runs");
  const ul = document.getElementById("runs");
  ul.replaceChildren();
  const current = decodeURIComponent(location.hash.replace(/^#run\//, ""));
  for (const run of data.runs) {
    const li = el("li", null, run.name === current ? "current" : "");
    const a = el("a", run.name);
    a.href = "#run/" + encodeURIComponent(run.name);
    li.appendChild(a);
    li.appendChild(el("span", " " + run.status, "muted"));
    ul.appendChild(li);
  }
  if (!location.hash && data.runs.length) location.hash = "#run/" + encodeURIComponent(data.runs[0].name);
  return data.runs;
}

function chart(box, key, title, rounds, series) {
  const xs = rounds.map((r) => r.round);
  const data = [xs, ...series.map((s) => rounds.map((r) => s.get(r)))];
  if (!series.some((_, i) => data[i + 1].some((v) => v !== null && v !== undefined))) return;
  const wrap = el("div", null, "chart");
  wrap.id = "chart-" + key;
  wrap.appendChild(el("h4", title));
  box.appendChild(wrap);
  const colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
  const opts = {
    width: 420, height: 220,
    scales: { x: { time: false } },
    axes: [{ label: "round", incrs: ROUND_STEPS }, {}],
    legend: { live: false },
    series: [{ label: "round" }, ...series.map((s, i) => ({ label: s.label, stroke: colors[i % 4], points: { show: true } }))],
  };
  window.fedloraCharts[key] = new uPlot(opts, data, wrap);
}

function renderCharts(box, rounds) {
  box.replaceChildren();
  window.fedloraCharts = {};
  const get = (k) => (r) => r[k];
  chart(box, "accuracy", "Accuracy", rounds, [
    { label: "global accuracy", get: get("global_accuracy") },
    { label: "federated accuracy", get: get("federated_accuracy") },
  ]);
  chart(box, "loss", "Loss", rounds, [
    { label: "global loss", get: get("global_loss") },
    { label: "train loss", get: get("train_loss") },
  ]);
  chart(box, "bytes", "MB uploaded", rounds, [
    { label: "MB up", get: (r) => (r.bytes_uploaded === null ? null : r.bytes_uploaded / 1e6) },
  ]);
  chart(box, "epsilon", "ε spent (largest site)", rounds, [{ label: "ε max", get: get("epsilon_max") }]);
  const gen = new Set();
  rounds.forEach((r) => Object.keys(r.generation || {}).forEach((k) => gen.add(k)));
  for (const k of [...gen].filter((k) => k !== "global_perplexity")) {
    chart(box, "gen-" + k, k, rounds, [{ label: k, get: (r) => (r.generation || {})[k] ?? null }]);
  }
  if (gen.has("global_perplexity")) {
    chart(box, "perplexity", "perplexity", rounds, [{ label: "perplexity", get: (r) => r.generation.global_perplexity }]);
  }
}

function renderAudit(box, audit) {
  box.replaceChildren();
  box.className = "audit";
  if (!audit) return;
  box.classList.add(audit.passed ? "passed" : "failed");
  const acc = audit.epsilon_accounted === null ? "∞ (no DP)" : fmt(audit.epsilon_accounted, 2);
  box.appendChild(el("h3", "Privacy audit" + (audit.passed ? "" : " — FAILED")));
  box.appendChild(el("p", `ε accounted ${acc} · empirical lower bound ${fmt(audit.epsilon_lower_95, 2)} (95% confidence)`));
  const t = el("table");
  t.appendChild(row([["attack"], ["AUC"], ["TPR@1% FPR"], ["ε lower bound"]]));
  for (const [name, a] of Object.entries(audit.attacks)) {
    t.appendChild(row([[name, "text"], [fmt(a.auc, 3)], [a.tpr_at_fpr_1pct === null ? "n/a" : fmt(a.tpr_at_fpr_1pct, 3)], [fmt(a.epsilon_lower_95, 2)]]));
  }
  box.appendChild(t);
  if (audit.per_site.length) {
    const s = el("table");
    s.appendChild(row([["site"], ["members"], ["ε accounted"], ["lower bound"], ["verdict"]]));
    for (const p of audit.per_site) {
      s.appendChild(row([[p.site, "text"], [p.members], [fmt(p.epsilon_accounted, 2)], [fmt(p.epsilon_lower_95, 2)], [p.skipped || (p.passed ? "ok" : "FAILED"), "text"]]));
    }
    box.appendChild(s);
  }
}

function renderRun(view) {
  const main = document.getElementById("main");
  let sec = main.querySelector("section[data-run]");
  if (!sec || sec.dataset.run !== view.name) {
    sec = document.getElementById("run-template").content.firstElementChild.cloneNode(true);
    sec.dataset.run = view.name;
    main.replaceChildren(sec);
  }
  sec.querySelector(".run-name").textContent = `${view.name} (${view.kind})`;
  const st = sec.querySelector(".status");
  st.textContent = view.status.status;
  st.className = "status badge " + view.status.status;
  sec.querySelector(".reason").textContent = view.status.reason || "";
  const done = view.rounds.filter((r) => r.round > 0).length;
  const total = view.num_rounds || done || 1;
  const bar = sec.querySelector(".progress");
  bar.max = total;
  bar.value = done;
  sec.querySelector(".progress-text").textContent = `round ${done} of ${total}`;
  renderAudit(sec.querySelector(".audit"), view.audit);
  renderCharts(sec.querySelector(".charts"), view.rounds);

  const rounds = sec.querySelector("#rounds tbody");
  rounds.replaceChildren(...view.rounds.map((r) => row([
    [r.round], [r.round === 0 ? "" : `${r.clients_ok}/${r.clients_sampled}`], [r.round === 0 ? "" : r.clients_failed],
    [fmt(r.global_accuracy)], [fmt(r.global_loss)], [fmt(r.bytes_uploaded / 1e6, 3)], [fmt(r.epsilon_max, 2)], [fmt(r.seconds, 1)],
  ], { "data-round": r.round })));

  const sites = sec.querySelector("#sites tbody");
  sites.replaceChildren(...view.sites.map((s) => row([
    [s.site, "text"], [s.last_round], [fmt(s.accuracy)], [fmt(s.loss)],
    [s.epsilon === null ? "" : fmt(s.epsilon, 2) + (s.epsilon_cap === null ? "" : " / " + fmt(s.epsilon_cap, 2))],
    [fmt(s.epsilon_planned, 2)],
    [Object.entries(s.epsilon_by_round).map(([k, v]) => `${k}: ${v.toFixed(2)}`).join(" · "), "text"],
    [fmt(s.bytes_sent / 1e6, 3)],
    [s.failures.map((f) => `round ${f.round}: ${f.kind}`).join("; "), "text"],
  ], { "data-site": s.site })));

  const failures = sec.querySelector("#failures tbody");
  failures.replaceChildren();
  for (const r of view.rounds) {
    for (const f of r.failures) {
      failures.appendChild(row([[r.round], [f.site, "text"], [f.kind, "text kind-" + f.kind.split(":")[0]], [f.reason, "text reason"]], { "data-site": f.site }));
    }
  }

  const parts = sec.querySelector(".partitions");
  parts.replaceChildren();
  if (view.partitions.length) {
    parts.appendChild(el("h3", "Partitions (simulation)"));
    const t = el("table");
    t.appendChild(row([["partition"], ["examples"], ["labels", "text"]]));
    for (const p of view.partitions) {
      t.appendChild(row([[p.partition], [p.examples], [Object.entries(p.labels || {}).map(([k, v]) => `${k} ${v}`).join(", "), "text"]]));
    }
    parts.appendChild(t);
  }
  if (view.placement.length) {
    parts.appendChild(el("h3", "Placement (Ray nodes)"));
    const t = el("table");
    t.id = "placement";
    t.appendChild(row([["Ray node", "text"], ["IP", "text"], ["messages"], ["partitions", "text"]]));
    for (const p of view.placement) {
      t.appendChild(row([[p.node, "text"], [p.ip, "text"], [p.messages], [p.partitions.join(", "), "text"]]));
    }
    parts.appendChild(t);
  }
  const ad = sec.querySelector(".adapter");
  ad.replaceChildren();
  if (view.adapter) {
    ad.appendChild(el("h3", "Exported adapter"));
    const t = el("table");
    for (const [k, v] of Object.entries(view.adapter)) {
      t.appendChild(row([[k, "text"], [typeof v === "object" && v !== null ? JSON.stringify(v) : v, "text"]]));
    }
    ad.appendChild(t);
  }
  const plots = sec.querySelector(".plots");
  plots.replaceChildren(...view.plots.map((p) => {
    const a = el("a");
    a.href = `/runs/${encodeURIComponent(view.name)}/files/${p}`;
    const img = el("img");
    img.src = a.href;
    img.alt = p;
    a.appendChild(img);
    return a;
  }));
  sec.querySelector(".tensorboard").textContent = view.tensorboard ? `TensorBoard: tensorboard --logdir ${view.tensorboard}` : "";
  sec.querySelector(".config tbody").replaceChildren(...Object.entries(view.config).map(([k, v]) => row([[k, "text"], [v, "text"]])));
  document.getElementById("live").textContent = "updated " + new Date().toLocaleTimeString();
}

function showRun(name) {
  if (source) source.close();
  source = new EventSource("/api/runs/" + encodeURIComponent(name) + "/events");
  source.addEventListener("run", (e) => renderRun(JSON.parse(e.data)));
}

async function showCompare() {
  if (source) source.close();
  source = null;
  const runs = (await getJSON("/api/runs")).runs;
  const main = document.getElementById("main");
  const sec = el("section");
  sec.id = "compare";
  sec.appendChild(el("h2", "Compare runs"));
  const t = el("table");
  t.appendChild(row([["run", "text"], ["status"], ["strategy"], ["rounds"], ["global accuracy"], ["global loss"], ["ε max"]]));
  for (const r of runs) {
    t.appendChild(row([[r.name, "text"], [r.status], [r.strategy], [r.rounds], [fmt(r.global_accuracy)], [fmt(r.global_loss)], [fmt(r.epsilon_max, 2)]], { "data-run": r.name }));
  }
  sec.appendChild(t);
  const box = el("div", null, "charts");
  sec.appendChild(box);
  main.replaceChildren(sec);
  const xs = [...new Set(runs.flatMap((r) => r.accuracy_by_round.map((p) => p[0])))].sort((a, b) => a - b);
  const data = [xs, ...runs.map((r) => xs.map((x) => (r.accuracy_by_round.find((p) => p[0] === x) || [x, null])[1]))];
  const colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];
  window.fedloraCharts = {
    compare: new uPlot({
      width: 640, height: 300, scales: { x: { time: false } }, legend: { live: false },
      axes: [{ label: "round", incrs: ROUND_STEPS }, { label: "global accuracy" }],
      series: [{ label: "round" }, ...runs.map((r, i) => ({ label: r.name, stroke: colors[i % 6], points: { show: true } }))],
    }, data, box),
  };
}

function route() {
  refreshList().catch(() => {});
  const hash = location.hash;
  if (hash === "#compare") showCompare();
  else if (hash.startsWith("#run/")) showRun(decodeURIComponent(hash.slice(5)));
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", () => {
  refreshList().then(() => route()).catch((e) => { document.getElementById("main").textContent = String(e); });
  setInterval(() => refreshList().catch(() => {}), 5000);
});
