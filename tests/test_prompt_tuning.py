"""Prompt tuning through the swarm: a trainable client-side prefix, against the local model with the
same prefix prepended (the oracle), and a few optimizer steps that lower the loss."""

from __future__ import annotations

import torch


def _local_with_prefix(local_model, prefix: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
    embeds = local_model.get_input_embeddings()(ids)
    embeds = torch.cat([prefix.unsqueeze(0).expand(ids.shape[0], -1, -1), embeds], dim=1)
    mask = torch.cat([mask.new_ones(ids.shape[0], prefix.shape[0]), mask], dim=1)
    return embeds, mask


def test_prefix_gradients_and_generation_match_local(dist_model, local_model, tokenizer):
    batch = tokenizer(["Python supports several kinds of", "A class definition"], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    prefix = dist_model.enable_prompt_tuning(4, init_ids=tokenizer("Answer briefly:", return_tensors="pt")["input_ids"])
    try:
        with torch.enable_grad():
            remote = dist_model(**batch, labels=labels)
            remote.loss.backward()
            local_prefix = prefix.embeddings.detach().clone().requires_grad_(True)
            embeds, mask = _local_with_prefix(local_model, local_prefix, batch["input_ids"], batch["attention_mask"])
            # positions as generate() makes them: padding does not push the text away from the prefix
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
            local_logits = local_model(inputs_embeds=embeds, attention_mask=mask,
                                       position_ids=positions).logits[:, 4:].contiguous()
            local_loss = local_model.loss_function(logits=local_logits, labels=labels,
                                                   vocab_size=local_model.config.vocab_size)
            local_loss.backward()
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(remote.logits[real], local_logits[real].detach(), atol=1e-3, rtol=0)
        torch.testing.assert_close(remote.loss.detach(), local_loss.detach(), atol=1e-5, rtol=0)
        rel = (prefix.embeddings.grad - local_prefix.grad).norm() / local_prefix.grad.norm()
        assert rel < 1e-3, f"prefix gradient relative error {rel:.2e}"
        assert all(p.grad is None for name, p in dist_model.named_parameters() if "prompt_prefix" not in name)

        ids = tokenizer("The import statement", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = dist_model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
            embeds, mask = _local_with_prefix(local_model, prefix.embeddings.detach(), ids, torch.ones_like(ids))
            local_new = local_model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=12,
                                             min_new_tokens=12, do_sample=False)
        assert out[:, ids.shape[1]:].tolist() == local_new[:, -12:].tolist()
    finally:
        dist_model.prompt_prefix = None
        dist_model.zero_grad(set_to_none=True)
        local_model.zero_grad(set_to_none=True)


def test_prompt_tuning_lowers_the_loss(dist_model, tokenizer):
    """Teach the prefix to make the frozen swarm model continue with a fixed phrase."""
    text = tokenizer(["The import statement is used to load a module"], return_tensors="pt")
    prefix = dist_model.enable_prompt_tuning(8)
    optimizer = torch.optim.Adam(prefix.parameters(), lr=0.05)
    losses = []
    try:
        with torch.enable_grad():
            for _ in range(8):
                optimizer.zero_grad()
                loss = dist_model(**text, labels=text["input_ids"]).loss
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
    finally:
        dist_model.prompt_prefix = None
    assert losses[-1] < losses[0] - 0.1, losses


def test_deep_prompt_gradients_and_generation_match_local(dist_model, local_model, tokenizer):
    """Deep prompts: block i adds deep[i] to the prefix positions' hidden states (oracle: pre-hooks
    doing the same on the local model's decoder layers)."""
    batch = tokenizer(["Python supports several kinds of", "A class definition"], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    prefix = dist_model.enable_prompt_tuning(3, deep=True)
    with torch.no_grad():
        prefix.deep.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    local_prefix = prefix.embeddings.detach().clone().requires_grad_(True)
    local_deep = prefix.deep.detach().clone().requires_grad_(True)

    def add_deep(block):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if hidden.shape[1] > 3:  # the prefill (decoding steps of generate() carry one new token)
                hidden = torch.cat([hidden[:, :3] + local_deep[block], hidden[:, 3:]], dim=1)
            return (hidden, *args[1:]), kwargs
        return hook

    handles = [layer.register_forward_pre_hook(add_deep(i), with_kwargs=True)
               for i, layer in enumerate(local_model.model.layers)]
    try:
        with torch.enable_grad():
            remote = dist_model(**batch, labels=labels)
            remote.loss.backward()
            embeds, mask = _local_with_prefix(local_model, local_prefix, batch["input_ids"], batch["attention_mask"])
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
            local_logits = local_model(inputs_embeds=embeds, attention_mask=mask,
                                       position_ids=positions).logits[:, 3:].contiguous()
            local_loss = local_model.loss_function(logits=local_logits, labels=labels,
                                                   vocab_size=local_model.config.vocab_size)
            local_loss.backward()
        torch.testing.assert_close(remote.loss.detach(), local_loss.detach(), atol=1e-5, rtol=0)
        for name, remote_grad, local_grad in [("prefix", prefix.embeddings.grad, local_prefix.grad),
                                              ("deep prompts", prefix.deep.grad, local_deep.grad)]:
            rel = (remote_grad - local_grad).norm() / local_grad.norm()
            assert rel < 1e-3, f"{name} gradient relative error {rel:.2e}"

        ids = tokenizer("The import statement", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = dist_model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)
            embeds, mask = _local_with_prefix(local_model, prefix.embeddings.detach(), ids, torch.ones_like(ids))
            local_new = local_model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=10,
                                             min_new_tokens=10, do_sample=False)
        assert out[:, ids.shape[1]:].tolist() == local_new[:, -10:].tolist()
    finally:
        for handle in handles:
            handle.remove()
        dist_model.prompt_prefix = None
        dist_model.zero_grad(set_to_none=True)
        local_model.zero_grad(set_to_none=True)


def test_prompt_tuning_example_learns_its_task(swarm):
    """examples/prompt_tuning.py (documented in README) trains a deep prefix through the swarm: the loss
    on its task falls."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    dht, _ = swarm
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, str(root / "examples" / "prompt_tuning.py"), "--initial-peers",
                           dht.maddrs[0], "--deep", "--steps", "10", "--log-every", "5"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = {line.split()[0]: float(line.split()[-3]) for line in done.stdout.splitlines()
              if line.startswith(("before", "after"))}
    assert losses["after"] < losses["before"] - 0.5, done.stdout
