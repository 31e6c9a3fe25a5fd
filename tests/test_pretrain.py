"""Collaborative pretraining: the data path, atomic checkpoints, a single trainer's loss, and a real
swarm of `swarmlm train` processes on loopback (a trainer killed mid-run, a late joiner, and the saved
checkpoint served by `swarmlm peer` and compared with the local transformers model)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
from pathlib import Path

import pytest
import torch
from metrics_scrape import BYTES, ROUNDS, metrics_url, scrape_until, value
from swarmlm.local_swarm import NodeProcess
from transformers import AutoModelForCausalLM

from swarmlm.models.embedded import DEFAULT_MODEL
from swarmlm.training.checkpoint import TRAINING_STATE_FILE, save_checkpoint
from swarmlm.training.config import DataConfig, TrainConfig
from swarmlm.training.data import (TrainingDataError, clean_and_deduplicate, clean_text,
                                   iterate_batches, load_documents, prepare_data, shard_indices, split_held_out)
from swarmlm.training.model import build_model, parameter_hash

FAST_MODEL = dict(seed=0, num_layers=2)  # the embedded tiny llama, 2 of its 8 layers: a fast fresh model


@pytest.fixture(scope="module")
def starting_model(tiny_model_path):
    return build_model(DEFAULT_MODEL, **FAST_MODEL)


def _doc(words: int, tag: str) -> str:
    return " ".join(f"{tag}{i}" for i in range(words))


# ---- the data path ----------------------------------------------------------------------------------

def test_clean_text_normalizes_whitespace_but_keeps_indentation():
    raw = "Title  \r\n\r\n\r\n\r\n  def f():\t\n      return 1   \n\n\n"
    assert clean_text(raw) == "Title\n\n  def f():\n      return 1"
    assert clean_text("e\u0301") == "\u00e9"  # NFC


def test_dedup_drops_exact_duplicates_after_cleaning_and_short_documents():
    long_a, long_b = _doc(30, "a"), _doc(30, "b")
    docs = [long_a, long_a + "   \n\n\n", "tiny", "", long_b, "\r\n" + long_a]
    kept, stats = clean_and_deduplicate(docs, min_chars=20)
    assert kept == [long_a, long_b]
    assert stats == dict(documents_read=6, dropped_short=2, dropped_duplicates=2)


def test_held_out_split_is_disjoint_deterministic_and_never_empty():
    docs = [_doc(40, f"d{i}_") for i in range(50)]
    train, val = split_held_out(docs, val_fraction=0.2)
    assert set(train).isdisjoint(val) and sorted(train + val) == sorted(docs)
    assert 0 < len(val) < len(docs)
    assert split_held_out(list(reversed(docs)), 0.2)[1] == list(reversed(val))  # by content, not position
    _, val_small = split_held_out(docs[:2], val_fraction=0.001)
    assert len(val_small) == 1
    with pytest.raises(TrainingDataError, match="at least 2"):
        split_held_out(docs[:1], 0.1)


@pytest.mark.parametrize("num_shards", [1, 2, 3, 7])
def test_shards_are_disjoint_and_cover_every_sample(num_shards):
    shards = [set(shard_indices(100, num_shards, k).tolist()) for k in range(num_shards)]
    assert sum(len(s) for s in shards) == 100 and set().union(*shards) == set(range(100))
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1


def test_builtin_corpus_pipeline_is_deterministic_and_splits_cleanly(starting_model):
    tokenizer = starting_model.tokenizer
    config = DataConfig(seq_len=64, num_shards=3, shard_index=1)
    data, again = prepare_data(config, tokenizer), prepare_data(config, tokenizer)
    assert torch.equal(data.train, again.train) and torch.equal(data.val, again.val)
    assert data.train.shape[1] == data.val.shape[1] == 64 and len(data.val) == config.max_val_samples
    assert data.stats["train_documents"] > data.stats["val_documents"] > 0
    assert data.shard.tolist() == list(range(1, len(data.train), 3))
    # held-out documents never reach training: no held-out sample occurs in the training samples
    train_rows = {tuple(row) for row in data.train.tolist()}
    assert not any(tuple(row) in train_rows for row in data.val.tolist())
    # batches come only from this shard, and a pass reshuffles
    shard_rows = {tuple(data.train[i].tolist()) for i in data.shard.tolist()}
    batches = iterate_batches(data, batch_size=8, seed=0, shard_index=1)
    first_pass = [next(batches) for _ in range(len(data.shard) // 8)]
    assert all(tuple(row) in shard_rows for batch in first_pass for row in batch.tolist())
    assert not torch.equal(next(batches), first_pass[0])
    replay = iterate_batches(data, batch_size=8, seed=0, shard_index=1)
    assert torch.equal(next(replay), first_pass[0])


def test_text_files_and_directories_are_read_one_document_per_file(tmp_path, starting_model):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    for i in range(6):
        (corpus / ("sub" if i % 2 else ".") / f"doc{i}.txt").write_text(_doc(300, f"w{i}_"))
    (corpus / "dup.txt").write_text(_doc(300, "w0_") + "\n\n\n")  # a duplicate of doc0 after cleaning
    (corpus / ".hidden.txt").write_text(_doc(300, "hidden"))
    (corpus / "binary.bin").write_bytes(b"\xff\xfe\x00\x81" * 10)
    single = tmp_path / "single.txt"
    single.write_text(_doc(300, "single"))
    documents = load_documents([str(corpus), str(single)])
    assert len(documents) == 8 and not any("hidden" in d for d in documents)
    data = prepare_data(DataConfig(sources=(str(corpus), str(single)), seq_len=32), starting_model.tokenizer)
    assert data.stats["dropped_duplicates"] == 1
    assert data.stats["train_documents"] + data.stats["val_documents"] == 7
    with pytest.raises(TrainingDataError, match="does not exist"):
        load_documents([str(tmp_path / "missing")])


def _hf_dataset_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "hf_dataset"
    directory.mkdir()
    (directory / "dataset_info.json").write_text("{}")
    (directory / "state.json").write_text("{}")
    return directory


def test_hf_dataset_directory_without_datasets_package_is_a_clear_error(tmp_path, monkeypatch):
    directory = _hf_dataset_dir(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(TrainingDataError, match=r"`datasets` package is not installed.*pip install datasets"):
        load_documents([str(directory)])


def test_hf_dataset_directory_reads_the_text_column_of_the_train_split(tmp_path, monkeypatch):
    directory = _hf_dataset_dir(tmp_path)

    class Dataset:
        def __init__(self, rows):
            self.rows, self.column_names = rows, sorted(rows[0])

        def __getitem__(self, column):
            return [row[column] for row in self.rows]

    class DatasetDict(dict):
        pass

    splits = DatasetDict(train=Dataset([{"text": "first", "id": 1}, {"text": "second", "id": 2}]),
                         test=Dataset([{"text": "other", "id": 3}]))
    fake = types.SimpleNamespace(DatasetDict=DatasetDict, load_from_disk=lambda path: splits)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert load_documents([str(directory)]) == ["first", "second"]
    with pytest.raises(TrainingDataError, match="no column 'body'"):
        load_documents([str(directory)], text_column="body")


def test_canonical_final_hash_is_the_most_common_then_the_smallest_peer_id():
    from swarmlm.training.finish import canonical_hash
    from swarmlm.training.roster import TrainerEntry

    def entry(peer: str, epoch, digest):
        return TrainerEntry(peer, 0, 1, finished_epoch=epoch, param_hash=digest)

    assert canonical_hash([entry("c", 5, "x"), entry("a", 5, "y"), entry("b", 5, "x")]) == "x"  # majority
    assert canonical_hash([entry("c", 5, "x"), entry("a", 5, "y")]) == "y"  # tie: smallest peer id
    assert canonical_hash([entry("a", 4, "old"), entry("b", 5, "new"), entry("c", None, None)]) == "new"
    assert TrainerEntry.from_wire("p", {"shard_index": 0, "num_shards": "1"}) is None  # remote data is checked
    assert TrainerEntry.from_wire("p", entry("p", 5, "x").to_wire()) == entry("p", 5, "x")


# ---- models and checkpoints -------------------------------------------------------------------------

def test_model_sources_fresh_seeded_config_json_and_checkpoint(tmp_path, starting_model):
    same = build_model(DEFAULT_MODEL, **FAST_MODEL)
    assert same.fresh and same.model.config.num_hidden_layers == 2
    assert parameter_hash(same.model) == parameter_hash(starting_model.model)
    assert parameter_hash(build_model(DEFAULT_MODEL, seed=1, num_layers=2).model) != parameter_hash(same.model)
    starting_model.model.config.to_json_file(tmp_path / "config.json")  # a bare config: fresh, same seeding
    from_config = build_model(str(tmp_path / "config.json"), seed=0)
    assert from_config.fresh and parameter_hash(from_config.model) == parameter_hash(same.model)
    save_checkpoint(tmp_path / "ckpt", same.model, same.tokenizer)
    loaded = build_model(str(tmp_path / "ckpt"))
    assert not loaded.fresh and parameter_hash(loaded.model) == parameter_hash(same.model)
    with pytest.raises(ValueError, match="only to fresh models"):
        build_model(str(tmp_path / "ckpt"), num_layers=1)


def _perturbed(model, value: float):
    with torch.no_grad():
        model.lm_head.weight.fill_(value)
    return model


def test_save_replaces_atomically_and_a_failed_save_keeps_the_old_checkpoint(tmp_path, starting_model, monkeypatch):
    model, tokenizer = build_model(DEFAULT_MODEL, **FAST_MODEL).model, starting_model.tokenizer
    target = tmp_path / "ckpt"
    save_checkpoint(target, _perturbed(model, 0.25), tokenizer, training_state={"epoch": 1})
    save_checkpoint(target, _perturbed(model, 0.5), tokenizer, training_state={"epoch": 2})  # replace
    assert AutoModelForCausalLM.from_pretrained(target).lm_head.weight.eq(0.5).all()

    def fail_midway(directory, *args, **kwargs):
        (Path(directory) / "tokenizer.json").write_text("{ half written")
        raise OSError("disk full")

    monkeypatch.setattr(tokenizer, "save_pretrained", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(target, _perturbed(model, 0.75), tokenizer, training_state={"epoch": 3})
    assert json.loads((target / TRAINING_STATE_FILE).read_text()) == {"epoch": 2}
    assert AutoModelForCausalLM.from_pretrained(target).lm_head.weight.eq(0.5).all()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary left behind


def test_a_save_never_deletes_files_it_did_not_write_unless_told_to(tmp_path, starting_model):
    """A directory with a user's files is refused (changed in nothing), early by check_replaceable and again by
    the save itself; a file added into a checkpoint directory is kept the same way; --overwrite replaces."""
    from swarmlm.errors import CheckpointError
    from swarmlm.training.checkpoint import check_replaceable

    model, tokenizer = build_model(DEFAULT_MODEL, **FAST_MODEL).model, starting_model.tokenizer
    target = tmp_path / "out"
    (target / "notes").mkdir(parents=True)
    (target / "notes" / "IMPORTANT.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="holds no swarmlm checkpoint"):
        check_replaceable(target)
    with pytest.raises(CheckpointError, match=r"notes/IMPORTANT.txt\); nothing was changed"):
        save_checkpoint(target, _perturbed(model, 0.25), tokenizer, training_state={"epoch": 1})
    assert (target / "notes" / "IMPORTANT.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and sorted(p.name for p in target.iterdir()) == ["notes"]

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    check_replaceable(fresh)  # empty: fine
    save_checkpoint(fresh, _perturbed(model, 0.25), tokenizer, training_state={"epoch": 1})
    check_replaceable(fresh)  # a checkpoint a save wrote: fine
    (fresh / "mine.txt").write_text("added by hand")
    with pytest.raises(CheckpointError, match=r"\(mine.txt\)"):
        save_checkpoint(fresh, _perturbed(model, 0.5), tokenizer, training_state={"epoch": 2})
    assert (fresh / "mine.txt").exists() and json.loads((fresh / TRAINING_STATE_FILE).read_text()) == {"epoch": 1}

    save_checkpoint(target, _perturbed(model, 0.5), tokenizer, training_state={"epoch": 2}, overwrite=True)
    assert not (target / "notes").exists() and AutoModelForCausalLM.from_pretrained(target).lm_head.weight.eq(0.5).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "out"]  # no temporary left behind


def test_export_into_a_directory_of_a_users_files_is_refused_before_anything_is_fetched(tmp_path, caplog):
    from swarmlm.cli import main

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "IMPORTANT.txt").write_text("keep me")
    peer = "/ip4/127.0.0.1/tcp/9/p2p/QmNLei78zWmzUdbeRB3CiUfAizWUrbeeZh5K1rhAQKCh51"  # never reached
    assert main(["export", "--model", DEFAULT_MODEL, "--initial-peers", peer, "--out", str(tmp_path)]) == 2
    assert "holds no swarmlm checkpoint" in caplog.text and "--overwrite" in caplog.text
    assert (tmp_path / "notes" / "IMPORTANT.txt").read_text() == "keep me"


def test_train_into_a_directory_of_a_users_files_is_refused_before_training(tmp_path, caplog):
    from swarmlm.cli import main

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "IMPORTANT.txt").write_text("keep me")
    assert main(["train", "--new-swarm", "--run-id", "notes", "--save", str(tmp_path), "--log-level", "warning"]) == 2
    assert "holds no swarmlm checkpoint: give --save another directory" in caplog.text
    assert (tmp_path / "notes" / "IMPORTANT.txt").read_text() == "keep me"


def test_without_rename_exchange_a_crash_between_renames_is_recovered(tmp_path, starting_model, monkeypatch):
    from swarmlm.training import checkpoint

    monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)  # e.g. a filesystem without RENAME_EXCHANGE
    model, tokenizer = build_model(DEFAULT_MODEL, **FAST_MODEL).model, starting_model.tokenizer
    target = tmp_path / "ckpt"
    save_checkpoint(target, _perturbed(model, 0.25), tokenizer)
    save_checkpoint(target, _perturbed(model, 0.5), tokenizer)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    target.rename(tmp_path / ".ckpt.old-crashed")  # died after moving the old copy aside, before the new one
    checkpoint.recover_checkpoint(target)
    assert AutoModelForCausalLM.from_pretrained(target).lm_head.weight.eq(0.5).all()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


_SAVE_THEN_HANG = textwrap.dedent("""
    import sys, threading
    from swarmlm.training.checkpoint import save_checkpoint
    from swarmlm.training.model import build_model, parameter_hash
    start = build_model("{model}", seed=0, num_layers=2)
    save_checkpoint(sys.argv[1], start.model, start.tokenizer, training_state={{"hash": parameter_hash(start.model)}})
    print("SAVED", parameter_hash(start.model), flush=True)
    def hang(directory, *args, **kwargs):  # the weights are written; the tokenizer never will be
        print("WRITING", flush=True)
        threading.Event().wait()
    start.tokenizer.save_pretrained = hang
    with __import__("torch").no_grad():
        start.model.lm_head.weight.add_(1.0)
    save_checkpoint(sys.argv[1], start.model, start.tokenizer)
