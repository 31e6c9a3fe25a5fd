"""Monitoring end to end: a live peer's /metrics, `swarmlm health` (text, --json, exit codes) and the
health page rendered by a real headless browser, on one swarm with a fully served model and a gap."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request

import pytest
import torch
from conftest import client_model
from metrics_scrape import metrics_url, scrape, scrape_until, value
from swarmlm.local_swarm import NodeProcess, local_swarm, start_peer

from swarmlm.client.rpc import InferenceStream, call_forward
from swarmlm.dht.records import ServerRecord, ServerState
from swarmlm.dht.registry import ModelRecord
from swarmlm.errors import RemotePeerError
from swarmlm.experts.protocol import SpanRequest
from swarmlm.models.embedded import DEFAULT_MODEL
from swarmlm.monitoring.health import ModelHealth, SwarmReport, render_text
from swarmlm.monitoring.page import PAGE

GAP_MODEL = "swarmlm-gappy-llama"  # the default model's weights under another name, served only on blocks 0:3
THROUGHPUT = 250.0  # tokens/s per block announced by the fully served model's peers
MAX_CACHE = 4096  # KV-cache budget of every peer
HIDDEN = 128
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@pytest.fixture(scope="module")
def monitored_swarm(tiny_model_path):
    """dht + peers 0:3 and 3:8 of the default model (with /metrics) + one peer of GAP_MODEL on blocks 0:3; all
    p2p only (--no-direct), so that sessions over p2p streams run here (direct ones: the other modules' swarms)."""
    common = ("--max-cache-tokens", str(MAX_CACHE), "--no-direct")
    with local_swarm(DEFAULT_MODEL, ["0:3", "3:8"], "--metrics-port", "0", "--throughput", str(THROUGHPUT),
                       *common) as (dht, peers):
        with start_peer(DEFAULT_MODEL, dht.maddrs[0], "--dht-prefix", GAP_MODEL, "--blocks", "0:3",
                        "--throughput", "100", "--public-name", "gap-peer", *common) as gap_peer:
            yield dht, peers, gap_peer


@pytest.fixture(scope="module")
def model(monitored_swarm):
    with client_model(monitored_swarm[0].maddrs) as model:
        yield model


def requests(samples: dict, kind: str, outcome: str) -> float:
    return value(samples, "swarmlm_requests_total", kind=kind, outcome=outcome)


# ---- /metrics ---------------------------------------------------------------------------------------


def test_metrics_describe_the_peer(monitored_swarm):
    _, peers, _ = monitored_swarm
    for node, (start, end) in zip(peers, [(0, 3), (3, 8)]):
        samples = scrape(metrics_url(node))
        info = dict(next(labels for (name, labels) in samples if name == "swarmlm_peer_info"))
        assert info == {"model": DEFAULT_MODEL, "family": "llama", "start": str(start), "end": str(end),
                        "torch_dtype": "float32", "version": info["version"]}
        assert value(samples, "swarmlm_peer_state", swarmlm_peer_state="online") == 1
        assert value(samples, "swarmlm_served_blocks") == end - start
        assert value(samples, "swarmlm_announced_throughput_tokens_per_second") == THROUGHPUT
        assert value(samples, "swarmlm_dht_known_peers") >= 1
        assert value(samples, "swarmlm_kv_cache_free_tokens") == MAX_CACHE
        for kind in ("gradients", "state"):  # a peer that does not train
            assert value(samples, "swarmlm_averaging_contributed_bytes_total", kind=kind) == 0
            for outcome in ("completed", "failed"):
                assert value(samples, "swarmlm_averaging_rounds_total", kind=kind, outcome=outcome) == 0


def test_metrics_follow_a_session_through_the_swarm(monitored_swarm, model, tokenizer):
    _, peers, _ = monitored_swarm
    urls = [metrics_url(node) for node in peers]
    ids = tokenizer("The import statement", return_tensors="pt")["input_ids"]  # [1, prompt]
    prompt, new, max_length = ids.shape[1], 6, 40
    before = [scrape(url) for url in urls]
    with model.inference_session(max_length=max_length) as session:
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, session=session)
        during = [scrape(url) for url in urls]
    fed = prompt + new - 1  # the prompt, then every generated token but the last
    for url, b, d in zip(urls, before, during):
        assert value(d, "swarmlm_inference_sessions_active") == 1
        assert value(d, "swarmlm_kv_cache_used_tokens") == 1 * max_length  # batch x max_length
        assert value(d, "swarmlm_kv_cache_free_tokens") == MAX_CACHE - max_length
        delta = lambda name, **labels: value(d, name, **labels) - value(b, name, **labels)  # noqa: E731
        assert delta("swarmlm_processed_tokens_total", kind="inference") == fed
        assert delta("swarmlm_request_duration_seconds_count", kind="inference") == new  # prefill + new - 1 steps
        assert delta("swarmlm_rpc_sent_bytes_total", kind="inference") >= fed * HIDDEN * 4  # float32 hidden states
        assert delta("swarmlm_rpc_received_bytes_total", kind="inference") >= fed * HIDDEN * 4
        assert delta("swarmlm_pushed_steps_total", transport="direct") == 0  # peers with --no-direct
        after = scrape_until(url, lambda s: value(s, "swarmlm_inference_sessions_active") == 0
                             and value(s, "swarmlm_kv_cache_used_tokens") == 0
                             and requests(s, "inference", "ok") == requests(b, "inference", "ok") + 1)
        assert value(after, "swarmlm_kv_cache_free_tokens") == MAX_CACHE
        assert requests(after, "inference", "error") == requests(b, "inference", "error")
    pushed = value(during[0], "swarmlm_pushed_steps_total", transport="p2p") - value(
        before[0], "swarmlm_pushed_steps_total", transport="p2p")
    assert pushed == session.pushed_steps >= 1, (pushed, session.pushed_steps)  # 0:3 pushed steps into 3:8


