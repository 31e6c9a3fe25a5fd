"""The swarm health web page: one self-contained HTML page (inline CSS and JS, no external assets,
works offline) that fetches `api/health` (the SwarmReport as JSON) and redraws itself every
`refresh` seconds: per model a coverage grid (blocks x peers), the peer table and throughput.

Remote data (peer names, ids) is only ever inserted as text (`textContent`), never as HTML.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Callable, Optional, Sequence

import hivemind

from swarmlm.monitoring.health import SwarmReport, collect_report
from swarmlm.monitoring.http_service import HttpService


class ReportCache:
    """Calls `collect` at most once per `max_age` seconds, however many browsers poll; thread-safe."""

    def __init__(self, collect: Callable[[], SwarmReport], max_age: float):
        self.collect, self.max_age = collect, max_age
        self._report: Optional[SwarmReport] = None
        self._taken_at = -float("inf")
        self._lock = threading.Lock()

    def get(self) -> SwarmReport:
        with self._lock:
            if time.monotonic() - self._taken_at >= self.max_age:
                self._report = self.collect()
                self._taken_at = time.monotonic()
            return self._report


def serve_health_page(dht: hivemind.DHT, models: Optional[Sequence[str]] = None, host: str = "127.0.0.1",
                      port: int = 0, refresh: float = 5.0) -> HttpService:
    """An HttpService (not started) with "/" (the page) and "/api/health" (the report as JSON)."""
    if refresh <= 0:
        raise ValueError(f"the page's refresh period must be positive, got {refresh}")
    cache = ReportCache(lambda: collect_report(dht, models), max_age=refresh / 2)
    page = render_page(refresh).encode()
    return HttpService(
        {
            "/": lambda: ("text/html; charset=utf-8", page),
            "/api/health": lambda: ("application/json", json.dumps(cache.get().to_dict()).encode()),
        },
        host, port,
    )


def render_page(refresh: float) -> str:
    return PAGE.replace("__REFRESH_MS__", str(int(refresh * 1000)))


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>swarmlm health</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
  h1 { font-size: 1.4em; margin: 0 0 .3em; }
  h2 { font-size: 1.15em; margin: 0; }
  .summary { color: #555; margin-bottom: 1em; }
  .model { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 1em; margin-bottom: 1.2em; }
  .badge { display: inline-block; padding: 0 .5em; border-radius: 4px; font-weight: 600; margin-left: .5em; }
  .ok { background: #d7f5dd; color: #17612b; }
  .bad { background: #fbd9d9; color: #8a1111; }
  .problem { color: #8a1111; margin: .4em 0; }
  .coverage { display: grid; gap: 2px; margin: .6em 0; }
  .coverage div { height: 18px; border-radius: 2px; font-size: 10px; text-align: center; color: #fff; }
  .label { color: #444 !important; text-align: right !important; padding-right: .4em; white-space: nowrap;
           overflow: hidden; text-overflow: ellipsis; font-size: 11px !important; }
  .cell-none { background: #eee; }
  .cell-online { background: #2e9e4f; }
  .cell-joining { background: #e0a800; }
  .cell-offline { background: #999; }
  .cov-0 { background: #d63232; }
  .cov-1 { background: #7cc48f; }
  .cov-2 { background: #2e9e4f; }
  table { border-collapse: collapse; width: 100%; margin-top: .5em; }
  th, td { text-align: left; padding: .25em .6em; border-bottom: 1px solid #eee; font-size: 13px; }
  td.mono { font-family: ui-monospace, monospace; font-size: 12px; }
  #error { color: #8a1111; }
</style>
</head>
<body>
<h1>swarmlm swarm health</h1>
<div class="summary" id="summary">loading...</div>
<div id="error"></div>
<div id="models"></div>
<script>
"use strict";
const REFRESH_MS = __REFRESH_MS__;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

function coverageClass(online) { return "cov-" + Math.min(online, 2); }

function coverageGrid(model) {
  const grid = el("div", {class: "coverage"});
  grid.style.gridTemplateColumns = "12em repeat(" + model.num_blocks + ", minmax(4px, 1fr))";
  const states = Object.fromEntries(model.peers.map(p => [p.peer_id, p.state]));
  grid.append(el("div", {class: "label"}, "online peers"));
  for (const block of model.blocks) {
    const online = block.peers.filter(id => states[id] === "online").length;
    grid.append(el("div", {class: coverageClass(online), "data-block": block.index, "data-online": online,
                           title: "block " + block.index + ": " + online + " online peer(s), " +
                                  block.throughput.toFixed(1) + " tokens/s"}, online));
  }
  for (const peer of model.peers) {
    grid.append(el("div", {class: "label", title: peer.peer_id}, peer.public_name || peer.peer_id));
    for (let b = 0; b < model.num_blocks; b++) {
      const serves = peer.start <= b && b < peer.end;
      grid.append(el("div", {class: serves ? "cell-" + peer.state : "cell-none",
                             title: serves ? peer.peer_id + " serves block " + b + " (" + peer.state + ")" : ""}));
    }
  }
  return grid;
}

function peerTable(model) {
  const head = el("tr", {}, ...["peer", "name", "blocks", "state", "tokens/s per block", "free KV cache",
                                "dtype", "version"].map(h => el("th", {}, h)));
  const rows = model.peers.map(p => el("tr", {class: "peer", "data-peer-id": p.peer_id, "data-state": p.state},
    el("td", {class: "mono"}, p.peer_id), el("td", {}, p.public_name || ""), el("td", {}, p.start + ":" + p.end),
    el("td", {}, p.state), el("td", {}, p.throughput.toFixed(1)),
    el("td", {}, p.free_cache_tokens + " / " + p.max_cache_tokens), el("td", {}, p.torch_dtype),
    el("td", {}, p.version)));
  return el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows));
}

function modelCard(model) {
  const card = el("section", {class: "model", "data-model": model.name,
                              "data-healthy": String(model.healthy)});
  const badge = el("span", {class: "badge " + (model.healthy ? "ok" : "bad")}, model.healthy ? "OK" : "GAP");
  const family = model.registered ? " (" + model.family + ", " + model.num_blocks + " blocks)" : "";
  card.append(el("h2", {}, model.name + family, badge));
  if (model.problem) card.append(el("div", {class: "problem"}, model.problem));
  for (const [start, end] of model.gaps) {
    card.append(el("div", {class: "problem gap", "data-gap": start + ":" + end},
                   "missing blocks " + start + ":" + end));
  }
  if (!model.registered) return card;
  card.append(el("div", {}, "swarm throughput: ", el("b", {class: "throughput"}, model.throughput.toFixed(1)),
                 " tokens/s (weakest block)"));
  card.append(coverageGrid(model), peerTable(model));
  return card;
}

function render(report) {
  const peers = new Set(report.models.flatMap(m => m.peers.filter(p => p.state === "online").map(p => p.peer_id)));
  const total = report.models.reduce((sum, m) => sum + m.throughput, 0);
  document.getElementById("summary").textContent =
    report.models.length + " model(s), " + peers.size + " online peer(s), swarm throughput " +
    total.toFixed(1) + " tokens/s - " + (report.healthy ? "all models fully served" : "SOME BLOCKS ARE NOT SERVED") +
    " - updated " + new Date(report.generated_at * 1000).toLocaleTimeString();
  document.body.dataset.healthy = String(report.healthy);
  document.getElementById("models").replaceChildren(...report.models.map(modelCard));
  if (!report.models.length) {
    document.getElementById("models").append(el("p", {}, "No model is registered in the DHT yet."));
  }
}

async function refresh() {
  try {
    const response = await fetch("api/health", {cache: "no-store"});
    if (!response.ok) throw new Error("HTTP " + response.status + ": " + await response.text());
    render(await response.json());
    document.getElementById("error").textContent = "";
  } catch (e) {
    document.getElementById("error").textContent = "cannot read the swarm's state: " + e.message;
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}
refresh();
</script>
</body>
</html>
"""
