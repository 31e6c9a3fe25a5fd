"""Training the hosted blocks (SWARM-style) with real `swarmlm peer --train` processes on loopback.

One scenario (the module fixture `run`), then tests that check what it recorded:
  1. two replicas of blocks 0:4 and one peer with blocks 4:8 train from the embedded model's weights; a
     trainer client in this process sends micro-batches forward and backward through them;
  2. the loss on a fixed set of samples falls; after an epoch whose gradient and parameter averaging
     included both replicas, the replicas hold the same parameters (fetched with rpc_state), and the
     first replica's /metrics counts the averaging rounds and the bytes it put into them;
  3. one replica is SIGKILLed when it begins an averaging round; the survivor finishes that round or
     the next, training goes on, a fresh replica joins (downloads the survivor's state) and the two end
     with the same parameters after averaging together;
  4. `swarmlm export` writes the trained blocks as a checkpoint; `swarmlm peer --model DIR` serves it and
     generation through the swarm equals the local transformers model loaded from DIR; with a span
     gone, export fails naming the missing blocks.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch
from metrics_scrape import BYTES, ROUNDS, metrics_url, scrape, scrape_until, value
from swarmlm.local_swarm import NodeProcess, start_dht, start_peer
from transformers import AutoModelForCausalLM

from swarmlm.models.embedded import DEFAULT_MODEL

SEQ_LEN, MICRO_BATCH, TRAIN_SAMPLES = 64, 4, 16
TRAIN_ARGS = ("--train", "--run-id", "test", "--target-batch-size", "16", "--lr", "3e-3",
              "--matchmaking-time", "1", "--averaging-timeout", "10", "--throughput", "1000")
WAIT = 90.0  # seconds any single expected event may take on a loaded 2-core machine
EXACT = dict(atol=1e-6)  # all-reduce leaves replicas equal up to float rounding (x + (avg - x))


# ---- the trainer client ----------------------------------------------------------------------------

class TrainerLoop:
    """Sends micro-batches forward and backward through the swarm: in a background thread until stopped, or
    one at a time until a condition holds. The client's own tensors stay frozen: only the chain's input
    requires grad, so that backward reaches the peers."""

    def __init__(self, model, samples: torch.Tensor):
        self.model, self.samples = model, samples  # samples: [n, SEQ_LEN]
        self.losses: list[float] = []
        self.error: BaseException | None = None
        self._stop, self._thread = threading.Event(), None

    def step(self) -> None:
        first = (len(self.losses) * MICRO_BATCH) % len(self.samples)
        batch = self.samples[first:first + MICRO_BATCH]  # [MICRO_BATCH, SEQ_LEN]
        embeds = self.model.get_input_embeddings()(batch).requires_grad_(True)
        loss = self.model(inputs_embeds=embeds, labels=batch).loss
        loss.backward()
        self.losses.append(loss.item())

    def until(self, condition, *nodes: NodeProcess, timeout: float = WAIT):
        """Steps until `condition()` returns something true (checked after reading what `nodes` printed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.step()
            for node in nodes:
                _read_printed(node)
            result = condition()
            if result:
                return result
        raise TimeoutError(f"no joint epoch after {timeout} s of training:\n{_history(*nodes)}")

    def start(self) -> "TrainerLoop":
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="test-trainer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=WAIT)
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.step()
        except BaseException as e:  # surfaced by stop()
            self.error = e


def _eval_loss(model, samples: torch.Tensor) -> float:
    with torch.no_grad():
        return model(input_ids=samples, labels=samples).loss.item()


# ---- reading the peers' reports -------------------------------------------------------------------

def _epoch(line: str) -> dict:
    """Parses "EPOCH 3 blocks 0:4 samples=8/16 grad_peers=2 state_peers=2 rounds_ok=3 ..."."""
    words = line.split()
    fields = dict(word.split("=", 1) for word in words[4:])
    return dict(epoch=int(words[1]), grad_peers=int(fields["grad_peers"]), state_peers=int(fields["state_peers"]),
                downloaded=fields["downloaded"] == "1", rounds_failed=int(fields["rounds_failed"]))


def _epochs(node: NodeProcess) -> list[dict]:
    return [_epoch(line) for line in node.stdout_lines if line.startswith("EPOCH ")]


def _report_of(node: NodeProcess, epoch: int) -> dict:
    """The node's EPOCH report for `epoch` (waits for it if not read yet)."""
    for report in _epochs(node):
        if report["epoch"] == epoch:
            return report
    return _epoch(node.wait_for_line(lambda line: line.startswith(f"EPOCH {epoch} "), WAIT))


def _read_printed(node: NodeProcess) -> None:
    """Moves what the node printed so far into node.stdout_lines, without waiting."""
    try:
        node.wait_for_line(lambda line: False, timeout=0)
    except TimeoutError:
        pass


def _together(report: dict) -> bool:
    return report["grad_peers"] == 2 and report["state_peers"] == 2


def _joint_epoch(a: NodeProcess, b: NodeProcess, after: int):
    """The first epoch > `after` whose gradient and parameter rounds both replicas ran together (or None)."""
    theirs = {report["epoch"]: report for report in _epochs(b)}
    return next((r["epoch"] for r in _epochs(a) if r["epoch"] > after and _together(r)
                 and r["epoch"] in theirs and _together(theirs[r["epoch"]])), None)


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) of every process, from /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            table[int(stat.parent.name)] = (int(fields[1]), fields[19])
    return table


