"""AutoDistributedModelForCausalLM: a transformers causal LM whose decoder blocks run on the swarm.

The returned object is an instance of the family's own HF class (e.g. LlamaForCausalLM) with no
local decoder layers: embeddings, final norm and LM head are local; `forward` sends hidden
states through `RemoteSequential` (stateless, differentiable) or through the active
`InferenceSession` (server-side KV caches) when called by `generate`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from swarmlm.client.config import ClientConfig
from swarmlm.client.prompt_tuning import PromptPrefix, extend_mask
from swarmlm.client.session import InferenceSession
from swarmlm.client.swarm import RemoteSequential
from swarmlm.client.verification import LocalBlocks, VerifiedStreamer
from swarmlm.client.weights_check import WeightsCheck
from swarmlm.errors import SwarmError, VerificationError, WrongOutputError
from swarmlm.experts.families import family_for_config
from swarmlm.experts.hf_compat import cache_argument, output_cache_field, pop_cache
from swarmlm.models.checkpoint import load_tensors, resolve_model

logger = logging.getLogger(__name__)


class RemoteCache(Cache):
    """Stands in for the KV cache during generate(): the real caches live on the peers of `session`."""

    def __init__(self, session: InferenceSession):
        super().__init__(layers=[])
        self.session = session

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.session.position - self.session.prefix_tokens  # the prompt-tuning prefix is invisible to HF

    @property
    def is_compileable(self) -> bool:
        return False


class DistributedCausalLMMixin:
    """Mixed in front of a family's HF *ForCausalLM class; see the module docstring."""

    remote: RemoteSequential
    prompt_prefix: Optional[PromptPrefix]  # set by from_pretrained (None) and enable_prompt_tuning

    def enable_prompt_tuning(self, num_tokens: int, init_ids: Optional[torch.Tensor] = None,
                             deep: bool = False) -> PromptPrefix:
        """Adds a trainable prefix of `num_tokens` virtual tokens before every input (prompt tuning;
        with `deep`, also per-block prompts sent to the peers); returns it (its parameters are the
        only ones requiring grad). Outputs cover the real tokens only."""
        self.requires_grad_(False)
        deep_blocks = self.remote.num_blocks if deep else 0
        self.prompt_prefix = PromptPrefix(self.get_input_embeddings(), num_tokens, init_ids, deep_blocks=deep_blocks)
        return self.prompt_prefix

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,  # [batch, past + seq]
        position_ids: Optional[torch.LongTensor] = None,  # [batch, seq]
        cache: Optional[Cache] = None,  # a RemoteCache during generate(); also taken as `past_key_values`
        inputs_embeds: Optional[torch.Tensor] = None,  # [batch, seq, hidden]
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        cache = pop_cache(kwargs, cache)  # transformers < 5.24 passes it as `past_key_values`
        session_cache = cache if isinstance(cache, RemoteCache) else None
        past = session_cache.session.position if session_cache is not None else 0  # prefix included
        if attention_mask is not None and attention_mask.ndim != 2:
            raise ValueError("only 2D attention masks [batch, past + seq] are supported")
        added, deep_prompts = 0, None  # prefix tokens prepended in this call (their outputs are dropped)
        if self.prompt_prefix is not None:
            if past == 0:
                inputs_embeds, attention_mask = self.prompt_prefix.prepend(inputs_embeds, attention_mask)
                added, deep_prompts = self.prompt_prefix.num_tokens, self.prompt_prefix.deep
                if session_cache is not None:
                    session_cache.session.prefix_tokens = added
            else:
                attention_mask = extend_mask(attention_mask, self.prompt_prefix.num_tokens)
        batch, seq = inputs_embeds.shape[:2]
        if self.prompt_prefix is not None:
            position_ids = None  # the caller's positions do not count the prefix: recompute them below
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)[:, -seq:]
            else:
                position_ids = torch.arange(past, past + seq).unsqueeze(0).expand(batch, -1)
        position_ids = position_ids.expand(batch, -1).contiguous()
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.to(torch.bool)

        if session_cache is not None:
            mask_chunk = mask[:, -seq:] if mask is not None and not bool(mask[:, -seq:].all()) else None
            hidden = session_cache.session.step(inputs_embeds, position_ids, mask_chunk, deep_prompts)
        else:
            hidden = self.remote(inputs_embeds, position_ids, mask, deep_prompts)

        hidden = self.model.norm(hidden[:, added:])
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{output_cache_field(CausalLMOutputWithPast): cache})

    # ---- sessions and generation ---------------------------------------------------------------------

    def inference_session(self, max_length: int) -> InferenceSession:
        """A session holding up to `max_length` tokens per sequence in the peers' KV caches (plus the
        prompt-tuning prefix, if any)."""
        prefix = self.prompt_prefix.num_tokens if self.prompt_prefix is not None else 0
        return InferenceSession(self.remote, max_length + prefix)

    @torch.inference_mode()
    def generate(self, inputs: Optional[torch.Tensor] = None, *args, session: Optional[InferenceSession] = None,
                 attention_mask: Optional[torch.Tensor] = None, **kwargs):
        """HF generate() with server-side caches. With `session`, continues its sequence:
        `inputs` (or None) are appended to the tokens the session already holds, and the whole
        sequence so far is returned."""
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        if session is not None and session.output_ids is not None:
            new = inputs if inputs is not None else session.output_ids[:, :0]
            new_mask = attention_mask if attention_mask is not None else torch.ones_like(new)
            inputs = torch.cat([session.output_ids, new], dim=1)
            attention_mask = torch.cat([session.output_mask, new_mask.to(session.output_mask.dtype)], dim=1)
        if inputs is None:
            raise ValueError("give input_ids (generate(None) continues only a session that has tokens)")
        if attention_mask is None:
            attention_mask = torch.ones_like(inputs)
        with contextlib.ExitStack() as stack:
            if session is None:
                max_new = kwargs.get("max_new_tokens")
                if max_new is None:
                    max_new = kwargs.get("max_length", self.generation_config.max_length) - inputs.shape[1]
                session = stack.enter_context(self.inference_session(inputs.shape[1] + max(max_new, 0)))
            outputs = self._verified_generate(session, inputs, args, attention_mask, kwargs)
        sequences = outputs if isinstance(outputs, torch.Tensor) else outputs.sequences
        added = sequences.shape[1] - inputs.shape[1]
        session.output_ids = sequences
        session.output_mask = torch.cat([attention_mask, attention_mask.new_ones(sequences.shape[0], added)], dim=1)
        return outputs

    def _verified_generate(self, session: InferenceSession, inputs, args, attention_mask, kwargs):
        """HF generate() on `session`, then the audit of every token it produced. When a peer is caught answering
        wrong numbers (it is banned), the session rolls back to where this call began and generate() reruns with the
        random state it started with, so the output is what the honest computation gives. A streamer sees verified
        tokens only (VerifiedStreamer)."""
        start, rng = session.position, _random_state()
        streamer = kwargs.pop("streamer", None)
        if streamer is not None and self.remote.config.verify != "off":
            streamer = VerifiedStreamer(streamer, session)
        for attempt in range(self.remote.config.max_retries + 1):
            # generate() hands the cache on to prepare_inputs_for_generation, under that method's name for it
            remote_cache = cache_argument(type(self).prepare_inputs_for_generation, RemoteCache(session))
            try:
                outputs = super().generate(inputs, *args, attention_mask=attention_mask, streamer=streamer,
                                           **remote_cache, **kwargs)
                session.verify()
                break
            except WrongOutputError as e:
                if e.position < start:
                    raise VerificationError(f"an earlier call's output was wrong ({e}); start a new session") from e
                if attempt == self.remote.config.max_retries:
                    raise
                logger.warning(f"{e}; generating again from token {start - session.prefix_tokens}")
                self.remote.metrics.rerun()
                session.rollback(start)
                _restore_random_state(rng)
                if isinstance(streamer, VerifiedStreamer):
                    streamer.restart()
        if isinstance(streamer, VerifiedStreamer):
            streamer.finish()
        return outputs

    def close(self) -> None:
        """Stops the client's DHT node and network loop."""
        self.remote.close()


