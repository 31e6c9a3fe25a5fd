"""Correctness of swarmlm on a CUDA GPU: peers with --device cuda against the local transformers model.

For each model (the embedded default `swarmlm-tiny-llama` and the benchmark's "large" Llama) this
starts one DHT node and four peers on 127.0.0.1, all on the GPU: two in float32 (blocks 0:n/2 and
n/2:n, DHT name "<model>-fp32") and two in bfloat16 ("<model>-bf16"). A client on the CPU (float32
embeddings and LM head) is compared with `AutoModelForCausalLM` with the same weights on the GPU.

Asserted (float32 peers; the exit status is 1 when one fails):
    forward logits (batch 2, and batch 2 left-padded) within atol 1e-3 of the local model;
    24 greedy tokens identical (batch 1, and batch 2 left-padded);
    forward + backward: relative error of the input-embedding gradient below 1e-3.
Reported only (not asserted): bfloat16 peers against the local model in bfloat16 and in float32
(greedy match length, max logit difference, gradient error), and the client itself on the GPU.

Run:
    python benchmarks/gpu_check.py [--models tiny-llama,large] [--log-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generation import model_dir  # noqa: E402
from nodes import Node  # noqa: E402

from swarmlm import AutoDistributedModelForCausalLM  # noqa: E402
from swarmlm.models.checkpoint import resolve_model  # noqa: E402
from swarmlm.models.embedded import DEFAULT_MODEL, swarmlm_home  # noqa: E402

ATOL = 1e-3
GRAD_RTOL = 1e-3
NEW_TOKENS = 24
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
DEV = "cuda"  # --device: cpu only to try this script on a machine without a GPU

failures: list[str] = []  # asserted checks that failed


def report(ok: bool, what: str, detail: str, asserted: bool = True) -> None:
    tag = "PASS" if ok else ("FAIL" if asserted else "FAIL (not asserted)")
    print(f"{tag}: {what}: {detail}", flush=True)
    if not ok and asserted:
        failures.append(what)


def info(what: str, detail: str) -> None:
    print(f"INFO: {what}: {detail}", flush=True)


def check(what: str, asserted: bool = True):
    """Runs the decorated check at once; an exception counts as its failure."""
    def run(fn):
        try:
            fn()
        except Exception as e:
            traceback.print_exc()
            report(False, what, f"raised {type(e).__name__}: {str(e)[:500]}", asserted)
        return fn
    return run


def padded_batch(vocab: int, seq: int, pad: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch 2: row 0 left-padded by `pad` tokens, row 1 full. -> (input_ids, attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, seq), generator=g)
    mask = torch.ones(2, seq, dtype=torch.int64)
    mask[0, :pad] = 0
    ids[0, :pad] = 0
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def match_length(a: torch.Tensor, b: torch.Tensor) -> int:
    """Leading new tokens that agree in every row."""
    same = (a.cpu() == b.cpu()).all(dim=0)
    return int(same.long().cumprod(0).sum())


def margin_at(local, ids: torch.Tensor, mask: torch.Tensor, at: int) -> float:
    """Top-1 minus top-2 local logit for the token at sequence position `at` (smallest over rows)."""
    with torch.no_grad():
        logits = local(input_ids=ids[:, :at].to(DEV), attention_mask=mask[:, :at].to(DEV),
                       position_ids=positions(mask[:, :at]).to(DEV)).logits[:, -1].float()
    top = logits.topk(2, dim=-1).values
    return float((top[:, 0] - top[:, 1]).min())


def greedy(model, ids, mask, device, pad_id):
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad_id)
    with torch.inference_mode():
        out = model.generate(ids.to(device), attention_mask=mask.to(device), **kwargs)
    return out[:, ids.shape[1]:].cpu()


def forward_logits(model, ids, mask, device) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids.to(device), attention_mask=mask.to(device),
                     position_ids=positions(mask).to(device)).logits.float().cpu()


def embed_grad(model, ids, mask, device) -> tuple[float, torch.Tensor]:
    """(loss, d loss / d inputs_embeds) with labels = ids (padding ignored)."""
    labels = ids.masked_fill(mask == 0, -100).to(device)
    embeds = model.get_input_embeddings()(ids.to(device)).detach().float()
    dtype = model.get_input_embeddings().weight.dtype
    embeds = embeds.to(dtype).requires_grad_(True)
    out = model(inputs_embeds=embeds, attention_mask=mask.to(device), position_ids=positions(mask).to(device),
                labels=labels)
    out.loss.backward()
    return out.loss.item(), embeds.grad.float().cpu()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def throughput_check(label: str, config) -> None:
    """swarmlm.peer.throughput.measure_throughput (what a peer announces) against the same loop timed with
    torch.cuda.synchronize() after the last step."""
    import time
    from swarmlm.experts.families import family_for_config
    from swarmlm.experts.span import BlockSpan
    from swarmlm.peer.throughput import measure_throughput
    n = config.num_hidden_layers
    for dtype in (torch.float32, torch.bfloat16):
        device = torch.device(DEV)
        span = BlockSpan(family_for_config(config), config, 0, n // 2).to(device, dtype).eval()
        announced = measure_throughput(span, device, dtype)
        hidden = torch.randn(1, 1, config.hidden_size, device=device, dtype=dtype)
        cache = span.new_cache()
        with torch.inference_mode():
            for i in range(2):
                span(hidden, torch.tensor([[i]], device=device), cache=cache)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for i in range(2, 10):
                span(hidden, torch.tensor([[i]], device=device), cache=cache)
            if device.type == "cuda":
                torch.cuda.synchronize()
            synced = 8 * span.num_blocks / (time.perf_counter() - start)
        info(f"{label} peer throughput {str(dtype)[6:]}", f"measure_throughput {announced:.0f} tok/s per block, "
             f"synchronized {synced:.0f} tok/s per block (ratio {announced / synced:.2f})")
        del span, cache


def check_model(label: str, model_arg: str, path: Path, env: dict, tmp: Path) -> None:
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(path)
    n, vocab = config.num_hidden_layers, config.vocab_size
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    spans = (f"0:{n // 2}", f"{n // 2}:{n}")
    nodes: list[Node] = []
    clients = {}
    try:
        dht = Node(["dht", "--host-maddrs", "/ip4/127.0.0.1/tcp/0"], tmp / f"{label}-dht.log", env)
        nodes.append(dht)
        maddrs = dht.wait_ready().maddrs
        for tag, dtype in DTYPES.items():
            for i, span in enumerate(spans):
                nodes.append(Node(["peer", "--model", model_arg, "--blocks", span, "--initial-peers", *maddrs,
                                   "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--device", DEV, "--torch-dtype", dtype,
                                   "--dht-prefix", f"{label}-{tag}"], tmp / f"{label}-{tag}-peer{i}.log", env))
        for peer in nodes[1:]:
            peer.wait_ready()
        info(label, f"dht + 4 {DEV} peers ready ({spans[0]}, {spans[1]} in float32 and in bfloat16)")
        for tag in DTYPES:
            clients[tag] = AutoDistributedModelForCausalLM.from_pretrained(
                model_arg, initial_peers=maddrs, dht_prefix=f"{label}-{tag}", max_retries=1,
                verify="off")  # compares the peers with local runs itself

        local32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(DEV).eval()
        local16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(DEV).eval()
        swarm32, swarm16 = clients["fp32"], clients["bf16"]
        check(f"{label} peer throughput", asserted=False)(lambda: throughput_check(label, config))

        ids, _ = padded_batch(vocab, 12, 0, seed=1)
        full = torch.ones_like(ids)
        pids, pmask = padded_batch(vocab, 12, 3, seed=2)
        prompt = torch.randint(3, vocab, (1, 16), generator=torch.Generator().manual_seed(3))
        prompt_mask = torch.ones_like(prompt)
        gids, gmask = padded_batch(vocab, 10, 4, seed=4)

        ref = {}  # local float32 results, reused for the bfloat16 comparisons

        @check(f"{label} fp32 forward logits (batch 2x12)")
        def _():
            ref["fwd"] = forward_logits(local32, ids, full, DEV)
            diff = (forward_logits(swarm32, ids, full, "cpu") - ref["fwd"]).abs().max().item()
            report(diff < ATOL, f"{label} fp32 forward logits (batch 2x12)", f"max |diff| {diff:.2e} (atol {ATOL})")

        @check(f"{label} fp32 forward logits, left-padded batch")
        def _():
            keep = pmask.bool()
            diff = (forward_logits(swarm32, pids, pmask, "cpu") - forward_logits(local32, pids, pmask, DEV))
            diff = diff[keep].abs().max().item()
            report(diff < ATOL, f"{label} fp32 forward logits, left-padded batch",
                   f"max |diff| over real tokens {diff:.2e} (atol {ATOL})")

        for what, (x, m) in {"batch 1, prompt 16": (prompt, prompt_mask),
                             "left-padded batch 2": (gids, gmask)}.items():
            @check(f"{label} fp32 greedy {NEW_TOKENS} tokens, {what}")
            def _():
                local_tokens = greedy(local32, x, m, DEV, pad_id)
                ref[what] = local_tokens
                swarm_tokens = greedy(swarm32, x, m, "cpu", pad_id)
                same = match_length(swarm_tokens, local_tokens)
                detail = f"{same}/{NEW_TOKENS} tokens identical"
                if same < NEW_TOKENS:
                    seq = torch.cat([x, local_tokens], dim=1)
                    mm = torch.cat([m, torch.ones_like(local_tokens)], dim=1)
                    detail += f"; local top-2 logit gap at the first difference {margin_at(local32, seq, mm, x.shape[1] + same):.2e}"
                report(same == NEW_TOKENS, f"{label} fp32 greedy {NEW_TOKENS} tokens, {what}", detail)

        @check(f"{label} fp32 forward+backward (input-embedding grad)")
        def _():
            loss_l, grad_l = embed_grad(local32, pids, pmask, DEV)
            ref["grad"] = grad_l
            loss_s, grad_s = embed_grad(swarm32, pids, pmask, "cpu")
            err = rel_err(grad_s, grad_l)
            report(err < GRAD_RTOL and abs(loss_s - loss_l) < ATOL, f"{label} fp32 forward+backward (input-embedding grad)",
                   f"grad rel err {err:.2e} (< {GRAD_RTOL}), loss {loss_s:.6f} vs local {loss_l:.6f}")

        # ---- bfloat16 peers (float32 client): reported, not asserted ----
        @check(f"{label} bf16 peers forward logits", asserted=False)
        def _():
            s = forward_logits(swarm16, ids, full, "cpu")
            d16 = (s - forward_logits(local16, ids, full, DEV)).abs().max().item()
            d32 = (s - ref["fwd"]).abs().max().item() if "fwd" in ref else float("nan")
            scale = ref["fwd"].abs().max().item() if "fwd" in ref else float("nan")
            info(f"{label} bf16 peers forward logits",
                 f"max |diff| vs local bf16 {d16:.2e}, vs local fp32 {d32:.2e} (max |logit| {scale:.2f})")

        for what, (x, m) in {"batch 1, prompt 16": (prompt, prompt_mask),
                             "left-padded batch 2": (gids, gmask)}.items():
            @check(f"{label} bf16 peers greedy, {what}", asserted=False)
            def _():
                s = greedy(swarm16, x, m, "cpu", pad_id)
                l16 = greedy(local16, x, m, DEV, pad_id)
                l32 = ref.get(what)
                info(f"{label} bf16 peers greedy {NEW_TOKENS} tokens, {what}",
                     f"match length vs local bf16 {match_length(s, l16)}/{NEW_TOKENS}, vs local fp32 "
                     f"{match_length(s, l32) if l32 is not None else 'n/a'}/{NEW_TOKENS}")

        @check(f"{label} bf16 peers forward+backward", asserted=False)
        def _():
            loss_s, grad_s = embed_grad(swarm16, pids, pmask, "cpu")
            loss_16, grad_16 = embed_grad(local16, pids, pmask, DEV)
            e32 = rel_err(grad_s, ref["grad"]) if "grad" in ref else float("nan")
            info(f"{label} bf16 peers forward+backward", f"input-embedding grad rel err vs local bf16 "
                 f"{rel_err(grad_s, grad_16):.2e}, vs local fp32 {e32:.2e}; loss {loss_s:.5f} (local bf16 {loss_16:.5f})")

        # ---- the client itself on the GPU (model.to(DEV)): reported, not asserted ----
        @check(f"{label} client on {DEV}: forward", asserted=False)
        def _():
            swarm32.to(DEV)
            s = forward_logits(swarm32, ids, full, DEV)
            diff = (s - ref["fwd"]).abs().max().item()
            report(diff < ATOL, f"{label} client on {DEV}: forward", f"max |diff| {diff:.2e}", asserted=False)

        @check(f"{label} client on {DEV}: greedy", asserted=False)
        def _():
            s = greedy(swarm32, prompt, prompt_mask, DEV, pad_id)
            same = match_length(s, ref["batch 1, prompt 16"])
            report(same == NEW_TOKENS, f"{label} client on {DEV}: greedy", f"{same}/{NEW_TOKENS} tokens identical",
                   asserted=False)

        @check(f"{label} client on {DEV}: forward+backward", asserted=False)
        def _():
            _, g = embed_grad(swarm32, pids, pmask, DEV)
            err = rel_err(g, ref["grad"])
            report(err < GRAD_RTOL, f"{label} client on {DEV}: forward+backward", f"grad rel err {err:.2e}",
                   asserted=False)
        del local32, local16
        if DEV.startswith("cuda"):
            torch.cuda.empty_cache()
    finally:
        for client in clients.values():
            client.close()
        for node in reversed(nodes):
            node.terminate()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-llama,large", help="from tiny-llama (embedded default), tiny, large")
    parser.add_argument("--log-dir", default=None, help="where to write all nodes' logs as one file (gpu_check-nodes.log)")
    parser.add_argument("--device", default="cuda", help="cuda (default); cpu only to try the script itself")
    args = parser.parse_args()
    global DEV
    DEV = args.device
    if DEV.startswith("cuda") and not torch.cuda.is_available():
        print("FAIL: torch.cuda.is_available() is False", flush=True)
        return 1
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    info("device", f"{torch.cuda.get_device_name() if DEV.startswith('cuda') else DEV} | torch {torch.__version__} | "
         f"allow_tf32 matmul={torch.backends.cuda.matmul.allow_tf32}")
    env = dict(os.environ, SWARMLM_HOME=str(swarmlm_home()))
    with tempfile.TemporaryDirectory(prefix="swarmlm-gpu-check-") as tmp:
        try:
            for name in [m.strip() for m in args.models.split(",") if m.strip()]:
                try:
                    if name == "tiny-llama":
                        check_model(name, DEFAULT_MODEL, resolve_model(DEFAULT_MODEL).path, env, Path(tmp))
                    else:
                        path = model_dir(name)
                        check_model(name, str(path), path, env, Path(tmp))
                except Exception as e:
                    traceback.print_exc()
                    report(False, f"{name} swarm", f"raised {type(e).__name__}: {str(e)[:1000]}")
        finally:
            if args.log_dir:
                Path(args.log_dir).mkdir(parents=True, exist_ok=True)
                with open(Path(args.log_dir) / "gpu_check-nodes.log", "w") as out:
                    for log in sorted(Path(tmp).glob("*.log")):
                        out.write(f"===== {log.name}\n{log.read_text()}\n")
    print(f"\n{'ALL FP32 CHECKS PASSED' if not failures else 'FAILED: ' + '; '.join(failures)}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
