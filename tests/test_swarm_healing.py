"""The swarm heals itself and accounts for its caches exactly (real peer processes on loopback):
automatic balancing closes a gap left by a dead peer; KV-cache reservations show up in the DHT
exactly and are freed on close and when a client dies; a peer out of cache makes clients route
around it."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time

import pytest

from swarmlm.local_swarm import local_swarm, start_dht, start_peer
from swarmlm.dht.records import ServerState
from swarmlm.dht.registry import fetch_block_records
from swarmlm.models.embedded import DEFAULT_MODEL

NUM_BLOCKS = 8


def wait_until(condition, timeout: float, what: str, poll: float = 0.2):
    """Polls `condition()` until it returns a truthy value (returned) or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached within {timeout} s")
        time.sleep(poll)


def online_spans(dht) -> dict[str, tuple[int, int]]:
    records = fetch_block_records(dht, DEFAULT_MODEL, NUM_BLOCKS)
    return {r.peer_id: (r.start, r.end) for block in records for r in block if r.state == ServerState.ONLINE}


def covered(spans: dict[str, tuple[int, int]]) -> bool:
    return all(any(start <= block < end for start, end in spans.values()) for block in range(NUM_BLOCKS))


def client_for(maddr: str, **config):
    from swarmlm import AutoDistributedModelForCausalLM

    return AutoDistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, initial_peers=[maddr], **config)


def _peer_id(process) -> str:
    return process.maddrs[0].rsplit("/p2p/", 1)[1]


def test_peers_with_num_blocks_close_a_gap_left_by_a_dead_peer(tiny_model_path, local_model, tokenizer):
    args = ("--num-blocks", "4", "--throughput", "1000", "--update-period", "2", "--balance-period", "2")
    with contextlib.ExitStack() as stack:
        dht = stack.enter_context(start_dht())
        peers = [stack.enter_context(start_peer(DEFAULT_MODEL, dht.maddrs[0], *args)) for _ in range(3)]
        client = client_for(dht.maddrs[0])
        stack.callback(client.close)
        spans = wait_until(lambda: (s := online_spans(client.remote.dht)) and covered(s) and len(s) == 3 and s,
                           60, "3 peers covering all blocks")
        # kill the peer that alone serves some blocks: a gap opens until another peer moves there
        sole = next(p for p in peers if any(
            sum(start <= block < end for start, end in spans.values()) == 1
            for block in range(*spans[_peer_id(p)])))
        killed_at = time.monotonic()
        sole.terminate(signal.SIGKILL)
        survivors = {_peer_id(p) for p in peers if p is not sole}
        wait_until(lambda: covered({k: v for k, v in online_spans(client.remote.dht).items() if k in survivors}),
                   60, "the survivors covering all blocks again")
        print(f"gap closed {time.monotonic() - killed_at:.1f} s after the kill")
        ids = tokenizer("Exceptions are raised", return_tensors="pt")["input_ids"]
        expected = local_model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        output = client.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert output.tolist() == expected.tolist()


@pytest.fixture(scope="module")
def cache_swarm(tiny_model_path):
    """One peer serving all blocks with a 1000-token KV budget; it announces only on cache changes and
    closes sessions idle for 8 s."""
    with local_swarm(DEFAULT_MODEL, ["0:8"], "--max-cache-tokens", "1000", "--update-period", "60",
                       "--session-timeout", "8") as (dht, peers):
        yield dht, peers[0]


def announced_free(dht) -> set[int]:
    return {r.free_cache_tokens for block in fetch_block_records(dht, DEFAULT_MODEL, NUM_BLOCKS) for r in block}