def _descendants(pid: int) -> dict[int, str]:
    """pid -> start time of every process below `pid` (its DHT node, p2p daemon, averagers...)."""
    table, found, frontier = _process_table(), {}, {pid}
    while frontier:
        frontier = {child for child, (parent, _) in table.items() if parent in frontier and child not in found}
        found.update({child: table[child][1] for child in frontier})
    return found


def _kill_leftovers(processes: dict[int, str]) -> None:
    """SIGKILLs those of `processes` still alive (the same start time: never a reused pid)."""
    table = _process_table()
    for pid, started in processes.items():
        if table.get(pid, (None, None))[1] == started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _peer_id(node: NodeProcess) -> str:
    return node.maddrs[0].rsplit("/p2p/", 1)[1]


class Spans:
    """Fetches a peer's current blocks over rpc_state through a client's network loop."""

    def __init__(self, remote, checkpoint):
        from transformers import AutoConfig

        from swarmlm.experts.families import family_for_config
        from swarmlm.training.export import block_tensor_shapes

        config = AutoConfig.from_pretrained(checkpoint)
        self.remote = remote
        self.shapes = block_tensor_shapes(checkpoint, family_for_config(config), config.num_hidden_layers)

    def state(self, node: NodeProcess, start: int, end: int):
        from swarmlm.training.export import fetch_span_state, shapes_of

        return fetch_span_state(self.remote, _peer_id(node), start, end, shapes_of(self.shapes, start, end))

    def settled_pair(self, a: NodeProcess, b: NodeProcess, start: int, end: int):
        """Both replicas' states at the same epoch, after both reported that epoch (trainer stopped)."""
        while True:
            state_a, state_b = self.state(a, start, end), self.state(b, start, end)
            if state_a.training_epoch == state_b.training_epoch:
                epoch = state_a.training_epoch
                return epoch, state_a, state_b, _report_of(a, epoch), _report_of(b, epoch)
            behind = b if state_a.training_epoch > state_b.training_epoch else a
            _report_of(behind, max(state_a.training_epoch, state_b.training_epoch))

    def averaged_pair(self, trainer: TrainerLoop, a: NodeProcess, b: NodeProcess, start: int, end: int, after: int):
        """Trains until both replicas ran an epoch's rounds together, then returns their settled states.
        Parameters are averaged last in an epoch; if micro-batches already in flight started one more epoch
        whose parameter round missed a replica, trains on to the next joint epoch."""
        for _ in range(3):
            after = trainer.until(lambda: _joint_epoch(a, b, after), a, b)
            settled = self.settled_pair(a, b, start, end)
            if settled[3]["state_peers"] == 2 and settled[4]["state_peers"] == 2:
                return settled
            after = settled[0]
        raise AssertionError(f"the replicas never settled right after averaging together:\n{_history(a, b)}")