""")


def test_a_process_killed_mid_save_leaves_the_old_checkpoint_intact(tmp_path, starting_model):
    target = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "-c", _SAVE_THEN_HANG.format(model=DEFAULT_MODEL), str(target)],
                            stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        saved = proc.stdout.readline().split()
        assert saved[:1] == ["SAVED"], f"the saver failed (exit {proc.poll()})"
        assert proc.stdout.readline().strip() == "WRITING"
        assert any(p.name.startswith(".ckpt.tmp-") for p in tmp_path.iterdir())  # killed with a half-written copy
    finally:
        proc.kill()
        proc.wait()
    assert parameter_hash(build_model(str(target)).model) == saved[1]
    assert json.loads((target / TRAINING_STATE_FILE).read_text()) == {"hash": saved[1]}
    save_checkpoint(target, starting_model.model, starting_model.tokenizer)  # the next save cleans up
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


# ---- one trainer in this process --------------------------------------------------------------------

@pytest.mark.parametrize("local_updates", [False, True], ids=["synchronous", "local-updates"])
def test_single_trainer_loss_decreases_on_the_builtin_corpus(local_updates, tmp_path):
    from swarmlm.dht.node import create_dht, shutdown_dht
    from swarmlm.training.pretrain import Trainer

    config = TrainConfig(run_id=f"solo-{local_updates}", model=DEFAULT_MODEL, data=DataConfig(seq_len=64), seed=0,
                         num_layers=2, batch_size=8, target_batch_size=16, epochs=8, lr=3e-3, matchmaking_time=1.0,
                         averaging_timeout=5.0, local_updates=local_updates, show_progress=False,
                         save_dir=str(tmp_path / "solo"))
    starting = build_model(config.model, config.seed, config.num_layers)
    data = prepare_data(config.data, starting.tokenizer)
    steps, epochs = [], []
    dht = create_dht([], ["/ip4/127.0.0.1/tcp/0"])
    try:
        result = Trainer(config, dht, starting, data, on_step=steps.append, on_epoch=epochs.append).run()
    finally:
        shutdown_dht(dht)
    assert result.start_epoch == 0 and result.final_epoch == 8
    assert [e.epoch for e in epochs] == list(range(1, 9)) and result.epochs == epochs
    # an epoch is 2 steps, or 1 when hivemind's tracker ends it early by its time estimate (a slow step)
    assert len(steps) == result.steps and 8 <= result.steps <= 16 and result.local_samples == 8 * result.steps
    assert all(math.isfinite(e.val_loss) and math.isfinite(e.train_loss) for e in epochs)
    assert result.final_val_loss < result.initial_val_loss - 0.5
    assert epochs[-1].train_loss < steps[0].loss - 0.5
    assert parameter_hash(build_model(result.checkpoint).model) == result.param_hash


# ---- a swarm of `swarmlm train` processes -----------------------------------------------------------

EPOCHS = 16
TRAINER_ARGS = ("--model", DEFAULT_MODEL, "--num-layers", "2", "--seq-len", "64", "--batch-size", "8",
                "--target-batch-size", "48", "--lr", "3e-3", "--matchmaking-time", "1", "--averaging-timeout", "10",
                "--num-threads", "1", "--max-val-samples", "16", "--log-level", "info")
RUN_TIMEOUT = 240.0


def start_trainer(run_id: str, shard: int, save_dir: Path, *extra: str) -> NodeProcess:
    return NodeProcess("train", "--run-id", run_id, *TRAINER_ARGS, "--shard-index", str(shard),
                       "--save", str(save_dir), *extra)


def _epoch_line(line: str) -> dict:
    fields = dict(item.split("=") for item in line.split()[2:])
    return dict(epoch=int(line.split()[1]), peers=int(fields["peers"]), val_loss=float(fields["val_loss"]))


def _done(trainer: NodeProcess) -> dict:
    return json.loads(trainer.wait_for_line(lambda line: line.startswith("DONE "), RUN_TIMEOUT)[len("DONE "):])


def _children(pid: int) -> set[int]:
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.add(int(stat.parent.name))
    return children


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_gone(pids: set[int], timeout: float) -> set[int]:
    """The pids still alive after up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while {pid for pid in pids if _alive(pid)} and time.monotonic() < deadline:
        threading.Event().wait(0.2)
    return {pid for pid in pids if _alive(pid)}