def test_cache_reservations_are_announced_exactly(cache_swarm, tokenizer):
    dht, _ = cache_swarm
    client = client_for(dht.maddrs[0])
    try:
        ids = tokenizer("A function definition", return_tensors="pt")["input_ids"]
        expect = lambda free: wait_until(lambda: announced_free(client.remote.dht) == {free}, 20, f"{free} free")
        expect(1000)
        with client.inference_session(max_length=100) as outer:
            client.generate(ids, max_new_tokens=2, session=outer)
            expect(900)
            with client.inference_session(max_length=50) as inner:
                client.generate(ids, max_new_tokens=2, session=inner)
                expect(850)
            expect(900)
        expect(1000)
    finally:
        client.close()


def test_cache_of_an_idle_session_is_freed_after_the_session_timeout(cache_swarm, tokenizer):
    dht, _ = cache_swarm
    client = client_for(dht.maddrs[0])
    try:
        ids = tokenizer("A function definition", return_tensors="pt")["input_ids"]
        session = client.inference_session(max_length=300)
        client.generate(ids, max_new_tokens=2, session=session)
        wait_until(lambda: announced_free(client.remote.dht) == {700}, 20, "the session's 300 tokens reserved")
        wait_until(lambda: announced_free(client.remote.dht) == {1000}, 30, "the idle session's tokens freed")
        session.close()
    finally:
        client.close()


CLIENT_SCRIPT = """
import sys, time, torch
from swarmlm import AutoDistributedModelForCausalLM
model = AutoDistributedModelForCausalLM.from_pretrained(sys.argv[1], initial_peers=[sys.argv[2]])
session = model.inference_session(max_length=200)
model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=1, session=session)
print("OPEN", flush=True)
time.sleep(600)
"""


def test_cache_is_freed_when_a_client_dies_mid_session(cache_swarm):
    dht, _ = cache_swarm
    client = client_for(dht.maddrs[0])
    process = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, DEFAULT_MODEL, dht.maddrs[0]],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.strip() == "OPEN", process.stderr.read()
        wait_until(lambda: announced_free(client.remote.dht) == {800}, 20, "the session's 200 tokens reserved")
        process.send_signal(signal.SIGKILL)
        process.wait()
        wait_until(lambda: announced_free(client.remote.dht) == {1000}, 20, "the dead client's tokens freed")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        client.close()


def test_concurrent_clients_route_around_a_peer_out_of_cache(tiny_model_path, local_model, tokenizer):
    """A fast peer with room for one session (30 tokens) and a slow one with plenty: every client's output is
    exact, and the clients that got "busy" from the fast peer finished on the other."""
    prompts = ["Python supports", "A class definition", "The import statement"]
    with local_swarm(DEFAULT_MODEL, [], "--update-period", "60") as (dht, _), contextlib.ExitStack() as stack:
        small = stack.enter_context(start_peer(DEFAULT_MODEL, dht.maddrs[0], "--blocks", "0:8", "--throughput",
                                               "100000", "--max-cache-tokens", "30", "--update-period", "60"))
        stack.enter_context(start_peer(DEFAULT_MODEL, dht.maddrs[0], "--blocks", "0:8", "--throughput", "1000",
                                       "--update-period", "60"))
        clients = [stack.enter_context(contextlib.closing(client_for(dht.maddrs[0], route_refresh_period=600)))
                   for _ in prompts]
        for client in clients:  # every client sees the fast peer's whole cache free and will try it first
            wait_until(lambda: len(online_spans(client.remote.dht)) == 2, 30, "both peers online")
            client.remote.manager.refresh(force=True)
        results, errors, sessions = {}, [], {}

        def generate(i: int) -> None:
            try:
                ids = tokenizer(prompts[i], return_tensors="pt")["input_ids"]
                with clients[i].inference_session(max_length=ids.shape[1] + 16) as session:
                    sessions[i] = session
                    results[i] = clients[i].generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                                     session=session)
            except Exception as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=generate, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors, errors
        for i, prompt in enumerate(prompts):
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            expected = local_model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
            assert results[i].tolist() == expected.tolist()
        assert sum(s.failovers for s in sessions.values()) >= 1, "some client should have been refused as busy"
        assert any(_peer_id(small) not in {h.peer_id for h in s.route} for s in sessions.values())
