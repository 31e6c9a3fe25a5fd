"""RemoteSequential: the model's blocks as one module whose forward/backward run on the swarm."""

from __future__ import annotations

import logging
from typing import Optional

import torch

from swarmlm.client.config import ClientConfig
from swarmlm.client.routing import RouteHop, SequenceManager
from swarmlm.client.rpc import call_backward, call_forward
from swarmlm.errors import RemotePeerError
from swarmlm.experts.protocol import SpanRequest
from swarmlm.dht.node import create_dht, shutdown_dht
from swarmlm.utils.aio import LoopThread

logger = logging.getLogger(__name__)


class RemoteSequential:
    """All blocks of one model, served by the swarm. Owns the client's DHT node and event loop."""

    def __init__(self, model: str, num_blocks: int, config: ClientConfig, hint: str = ""):
        self.model, self.num_blocks, self.config = model, num_blocks, config
        self.dht = create_dht(config.initial_peers, ["/ip4/127.0.0.1/tcp/0"], client_mode=True,
                              use_nat_port_map=config.use_nat_port_map, startup_timeout=config.startup_timeout)
        self.loop = LoopThread("swarmlm-client-rpc")
        self.p2p = self.loop.run(self.dht.replicate_p2p(), timeout=config.startup_timeout)
        self.manager = SequenceManager(self.dht, model, num_blocks, config.route_refresh_period, hint)

    def span_request(self, hop: RouteHop, **kwargs) -> SpanRequest:
        return SpanRequest(model=self.model, start=hop.start, end=hop.end, **kwargs)

    def __call__(self, hidden: torch.Tensor, position_ids: torch.Tensor,
                 attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """hidden [batch, seq, hidden] -> hidden after all blocks; differentiable w.r.t. `hidden`."""
        return _RemoteChain.apply(hidden, position_ids, attention_mask, self)

    def forward_hop(self, hop: RouteHop, hidden, position_ids, mask) -> torch.Tensor:
        return self.loop.run(call_forward(self.p2p, hop.peer_id, self.span_request(hop), hidden, position_ids, mask,
                                          self.config.request_timeout))

    def backward_hop(self, hop: RouteHop, hidden, grad, position_ids, mask) -> torch.Tensor:
        return self.loop.run(call_backward(self.p2p, hop.peer_id, self.span_request(hop), hidden, grad, position_ids,
                                           mask, self.config.request_timeout))

    def run_chain(self, hidden, position_ids, mask) -> tuple[torch.Tensor, list[tuple[RouteHop, torch.Tensor]]]:
        """Forward through a route covering all blocks; returns the output and each hop's input.

        A failing hop is retried on a fresh route from its first block (max_retries attempts).
        """
        inputs, block, failed = [], 0, set()
        attempts = 0
        while block < self.num_blocks:
            hop = self.manager.make_route(block, self.num_blocks, frozenset(failed))[0]
            try:
                output = self.forward_hop(hop, hidden, position_ids, mask)
            except RemotePeerError as e:
                attempts += 1
                if e.code in ("bad_request",) or attempts > self.config.max_retries:
                    raise
                logger.warning(f"{e}; retrying blocks {hop.start}:{self.num_blocks} on another route")
                failed.add(hop.peer_id)
                continue
            inputs.append((hop, hidden))
            hidden, block = output.to(hidden.dtype), hop.end
        return hidden, inputs

    def close(self) -> None:
        try:
            self.loop.run(self.p2p.shutdown(), timeout=5)
        except Exception:
            pass
        self.loop.stop()
        shutdown_dht(self.dht)


class _RemoteChain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, position_ids, attention_mask, remote: RemoteSequential):
        output, hops = remote.run_chain(hidden.detach(), position_ids, attention_mask)
        ctx.remote, ctx.hops, ctx.position_ids, ctx.attention_mask = remote, hops, position_ids, attention_mask
        return output

    @staticmethod
    def backward(ctx, grad_output):
        grad = grad_output.contiguous()
        for hop, hop_input in reversed(ctx.hops):
            grad = ctx.remote.backward_hop(hop, hop_input, grad, ctx.position_ids, ctx.attention_mask).to(grad.dtype)
        return grad, None, None, None