def _rounds(samples: dict) -> dict[tuple[str, str], float]:
    return {(kind, outcome): value(samples, ROUNDS, kind=kind, outcome=outcome)
            for kind in ("gradients", "state") for outcome in ("completed", "failed")}


def _rounds_counted(samples: dict, parameters: int) -> bool:
    """Whether a scrape shows completed gradient and state rounds, with the bytes of every counted state round
    (the counters are updated one after the other: a scrape may fall in between). A state round puts the
    span's parameters and both Adam statistics (float32) into the all-reduce."""
    rounds = _rounds(samples)
    return rounds["gradients", "completed"] >= 1 and rounds["state", "completed"] >= 1 and \
        value(samples, BYTES, kind="state") == rounds["state", "completed"] * 3 * 4 * parameters


def _max_difference(a, b) -> float:
    return max((a.tensors[name] - b.tensors[name]).abs().max().item() for name in a.tensors)


def _history(*nodes: NodeProcess) -> str:
    """The nodes' training reports and hivemind's warnings about partial rounds, for failure messages."""
    return "\n".join(f"{node.args[node.args.index('--blocks') + 1]} {_peer_id(node)[-6:]}: {line}" for node in nodes
                     for line in node.stdout_lines + node.stderr.splitlines()
                     if line.startswith(("EPOCH", "AVERAGING")) or "received" in line or "refused" in line)


# ---- the scenario --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tiny_model_path, tokenizer, tmp_path_factory):
    from pydoc_data.topics import topics

    from swarmlm import AutoDistributedModelForCausalLM
    from swarmlm.errors import SwarmError
    from swarmlm.training.export import export_model

    text = "\n\n".join(topics[name] for name in sorted(topics)[:12])
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    samples = ids[:TRAIN_SAMPLES * SEQ_LEN].view(TRAIN_SAMPLES, SEQ_LEN)
    out = types.SimpleNamespace(export_dir=tmp_path_factory.mktemp("export") / "trained")
    with contextlib.ExitStack() as stack:
        dht = stack.enter_context(start_dht())
        nodes = [start_peer(DEFAULT_MODEL, dht.maddrs[0], "--blocks", span, *TRAIN_ARGS, *extra)
                 for span, extra in (("0:4", ("--metrics-port", "0")), ("0:4", ()), ("4:8", ()))]
        for node in nodes:  # torn down even if another one fails to start
            stack.callback(node.terminate)
        first, victim, second_half = (node.wait_ready() for node in nodes)
        out.metrics_before = scrape(metrics_url(first))
        # 4:8 has one peer: a short ban lets retries reach it again after a transient stream failure
        client = AutoDistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, initial_peers=dht.maddrs,
                                                                 request_timeout=30.0, ban_duration=1.0)
        stack.callback(client.close)
        client.requires_grad_(False)
        spans = Spans(client.remote, tiny_model_path)
        out.initial = spans.state(first, 0, 4)
        out.initial_loss = _eval_loss(client, samples)
        trainer = TrainerLoop(client, samples)

        # 1-2: train until both replicas averaged together after a few epochs, then compare them
        out.replicas = spans.averaged_pair(trainer, first, victim, 0, 4, after=2)
        out.replicas_history = _history(first, victim)
        parameters = sum(tensor.numel() for tensor in out.initial.tensors.values())
        out.metrics_after = scrape_until(metrics_url(first), lambda samples: _rounds_counted(samples, parameters))
        out.trained_loss = _eval_loss(client, samples)

        # 3: kill a replica as it begins averaging; the survivor goes on; a fresh replica joins
        trainer.start()
        line = victim.wait_for_line(lambda line: line.startswith("AVERAGING ")
                                    and int(line.split()[-1]) >= out.replicas[0], WAIT)
        # a peer SIGKILLed mid-round can leave its DHT process stuck on a lock that hivemind's processes share
        stack.callback(_kill_leftovers, _descendants(victim.proc.pid))
        victim.terminate(signal.SIGKILL)
        out.killed_at = int(line.split()[-1])
        out.after_kill = [_report_of(first, out.killed_at + 1), _report_of(first, out.killed_at + 2)]
        fresh = stack.enter_context(start_peer(DEFAULT_MODEL, dht.maddrs[0], "--blocks", "0:4", *TRAIN_ARGS))
        trainer.stop()
        out.fresh_join = next(r for r in _epochs(fresh) if r["downloaded"])  # reported before READY
        out.survivors = spans.averaged_pair(trainer, first, fresh, 0, 4, after=out.fresh_join["epoch"])
        out.survivors_history = _history(first, fresh)
        out.final_loss = _eval_loss(client, samples)
        out.losses = list(trainer.losses)
        out.first_epochs = _epochs(first)

        # 4: export, compare with the peers' current blocks, serve the export
        exported = subprocess.run(
            [sys.executable, "-m", "swarmlm.cli", "export", "--model", DEFAULT_MODEL, "--initial-peers", dht.maddrs[0],
             "--out", str(out.export_dir)], capture_output=True, text=True, timeout=WAIT)
        assert exported.returncode == 0, exported.stderr
        out.export_stdout = exported.stdout
        out.sources = json.loads((out.export_dir / "training_state.json").read_text())["blocks"]
        by_id = {_peer_id(node): node for node in (first, fresh, second_half)}
        out.source_states = [spans.state(by_id[s["peer_id"]], s["start"], s["end"]) for s in out.sources]
        out.bad_state_request = _bad_state_request(client.remote, first)
        second_half.terminate()  # graceful: announces OFFLINE, so blocks 4:8 are gone at once
        try:
            export_model(DEFAULT_MODEL, dht.maddrs, out.export_dir.parent / "incomplete")
            out.missing_error = None
        except SwarmError as e:
            out.missing_error = e
        yield out