def test_requests_are_counted_by_kind_and_outcome(monitored_swarm, model):
    _, peers, _ = monitored_swarm
    first, url = peers[0].peer_id, metrics_url(peers[0])
    before = [scrape(metrics_url(node)) for node in peers]
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        model(ids)
    for node, b in zip(peers, before):
        scrape_until(metrics_url(node), lambda s, b=b: requests(s, "forward", "ok") == requests(b, "forward", "ok") + 1
                     and value(s, "swarmlm_processed_tokens_total", kind="forward")
                     == value(b, "swarmlm_processed_tokens_total", kind="forward") + ids.numel())

    remote = model.remote
    with pytest.raises(RemotePeerError, match="not served here"):
        remote.loop.run(call_forward(remote.dialer, first, SpanRequest(model=DEFAULT_MODEL, start=0, end=5),
                                     torch.randn(1, 2, HIDDEN), torch.arange(2)[None], None, 30))
    too_big = SpanRequest(model=DEFAULT_MODEL, start=0, end=3, max_length=2048, batch_size=3)  # 6144 > 4096 tokens

    async def open_too_big_session():
        stream = InferenceStream(first, too_big)
        await stream.open(remote.dialer)
        try:
            await stream.step(0, torch.randn(3, 1, HIDDEN), torch.zeros(3, 1, dtype=torch.long), None, 30)
        finally:
            stream.close()

    with pytest.raises(RemotePeerError) as refused:
        remote.loop.run(open_too_big_session())
    assert refused.value.code == "busy"
    after = scrape_until(url, lambda s: requests(s, "forward", "bad_request") == requests(before[0], "forward", "bad_request") + 1
                         and requests(s, "inference", "busy") == requests(before[0], "inference", "busy") + 1)
    assert value(after, "swarmlm_kv_cache_used_tokens") == 0