def _random_state():
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)


def _restore_random_state(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class AutoDistributedModelForCausalLM:
    """Factory: `from_pretrained(path_or_name, initial_peers=[...])` -> a distributed HF causal LM."""

    @classmethod
    def from_pretrained(cls, name_or_path: str, initial_peers: list[str] | None = None, *,
                        dht_prefix: str | None = None, config: ClientConfig | None = None,
                        torch_dtype: torch.dtype = torch.float32, **client_kwargs):
        resolved = resolve_model(name_or_path)
        client_config = config or ClientConfig(**client_kwargs)
        if initial_peers is not None:
            client_config.initial_peers = list(initial_peers)
        if dht_prefix is not None:
            client_config.dht_prefix = dht_prefix
        if not client_config.initial_peers:
            raise SwarmError("give initial_peers: multiaddrs of any member of the swarm (printed by swarmlm dht/peer)")
        model_config = AutoConfig.from_pretrained(resolved.path)
        family = family_for_config(model_config)
        hf_class = AutoModelForCausalLM._model_mapping[type(model_config)]
        distributed_class = type(f"Distributed{hf_class.__name__}", (DistributedCausalLMMixin, hf_class), {})

        local_config = copy.deepcopy(model_config)
        local_config.num_hidden_layers = 0  # no decoder layers on the client
        if getattr(local_config, "layer_types", None):
            local_config.layer_types = []
        model = distributed_class(local_config)
        model.config = model_config
        model.model.config = model_config
        state = load_tensors(resolved.path, family.client_tensor_name, torch_dtype)
        if "lm_head.weight" not in state and model_config.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if "rotary" not in k]
        if missing:
            raise SwarmError(f"checkpoint {resolved.path} lacks client tensors: {missing}")
        model = model.to(torch_dtype).eval()
        try:
            model.generation_config = GenerationConfig.from_pretrained(resolved.path)
        except OSError:
            model.generation_config = GenerationConfig.from_model_config(model_config)
        name = client_config.dht_prefix or resolved.name
        model.prompt_prefix = None
        model.remote = RemoteSequential(name, model_config.num_hidden_layers, client_config, hint=str(name_or_path))
        if client_config.verify_locally:
            model.remote.auditor.local = LocalBlocks(resolved.path, family, model_config)
        check = WeightsCheck(resolved.path, family, model_config, read_blocks=client_config.check_weights)
        model.remote.manager.accepts = check.accepts
        return model