def _bad_state_request(remote, node: NodeProcess) -> str:
    from swarmlm.errors import RemotePeerError
    from swarmlm.experts.protocol import SpanRequest
    from swarmlm.training.export import call_state

    request = SpanRequest(model=remote.model, start=2, end=6)  # the peer serves 0:4
    try:
        remote.loop.run(call_state(remote.dialer, _peer_id(node), request, {}, 30.0))
    except RemotePeerError as e:
        return str(e)
    return "no error"


# ---- tests -----------------------------------------------------------------------------------------

def test_training_through_the_swarm_lowers_the_loss(run):
    assert all(math.isfinite(loss) for loss in run.losses)
    assert run.trained_loss < run.initial_loss - 0.3, (run.initial_loss, run.trained_loss)
    assert run.final_loss < run.trained_loss, (run.trained_loss, run.final_loss)
    epoch, trained, _, _, _ = run.replicas
    assert epoch >= 3 and run.initial.training_epoch == 0
    assert max((trained.tensors[n] - run.initial.tensors[n]).abs().max().item() for n in trained.tensors) > 1e-3


def test_replicas_hold_identical_parameters_after_averaging(run):
    epoch, first, second, first_report, second_report = run.replicas
    assert first_report["state_peers"] == second_report["state_peers"] == 2, (first_report, second_report)
    assert first.tensors.keys() == second.tensors.keys() and len(first.tensors) == 4 * 9
    difference = _max_difference(first, second)
    assert difference <= EXACT["atol"], f"replicas differ by {difference:.2e} at epoch {epoch}:\n{run.replicas_history}"