# ---- swarmlm health ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def health_runs(monitored_swarm) -> dict[str, subprocess.CompletedProcess]:
    """`swarmlm health` run three ways at once (they mostly wait on the DHT): {variant: finished process}."""
    dht, _, _ = monitored_swarm
    variants = {"full": ("--model", DEFAULT_MODEL), "gap": ("--model", GAP_MODEL), "json": ("--json",)}
    procs = {
        name: subprocess.Popen([sys.executable, "-m", "swarmlm.cli", "health", "--initial-peers", dht.maddrs[0], *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
        for name, args in variants.items()
    }
    results = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=120)
            results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def test_health_exits_zero_on_full_coverage(monitored_swarm, health_runs):
    _, peers, _ = monitored_swarm
    result = health_runs["full"]
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"model {DEFAULT_MODEL} (llama, 8 blocks): OK" in result.stdout
    assert f"swarm throughput {THROUGHPUT:.1f} tokens/s" in result.stdout
    for node in peers:
        assert node.peer_id in result.stdout


def test_health_reports_a_gap_and_exits_one(monitored_swarm, health_runs):
    _, _, gap_peer = monitored_swarm
    result = health_runs["gap"]
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"model {GAP_MODEL} (llama, 8 blocks): GAP - no peer serves blocks 3:8" in result.stdout
    assert "3:8" in result.stdout and "!! MISSING" in result.stdout
    assert f"swarmlm peer --model {GAP_MODEL} --blocks 3:8" in result.stdout
    assert gap_peer.peer_id in result.stdout


def test_health_json_lists_every_registered_model(monitored_swarm, health_runs):
    _, peers, gap_peer = monitored_swarm
    result = health_runs["json"]
    assert result.returncode == 1, result.stdout + result.stderr  # one model has a gap
    report = json.loads(result.stdout)
    models = {m["name"]: m for m in report["models"]}
    assert report["healthy"] is False and set(models) == {DEFAULT_MODEL, GAP_MODEL}
    full, gappy = models[DEFAULT_MODEL], models[GAP_MODEL]
    assert (full["healthy"], full["gaps"], full["num_blocks"], full["throughput"]) == (True, [], 8, THROUGHPUT)
    assert {p["peer_id"] for p in full["peers"]} == {node.peer_id for node in peers}
    assert [len(block["peers"]) for block in full["blocks"]] == [1] * 8
    assert (gappy["healthy"], gappy["gaps"], gappy["throughput"]) == (False, [[3, 8]], 0.0)
    assert [(p["peer_id"], p["state"], p["public_name"]) for p in gappy["peers"]] == \
        [(gap_peer.peer_id, "online", "gap-peer")]


def test_model_health_counts_only_online_peers():
    def record(peer: str, state: ServerState, start: int, end: int, throughput: float) -> ServerRecord:
        return ServerRecord(peer_id=peer, state=state, start=start, end=end, throughput=throughput,
                            free_cache_tokens=0, max_cache_tokens=0, version="0", torch_dtype="float32")

    peers = [record("a", ServerState.ONLINE, 0, 4, 10.0), record("b", ServerState.ONLINE, 2, 4, 5.0),
             record("c", ServerState.JOINING, 4, 6, 7.0), record("d", ServerState.OFFLINE, 6, 8, 7.0),
             record("e", ServerState.ONLINE, 7, 8, 3.0)]
    blocks = tuple(tuple(r for r in peers if r.start <= i < r.end) for i in range(8))
    health = ModelHealth("m", ModelRecord(num_blocks=8, family="llama"), blocks)
    assert health.gaps == [(4, 7)] and not health.healthy and health.throughput == 0
    assert health.block_throughputs == [10, 10, 15, 15, 0, 0, 0, 3]
    full = ModelHealth("m", ModelRecord(num_blocks=4, family="llama"), blocks[:4])
    assert full.healthy and full.throughput == 10 and [p.peer_id for p in full.peers] == ["a", "b"]
    text = render_text(SwarmReport((health,)))
    missing = [line.split()[0] for line in text.splitlines() if "!! MISSING" in line]
    assert missing == ["4:6", "6:7"], text  # runs split where the (non-online) peers change
    unknown = ModelHealth("x\x1b[2J", None)  # names come from the DHT: no terminal control characters
    assert not unknown.healthy and "no peer has registered model x" in unknown.problem()
    assert "model x?[2J: UNKNOWN" in render_text(SwarmReport((unknown,)))
    assert not SwarmReport(()).healthy


# ---- the health page --------------------------------------------------------------------------------


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("no chromium found: the health page test needs a headless browser; run scripts/install-test-deps.sh "
                "(`make test` runs it: it apt-get installs chromium) or install chromium yourself")


def test_health_page_shows_the_swarm_in_a_headless_browser(monitored_swarm):
    dht, peers, gap_peer = monitored_swarm
    browser = find_browser()
    assert "://" not in PAGE, "the page must not load external assets"
    with NodeProcess("health", "--serve", "--port", "0", "--refresh", "2", "--initial-peers", dht.maddrs[0]) as page:
        url = next(line for line in page.stdout_lines if line.startswith("http://"))
        report = json.loads(urllib.request.urlopen(url + "api/health", timeout=30).read())
        assert {m["name"] for m in report["models"]} == {DEFAULT_MODEL, GAP_MODEL}
        with tempfile.TemporaryDirectory(prefix="swarmlm-browser-") as profile:
            result = subprocess.run(
                [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", url],
                capture_output=True, text=True, timeout=120,
            )
    dom = result.stdout
    assert result.returncode == 0 and "<body" in dom, result.stderr[-2000:]
    assert '<div id="error"></div>' in dom, dom  # the page's fetch of api/health worked
    assert 'data-healthy="false"' in dom  # <body>: one model has a gap
    assert f'data-model="{DEFAULT_MODEL}" data-healthy="true"' in dom
    assert f'data-model="{GAP_MODEL}" data-healthy="false"' in dom
    assert 'data-gap="3:8"' in dom
    for node in [*peers, gap_peer]:
        assert f'data-peer-id="{node.peer_id}" data-state="online"' in dom
    assert "3 online peer(s)" in dom and f"swarm throughput {THROUGHPUT:.1f} tokens/s" in dom