# float32 bytes per model parameter that a trainer puts into one round: gradients; parameters + 2 Adam statistics
BYTES_PER_PARAMETER = dict(gradients=4, state=3 * 4)


def _rounds_counted(parameters: int):
    """Whether a scrape shows a completed gradient round, and the bytes of every counted round (the two
    counters are updated one after the other: a scrape may fall in between)."""
    def condition(samples: dict) -> bool:
        completed = _completed_rounds(samples)
        return completed["gradients"] >= 1 and all(value(samples, BYTES, kind=kind) == completed[kind] * size
                                                   * parameters for kind, size in BYTES_PER_PARAMETER.items())
    return condition


def _completed_rounds(samples: dict) -> dict[str, float]:
    return {kind: value(samples, ROUNDS, kind=kind, outcome="completed") for kind in BYTES_PER_PARAMETER}


@pytest.fixture(scope="module")
def swarm_run(tiny_model_path, tmp_path_factory, starting_model):
    """Three trainers start together; trainer 2 is SIGKILLed once the three have finished an epoch together;
    a fourth joins late. Yields the DONE summaries and EPOCH reports of the survivors and the joiner, and a
    scrape of the first trainer's /metrics once it counted a completed gradient round."""
    root = tmp_path_factory.mktemp("swarm_run")
    with contextlib.ExitStack() as stack:
        run = ("--epochs", str(EPOCHS), "--num-shards", "4")
        first = stack.enter_context(start_trainer("swarm", 0, root / "t0", *run, "--new-swarm", "--min-peers", "3",
                                                  "--metrics-port", "0"))
        second, victim = (stack.enter_context(start_trainer("swarm", i, root / f"t{i}", *run, "--initial-peers",
                                                            first.maddrs[0], "--min-peers", "3", "--no-progress"))
                          for i in (1, 2))
        together = first.wait_for_line(lambda line: line.startswith("EPOCH") and "peers=3" in line, RUN_TIMEOUT)
        victim_children = _children(victim.proc.pid)
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait()
        killed_at = _epoch_line(together)["epoch"]
        parameters = sum(param.numel() for param in starting_model.model.parameters())
        # the joiner starts right away: the survivors must still be training when it asks them for the state
        joiner = stack.enter_context(start_trainer("swarm", 3, root / "t3", *run, "--initial-peers", first.maddrs[0],
                                                   second.maddrs[0], "--no-progress"))
        first_metrics = scrape_until(metrics_url(first), _rounds_counted(parameters), RUN_TIMEOUT)
        survivors = dict(first=first, second=second, joiner=joiner)
        done = {name: _done(trainer) for name, trainer in survivors.items()}
        epochs = {name: [_epoch_line(line) for line in trainer.stdout_lines if line.startswith("EPOCH")]
                  for name, trainer in survivors.items()}
        yield types.SimpleNamespace(done=done, epochs=epochs, killed_at=killed_at, first_stderr=first.stderr,
                                    orphans=_wait_gone(victim_children, 30.0), first_metrics=first_metrics)