def test_training_peer_counts_its_averaging_rounds_in_its_metrics(run):
    assert set(_rounds(run.metrics_before).values()) == {0.0}  # nothing averaged before the first micro-batch
    after, parameters = _rounds(run.metrics_after), sum(tensor.numel() for tensor in run.initial.tensors.values())
    assert after["gradients", "completed"] >= 1 and after["state", "completed"] >= 1
    # a gradient round puts the span's gradients (float32) into the all-reduce; counted also when the replica
    # refused a non-finite average (then the round counts as failed)
    gradient_rounds = value(run.metrics_after, BYTES, kind="gradients") / (4 * parameters)
    assert gradient_rounds == int(gradient_rounds)
    assert after["gradients", "completed"] <= gradient_rounds <= after["gradients", "completed"] \
        + after["gradients", "failed"]


def test_a_replica_killed_mid_round_leaves_the_survivor_training(run):
    next_epoch, after_next = run.after_kill  # the survivor finished the interrupted round (or the next one)
    assert next_epoch["epoch"] == run.killed_at + 1 and after_next["epoch"] == run.killed_at + 2
    assert all(math.isfinite(loss) for loss in run.losses) and run.final_loss < run.initial_loss - 0.3
    assert [e["epoch"] for e in run.first_epochs] == sorted({e["epoch"] for e in run.first_epochs})
    # the fresh replica started from the survivor's state and trained with it to identical parameters
    assert run.fresh_join["epoch"] > run.killed_at
    epoch, survivor, fresh, survivor_report, fresh_report = run.survivors
    assert epoch > run.fresh_join["epoch"] and survivor_report["state_peers"] == fresh_report["state_peers"] == 2
    difference = _max_difference(survivor, fresh)
    assert difference <= EXACT["atol"], \
        f"replicas differ by {difference:.2e} at epoch {epoch}:\n{run.survivors_history}"


def test_exported_checkpoint_holds_the_trained_blocks_and_serves_like_the_local_model(run, tokenizer, local_model):
    from swarmlm import AutoDistributedModelForCausalLM

    assert f"EXPORTED {run.export_dir}" in run.export_stdout
    assert [(s["start"], s["end"]) for s in run.sources] == [(0, 4), (4, 8)]
    assert all(s["training_epoch"] is not None for s in run.sources)
    local = AutoModelForCausalLM.from_pretrained(run.export_dir, dtype=torch.float32).eval()
    exported = local.state_dict()
    for state in run.source_states:  # the blocks: what the training peers hold
        for name, tensor in state.tensors.items():
            assert torch.equal(exported[name], tensor), name
    original = local_model.state_dict()  # embeddings, final norm, LM head: the original checkpoint's
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(exported[name], original[name]), name
    with NodeProcess("peer", "--model", str(run.export_dir), "--num-blocks", "8", "--new-swarm", "--num-threads", "1",
                     "--throughput", "1000", "--log-level", "warning") as peer:
        model = AutoDistributedModelForCausalLM.from_pretrained(str(run.export_dir), initial_peers=peer.maddrs)
        try:
            ids = tokenizer("The import statement", return_tensors="pt")["input_ids"]
            with torch.no_grad():
                torch.testing.assert_close(model(ids).logits, local(ids).logits, atol=1e-3, rtol=0)
            expected = local.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
            assert model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False).tolist() == \
                expected.tolist()
        finally:
            model.close()


def test_export_names_missing_blocks_and_state_requests_are_validated(run):
    from swarmlm.training.export import ExportError

    assert isinstance(run.missing_error, ExportError), run.missing_error
    assert "no online peer serves blocks 4:8" in str(run.missing_error)
    assert "blocks 2:6 of" in run.bad_state_request and "not served here" in run.bad_state_request


def test_training_peer_settings_are_validated():
    from swarmlm.peer.config import PeerConfig
    from swarmlm.training.span_trainer import SpanTrainingConfig

    training = SpanTrainingConfig(matchmaking_time=1.0, averaging_timeout=10.0)
    with pytest.raises(ValueError, match="fixed blocks"):
        PeerConfig(model=DEFAULT_MODEL, num_blocks=4, new_swarm=True, training=training)
    with pytest.raises(ValueError, match="float32"):
        PeerConfig(model=DEFAULT_MODEL, blocks=(0, 4), new_swarm=True, torch_dtype="bfloat16", training=training)
    with pytest.raises(ValueError, match="must cover an epoch"):
        PeerConfig(model=DEFAULT_MODEL, blocks=(0, 4), new_swarm=True, request_timeout=15.0, training=training)
    with pytest.raises(ValueError, match="matchmaking_time < averaging_timeout"):
        SpanTrainingConfig(matchmaking_time=5.0, averaging_timeout=5.0)


