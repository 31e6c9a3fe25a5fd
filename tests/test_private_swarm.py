"""Private swarms (`--swarm-key FILE`): members generate the local model's tokens; a stranger (no key, or another
key) can neither join the DHT, read or write its records, nor call a peer, and the peer keeps serving members.

One private swarm: a bootstrap node and a peer serving blocks 0:8, both with the key (the CLI writes it)."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import hivemind
import pytest
from conftest import client_model
from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time
from swarmlm.local_swarm import start_dht, start_peer

from swarmlm.dht.records import block_key
from swarmlm.dht.registry import fetch_block_records
from swarmlm.utils.swarm_key import SwarmKey
from swarmlm.errors import JoinError, RemotePeerError, SwarmKeyError
from swarmlm.experts.protocol import INFERENCE, INFO, SpanRequest, check_response, pack
from swarmlm.models.embedded import DEFAULT_MODEL
from swarmlm.transport import Dialer
from swarmlm.utils.aio import LoopThread

PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def key_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("private") / "swarm.key"
    done = subprocess.run([sys.executable, "-m", "swarmlm.cli", "swarm-key", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "fingerprint" in done.stdout, done.stderr
    assert path.stat().st_mode & 0o777 == 0o600
    again = subprocess.run([sys.executable, "-m", "swarmlm.cli", "swarm-key", str(path)], capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 2 and "not overwritten" in again.stderr  # a key in use is never replaced
    return str(path)


@pytest.fixture(scope="module")
def private_swarm(tiny_model_path, key_path):
    with start_dht("--swarm-key", key_path) as dht:
        with start_peer(DEFAULT_MODEL, dht.maddrs[0], "--blocks", "0:8", "--swarm-key", key_path) as peer:
            yield dht, peer


def _generate(model, tokenizer, new_tokens: int = 8):
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    return ids, model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


def test_members_generate_the_local_tokens(private_swarm, key_path, local_model, tokenizer):
    """Over a direct session (the peer's ticket came over p2p, behind the proof) and over p2p, and a forward pass
    (an answer stream)."""
    dht, _ = private_swarm
    for direct in (True, False):
        with client_model(dht.maddrs, swarm_key=key_path, direct_connections=direct) as model:
            ids, remote = _generate(model, tokenizer)
            with model.inference_session(max_length=ids.shape[1] + 2) as session:
                model.generate(ids, max_new_tokens=2, session=session, do_sample=False)
            assert session.transports == (["direct"] if direct else ["p2p"])
            logits = model(ids).logits
    ids, local = _generate(local_model, tokenizer)
    assert remote.tolist() == local.tolist()
    assert (logits - local_model(ids).logits).abs().max().item() < 1e-3


@pytest.mark.parametrize("stranger_key", [None, "another"])
def test_a_stranger_cannot_join(private_swarm, tmp_path, stranger_key):
    """A client without the key, or with another swarm's, fails to start with a clear error (it never prints
    text from a swarm it is not part of)."""
    dht, _ = private_swarm
    kwargs = {}
    if stranger_key is not None:
        SwarmKey.generate(tmp_path / "other.key")
        kwargs["swarm_key"] = str(tmp_path / "other.key")
    with pytest.raises(JoinError, match="none of the initial peers answered"):
        with client_model(dht.maddrs, **kwargs):
            pass


@contextlib.contextmanager
def _stranger(maddrs):
    """A plain hivemind DHT node that joins through the members (ignoring that none answers) and its p2p."""
    node = hivemind.DHT(initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True,
                        ensure_bootstrap_success=False, client_mode=False)
    loop = LoopThread("stranger")
    p2p = loop.run(node.replicate_p2p(), timeout=30)
    try:
        yield node, loop, p2p
    finally:
        loop.run(p2p.shutdown(), timeout=30)
        loop.stop()
        node.shutdown()


def test_a_stranger_reads_no_record_and_writes_none(private_swarm, key_path):
    dht, peer = private_swarm
    with _stranger(dht.maddrs) as (stranger, _, _):
        assert stranger.get(block_key(DEFAULT_MODEL, 0), latest=True) is None
        stranger.store(block_key(DEFAULT_MODEL, 0), b"squat", get_dht_time() + 60, subkey=b"x")
        with client_model(dht.maddrs, swarm_key=key_path) as model:
            records = fetch_block_records(model.remote.dht, DEFAULT_MODEL, 8)
    assert [{r.peer_id for r in block} for block in records] == [{peer.peer_id}] * 8


@pytest.mark.parametrize("stranger_key", [None, SwarmKey(b"\x01" * 32)], ids=["no key", "another key"])
def test_a_stranger_cannot_call_a_peer_and_the_peer_keeps_serving(private_swarm, key_path, local_model, tokenizer,
                                                                   stranger_key):
    """The stranger knows the peer's id and address: its info call is refused (so it gets no direct ticket either),
    and an inference session it opens over p2p is answered with the refusal and closed."""
    dht, peer = private_swarm
    with _stranger(dht.maddrs) as (_, loop, p2p):
        dialer = Dialer(p2p, swarm_key=stranger_key)

        async def attempts():
            with pytest.raises(Exception, match="not a member of this private swarm"):
                await dialer.call(peer.peer_id, INFO, runtime_pb2.ExpertRequest(), runtime_pb2.ExpertResponse)
            channel = await dialer.open_p2p(peer.peer_id, INFERENCE)
            channel.send(runtime_pb2.ExpertRequest(metadata=pack(
                SpanRequest(model=DEFAULT_MODEL, start=0, end=8, max_length=8, batch_size=1))))
            try:
                return await channel.receive(runtime_pb2.ExpertResponse, 2**20)
            finally:
                channel.close()

        answer = loop.run(attempts(), timeout=60)
    with pytest.raises(RemotePeerError, match="not a member of this private swarm"):
        check_response(peer.peer_id, answer)
    with client_model(dht.maddrs, swarm_key=key_path) as model:
        assert _generate(model, tokenizer)[1].tolist() == _generate(local_model, tokenizer)[1].tolist()


def test_a_bad_key_file_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.key"
    path.write_text("/key/swarm/psk/1.0.0/\n/base16/\nnot hex\n")
    with pytest.raises(SwarmKeyError, match="not a swarm key file"):
        SwarmKey.load(path)
    with pytest.raises(SwarmKeyError, match="cannot read"):
        SwarmKey.load(tmp_path / "missing.key")
    key = SwarmKey.generate(tmp_path / "good.key")
    assert SwarmKey.load(tmp_path / "good.key").member_proof("a", "b") == key.member_proof("a", "b")
    assert key.member_proof("a", "b") != key.member_proof("b", "a") != SwarmKey(b"\x02" * 32).member_proof("b", "a")