def test_swarm_trains_together_with_a_progress_bar(swarm_run):
    first = swarm_run.epochs["first"]
    assert any(e["peers"] == 3 for e in first)
    assert first[0]["val_loss"] < swarm_run.done["first"]["initial_val_loss"]
    assert "samples/s" in swarm_run.first_stderr and "peers=" in swarm_run.first_stderr  # the tqdm bar
    assert swarm_run.done["first"]["averaging"]["completed"]["gradients"] >= 1


def test_trainer_serves_prometheus_metrics(swarm_run, starting_model):
    samples, parameters = swarm_run.first_metrics, sum(param.numel() for param in starting_model.model.parameters())
    completed = _completed_rounds(samples)
    assert completed["gradients"] >= 1
    for kind, size in BYTES_PER_PARAMETER.items():  # every completed round: all of the model's tensors
        assert value(samples, BYTES, kind=kind) == completed[kind] * size * parameters
    assert value(samples, "swarmlm_dht_known_peers") >= 1
    assert value(samples, "swarmlm_training_peers") >= 2
    assert value(samples, "swarmlm_training_epoch") >= 1 and math.isfinite(value(samples, "swarmlm_validation_loss"))
    steps, trained = value(samples, "swarmlm_training_steps_total"), value(samples, "swarmlm_training_samples_total")
    assert steps >= 1 and trained >= 8 and trained % 8 == 0  # --batch-size 8
    assert value(samples, "swarmlm_training_tokens_total") % 64 == 0  # --seq-len 64
    info = dict(next(labels for (name, labels) in samples if name == "swarmlm_trainer_info"))
    assert info == dict(run_id="swarm", model=DEFAULT_MODEL, shard_index="0", num_shards="4")