def test_span_trainer_ends_epochs_on_counted_samples_and_refuses_non_finite_gradients(tiny_model_path):
    """One replica in this process: hivemind's time estimate never ends an epoch (only counted samples, or a
    replica that moved on, do); non-finite micro-batch gradients and non-finite averages are refused."""
    from concurrent.futures import ThreadPoolExecutor

    from hivemind.optim.progress_tracker import GlobalTrainingProgress
    from transformers import AutoConfig

    from swarmlm.dht.node import create_dht, shutdown_dht
    from swarmlm.errors import RequestError
    from swarmlm.experts.families import family_for_config
    from swarmlm.experts.span import BlockSpan
    from swarmlm.training.span_trainer import EpochFinished, SpanTrainer, SpanTrainingConfig

    config = AutoConfig.from_pretrained(tiny_model_path)
    torch.manual_seed(0)
    span = BlockSpan(family_for_config(config), config, 0, 1).requires_grad_(True)
    positions = torch.arange(8).expand(2, 8)

    def grads():  # of a toy loss on one micro-batch of 2 sequences
        output = span(torch.randn(2, 8, config.hidden_size), positions)  # [2, 8, hidden]
        return torch.autograd.grad(output.square().mean(), list(span.parameters()))

    dht, compute, reports, epoch_done = create_dht([], ["/ip4/127.0.0.1/tcp/0"]), ThreadPoolExecutor(1), [], \
        threading.Event()

    def on_report(report) -> None:
        if isinstance(report, EpochFinished):
            reports.append(report)
            epoch_done.set()

    trainer = SpanTrainer(span, "unit", dht, SpanTrainingConfig(target_batch_size=4, lr=1e-2, matchmaking_time=1.0,
                                                                 averaging_timeout=5.0), on_report=on_report)
    try:
        opt, before = trainer.optimizer, [param.detach().clone() for param in span.parameters()]
        with opt.tracker.pause_updates():  # no progress fetch replaces the swarm's view meanwhile
            opt.tracker.global_progress = GlobalTrainingProgress(0, 2, 4, 1, 0, eta_next_epoch=0.0, next_fetch_time=0.0)
            assert opt.tracker.ready_to_update_epoch  # hivemind: "time is up"
            assert not opt.epoch_is_over()  # 2 of 4 samples: the epoch goes on
            opt.tracker.global_progress.epoch = 1
            assert opt.epoch_is_over()  # another replica moved on: join its round
            opt.tracker.global_progress = GlobalTrainingProgress(0, 0, 4, 1, 0, float("inf"), 0.0)
        with pytest.raises(RequestError, match="not finite"):
            trainer.accumulate([torch.full_like(grad, float("nan")) for grad in grads()], batch_size=2)
        trainer.accumulate(grads(), batch_size=2)
        trainer.accumulate(grads(), batch_size=2)
        trainer.start(compute)
        assert epoch_done.wait(30.0), "the epoch did not end after target_batch_size samples"
        assert reports[0].epoch == 1 and reports[0].local_samples == 4 and trainer.epoch == 1
        assert any(not torch.equal(old, new) for old, new in zip(before, span.parameters()))
        with opt.grad_averager.get_tensors() as averaged:  # what a partial all-reduce leaves for a weight-0 replica
            averaged[0].fill_(float("nan"))
        with pytest.raises(FloatingPointError, match="not finite"):
            opt._load_averaged_gradients_into_optimizer_()
    finally:
        trainer.shutdown(compute)
        compute.shutdown()
        shutdown_dht(dht)