def test_killed_trainer_survivors_finish_with_identical_parameters(swarm_run):
    assert not swarm_run.orphans, "the killed trainer left helper processes behind"
    for name in ("first", "second"):
        done, epochs = swarm_run.done[name], swarm_run.epochs[name]
        assert done["final_epoch"] == EPOCHS and done["agreed"]
        assert [e["epoch"] for e in epochs if e["epoch"] > swarm_run.killed_at], "no progress after the kill"
        assert all(math.isfinite(e["val_loss"]) for e in epochs)
        assert done["final_val_loss"] < done["initial_val_loss"] - 0.3
    assert swarm_run.done["first"]["param_hash"] == swarm_run.done["second"]["param_hash"]
    first, second = (AutoModelForCausalLM.from_pretrained(swarm_run.done[n]["checkpoint"]) for n in ("first", "second"))
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_late_joiner_downloads_the_state_and_ends_identical(swarm_run):
    joiner = swarm_run.done["joiner"]
    assert joiner["start_epoch"] >= swarm_run.killed_at  # it started from the swarm's state, not from scratch
    assert joiner["averaging"]["completed"]["gradients"] >= 1  # and then trained with the swarm
    assert joiner["initial_val_loss"] < swarm_run.done["first"]["initial_val_loss"] - 0.1
    assert joiner["final_epoch"] == EPOCHS
    assert joiner["param_hash"] == swarm_run.done["first"]["param_hash"]


def test_trained_checkpoint_is_served_by_a_peer_like_the_local_model(swarm_run):
    from swarmlm import AutoDistributedModelForCausalLM

    checkpoint = swarm_run.done["first"]["checkpoint"]
    local = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with NodeProcess("peer", "--model", checkpoint, "--num-blocks", "2", "--new-swarm", "--num-threads", "1",
                     "--log-level", "warning") as peer:
        model = AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=peer.maddrs)
        try:
            ids = torch.tensor([[5, 17, 300, 42, 7]])
            with torch.no_grad():
                torch.testing.assert_close(model(ids).logits, local(ids).logits, atol=1e-3, rtol=0)
            assert model.generate(ids, max_new_tokens=8, do_sample=False).tolist() == \
                local.generate(ids, max_new_tokens=8, do_sample=False).tolist()
        finally:
            model.close()


def test_local_updates_mode_averages_parameters_between_trainers(tiny_model_path, tmp_path):
    # epochs of 160 samples: long enough for each trainer's progress tracker to see the other one
    # 5 epochs: the first round may fall before the two trainers see each other (one CI run counted 1 of 4)
    run = ("--epochs", "5", "--target-batch-size", "160", "--num-shards", "2", "--local-updates", "--min-peers", "2",
           "--no-progress")
    with start_trainer("diloco", 0, tmp_path / "a", *run, "--new-swarm") as first, \
            start_trainer("diloco", 1, tmp_path / "b", *run, "--initial-peers", first.maddrs[0]) as second:
        done = [_done(first), _done(second)]
    for result in done:
        assert result["final_epoch"] == 5 and result["agreed"]
        assert result["averaging"]["completed"]["gradients"] == 0  # no gradient all-reduce in this mode
        assert result["averaging"]["completed"]["state"] >= 2, result["averaging"]  # averaged between the two
        assert result["final_val_loss"] < result["initial_val_loss"] - 0.3
    assert done[0]["param_hash"] == done[1]["param_hash"]


def test_sigterm_stops_a_trainer_cleanly_and_saves(tiny_model_path, tmp_path):
    with start_trainer("sigterm", 0, tmp_path / "ckpt", "--epochs", "1000", "--target-batch-size", "16",
                       "--new-swarm", "--no-progress") as trainer:
        trainer.wait_for_line(lambda line: line.startswith("EPOCH 2 "), RUN_TIMEOUT)
        trainer.proc.send_signal(signal.SIGTERM)
        done = _done(trainer)
        assert trainer.proc.wait(timeout=60) == 0
    assert 2 <= done["final_epoch"] < 1000 and not done["agreed"]  # stopped early: no final agreement round
    state = json.loads((tmp_path / "ckpt" / TRAINING_STATE_FILE).read_text())
    assert state["epoch"] == done["final_epoch"] and state["param_hash"] == done["param_hash"]


def test_train_command_needs_a_swarm_and_existing_data(tmp_path, tiny_model_path):
    from swarmlm.cli import main

    assert main(["train", "--run-id", "x", "--num-layers", "2"]) == 2
    assert main(["train", "--run-id", "x", "--new-swarm", "--num-layers", "2", "--data", str(tmp_path / "nope")]) == 2
