"""The volunteer peer: load a span of blocks, serve it over P2P, announce it in the DHT.

Lifecycle: `Peer(config)` does no I/O; `start()` joins the DHT, picks and loads blocks, serves
and announces ONLINE; `shutdown()` stops taking sessions and calls, announces OFFLINE (nothing is
announced after that), lets running steps and calls finish (bounded) and stops.
"""

from __future__ import annotations

import concurrent.futures
import logging
import random
import threading
import time
from typing import Callable, Optional

import hivemind
import torch
from hivemind.utils import get_dht_time
from transformers import AutoConfig

from swarmlm import __version__
from swarmlm.dht.records import ServerRecord, ServerState, record_expiration
from swarmlm.dht.node import create_dht, shutdown_dht
from swarmlm.dht.registry import (
    ModelRecord,
    count_dht_peers,
    declare_model,
    declare_span,
    fetch_block_records,
)
from swarmlm.dht.identity import NodeIdentity
from swarmlm.utils.swarm_key import SwarmKey, load_swarm_key
from swarmlm.dht.records import model_keys
from swarmlm.experts.families import family_for_config
from swarmlm.experts.span import BlockSpan
from swarmlm.models.checkpoint import resolve_model
from swarmlm.models.fingerprint import config_hash, span_weights_hash
from swarmlm.monitoring.http_service import HttpService, serve_metrics
from swarmlm.monitoring.metrics import PeerMetrics
from swarmlm.peer.block_selection import block_throughputs, choose_span
from swarmlm.peer.cache_budget import CacheBudget
from swarmlm.peer.config import PeerConfig
from swarmlm.peer.handler import SpanHandler, refuse_busy
from swarmlm.peer.validation import Limits
from swarmlm.peer.rebalancing import plan_move
from swarmlm.peer.span_loader import load_span
from swarmlm.peer.watchdog import Watchdog, peer_checks
from swarmlm.peer.throughput import measure_throughput
from swarmlm.peer.trainer_hook import BlockTrainer
from swarmlm.transport import Server
from swarmlm.transport.limits import ChannelLimits, raise_open_files_limit
from swarmlm.transport.direct import direct_hosts
from swarmlm.utils.aio import LoopThread
from swarmlm.utils.lifetime import children_die_with_this_process

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


TrainerFactory = Callable[[BlockSpan, str, hivemind.DHT, PeerMetrics], BlockTrainer]  # (span, model, dht, metrics)
# -> a trainer that has joined its replicas' run (swarmlm.training.peer.span_trainer_factory)


class Peer:
    def __init__(self, config: PeerConfig, make_trainer: Optional[TrainerFactory] = None):
        if (config.training is None) != (make_trainer is None):
            raise ValueError("a training peer (config.training) needs make_trainer, and only a training peer takes "
                             "one: see swarmlm.training.peer.make_peer")
        self.config = config
        self.make_trainer = make_trainer
        self.trainer: Optional[BlockTrainer] = None  # set by start() when config.training is set
        self.dht: Optional[hivemind.DHT] = None
        self.handler: Optional[SpanHandler] = None
        self.span: Optional[BlockSpan] = None
        self.model_name: Optional[str] = None
        self.throughput = 0.0
        self.identity: Optional[NodeIdentity] = None  # set by start_dht: the key behind the peer id, signs records
        self.swarm_key: Optional[SwarmKey] = None  # set by start_dht in a private swarm
        self._loop: Optional[LoopThread] = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # set to announce now (free cache changed, shutdown)
        self.moves = 0  # times this peer moved its span (automatic balancing)
        self._moving_to: Optional[tuple[int, int]] = None  # the span being loaded while the peer moves
        self._announce_lock = threading.Lock()  # one announcement at a time; shutdown's OFFLINE is the last
        self._left = False  # set by shutdown once it announced OFFLINE: nothing is announced after that
        self._announcer: Optional[threading.Thread] = None
        self.last_announced = 0.0  # time.monotonic() of the last announcement that went through
        self.watchdog: Optional[Watchdog] = None  # started by start(): the peer's checks of its own parts
        self.stopped = threading.Event()  # set when the watchdog found a dead part (the peer should leave)
        self._p2p = None
        self.metrics = PeerMetrics()  # shown at /metrics; training counts its averaging rounds here too
        self.metrics_server: Optional[HttpService] = None  # started by start() when config.metrics_port is set
        self.model_record: Optional[ModelRecord] = None  # what this peer registers about its model
        self.config_hash: Optional[str] = None  # of the model's config, announced in span records
        self.block_digests: dict[int, bytes] = {}  # block -> digest of its weights as stored (models.fingerprint)
        self.direct_address: Optional[str] = None  # "host:port" of direct connections, when served (config.serves_direct)

    # ---- start ------------------------------------------------------------------------------------

    def start_dht(self) -> list[str]:
        """Joins (or starts) the swarm; returns this node's full multiaddrs."""
        c = self.config
        raise_open_files_limit()  # before the DHT process and the p2p daemon start: they inherit it
        resolved = resolve_model(c.model)
        name, total = c.dht_prefix or resolved.name, AutoConfig.from_pretrained(resolved.path).num_hidden_layers
        self.identity = NodeIdentity.load_or_create(c.identity_path)
        self.swarm_key = load_swarm_key(c.swarm_key)
        self.dht = create_dht(
            [] if c.new_swarm else c.initial_peers, c.host_maddrs, c.announce_maddrs,
            use_nat_port_map=c.use_nat_port_map, use_relay=c.use_relay, startup_timeout=c.startup_timeout,
            identity=self.identity, protected=model_keys(name, total), swarm_key=self.swarm_key,
        )
        return [str(m) for m in self.dht.get_visible_maddrs()]

    def start(self) -> None:
        """Loads blocks, serves them and announces ONLINE (start_dht() first, or it is called here)."""
        c = self.config
        if self.dht is None:
            self.start_dht()
        if c.num_threads:
            torch.set_num_threads(c.num_threads)
        resolved = resolve_model(c.model)
        self.model_name = c.dht_prefix or resolved.name
        model_config = AutoConfig.from_pretrained(resolved.path)
        family = family_for_config(model_config)
        total = model_config.num_hidden_layers
        self.model_record = ModelRecord(num_blocks=total, family=family.model_type)
        self.config_hash = config_hash(model_config)
        if c.blocks is not None:
            start, end = c.blocks
            if end > total:
                raise ValueError(f"blocks {start}:{end} out of range: {self.model_name} has {total} blocks")
        else:
            records = fetch_block_records(self.dht, self.model_name, total)
            start, end = choose_span(block_throughputs(records), min(c.num_blocks, total))
        self._checkpoint, self._model_config, self._family = resolved.path, model_config, family
        dtype, device = DTYPES[c.torch_dtype], torch.device(c.device)
        self._announce(ServerState.JOINING, start, end, free=0)
        span = self._load_span(start, end)
        self.span = span
        self.throughput = c.throughput or measure_throughput(span, device, dtype)
        if c.training is not None:
            self.trainer = self._start_training(span)  # before any thread that serves starts (it forks)
        max_positions = getattr(model_config, "max_position_embeddings", 2048)
        limits = Limits(
            hidden_size=model_config.hidden_size,
            max_batch_size=c.max_batch_size,
            max_request_tokens=c.max_request_tokens,
            max_session_length=min(c.max_session_length or max_positions, max_positions),
            request_timeout=c.request_timeout,
            session_timeout=c.session_timeout,
            open_timeout=c.open_timeout, max_queued_jobs=c.max_queued_jobs,
        )
        per_source = c.max_cache_tokens_per_source or c.max_cache_tokens // 2
        self.budget = CacheBudget(c.max_cache_tokens, on_change=self._wake.set, per_source=per_source)
        self.handler = SpanHandler(span, self.model_name, limits, self.budget, dtype, device, metrics=self.metrics,
                                   trainer=self.trainer)
        self.metrics.watch(active_sessions=lambda: self.handler.active_sessions,
                           cache_used_tokens=lambda: self.budget.max_tokens - self.budget.free_tokens,
                           cache_free_tokens=lambda: self.budget.free_tokens)
        if c.metrics_port is not None:
            self.metrics_server = serve_metrics(self.metrics.registry, c.metrics_host, c.metrics_port)
            logger.info(f"Serving metrics at {self.metrics_url}")
        self._loop = LoopThread("swarmlm-peer-rpc")
        self._loop.run(self._serve(), timeout=c.startup_timeout)
        if self.trainer is not None:
            self.trainer.start(self.handler.compute)
        self._announce(ServerState.ONLINE)
        self._announcer = threading.Thread(target=self._announce_loop, name="swarmlm-announcer", daemon=True)
        self._announcer.start()
        self.watchdog = Watchdog(peer_checks(self), c.health_check_period, lambda failure: self.stopped.set()).start()
        logger.info(f"Serving blocks {start}:{end} of {self.model_name} ({self.throughput:.0f} tokens/s per block)")

    def _load_span(self, start: int, end: int, reuse: Optional[BlockSpan] = None) -> BlockSpan:
        """Blocks [start, end) with their weights (span_loader.load_span); their digests join block_digests."""
        c = self.config
        span, digests = load_span(self._checkpoint, self._family, self._model_config, start, end,
                                  DTYPES[c.torch_dtype], torch.device(c.device), reuse)
        self.block_digests.update(digests)  # kept blocks keep theirs
        return span

    def _start_training(self, span: BlockSpan) -> BlockTrainer:
        """Makes the span trainable (float32, requires grad) and joins its replicas' run, downloading their
        state if they are already training. Optimizer steps run on the handler's compute thread, so every
        request step that reads the parameters must run there too. Inference sessions stay allowed, but a
        session on a training peer sees the weights change at each epoch."""
        children_die_with_this_process()  # hivemind's averager processes, forked next, die with this peer
        span.requires_grad_(True)
        return self.make_trainer(span, self.model_name, self.dht, self.metrics)

    @property
    def metrics_url(self) -> Optional[str]:
        """Where Prometheus scrapes this peer (None without config.metrics_port)."""
        return f"{self.metrics_server.url}/metrics" if self.metrics_server is not None else None

    async def _serve(self) -> None:
        c = self.config
        self._p2p = await self.dht.replicate_p2p()
        limits = ChannelLimits(c.max_connections_per_source, c.max_connections)
        await self.handler.serve(Server(self._p2p, limits=limits, refuse=refuse_busy, swarm_key=self.swarm_key))
        if c.serves_direct:
            bind, announce = direct_hosts(c.host_maddrs, c.announce_maddrs)
            self.direct_address = await self.handler.serve_direct(bind, c.direct_port, announce)
            logger.info(f"Serving direct connections at {self.direct_address} (plain TCP)")

    @property
    def failure(self) -> Optional[str]:
        """What part of the peer died ("part: what"), once the watchdog found one; the peer should then leave."""
        return self.watchdog.failure if self.watchdog is not None else None

    # ---- announcements ----------------------------------------------------------------------------

    def record(self, state: ServerState, start: int | None = None, end: int | None = None, free: int | None = None):
        start = self.span.start if start is None else start
        end = self.span.end if end is None else end
        return ServerRecord(
            peer_id=self.dht.peer_id.to_base58(),
            state=state,
            start=start,
            end=end,
            throughput=float(self.throughput),
            free_cache_tokens=self.budget.free_tokens if free is None else free,
            max_cache_tokens=self.config.max_cache_tokens,
            version=__version__,
            torch_dtype=self.config.torch_dtype,
            public_name=self.config.public_name,
            movable=self.config.blocks is None,
            config_hash=self.config_hash,
            weights_hash=span_weights_hash(self.config_hash, self.block_digests, start, end),
        )

    def _announce(self, state: ServerState, start=None, end=None, free=None, blocks=None) -> None:
        """Announces `state` for span [start, end) (default: the served span) under each of its blocks, or only
        under `blocks`. Does nothing once the peer has left (shutdown announced OFFLINE)."""
        with self._announce_lock:
            if not self._left:
                self._write(state, start, end, free, blocks)

    def _write(self, state: ServerState, start=None, end=None, free=None, blocks=None) -> None:
        record = self.record(state, start, end, free)
        blocks = None if blocks is None else list(blocks)
        if blocks == []:
            return
        expiration = get_dht_time() + record_expiration(self.config.update_period)
        declare_span(self.dht, self.model_name, record, expiration, self.identity.signer, blocks=blocks)
        self.last_announced = time.monotonic()
        if blocks is None:  # the peer's own announcement, not a note about some of its blocks during a move
            declare_model(self.dht, self.model_name, self.model_record, expiration, self.identity.signer)
            self.metrics.observe_announcement(self.model_name, self.model_record.family, record,
                                              count_dht_peers(self.dht))

    def _announce_loop(self) -> None:
        """Announces ONLINE every update_period and whenever the free KV cache changes (so the DHT
        shows the exact free tokens); movable peers also check the balance every balance_period."""
        c = self.config
        next_balance = time.monotonic() + c.balance_period * random.uniform(0.5, 1.5)
        while not self._stop.is_set():
            self._wake.wait(max(0.0, min(c.update_period, next_balance - time.monotonic())))
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                if c.blocks is None and time.monotonic() >= next_balance:
                    next_balance = time.monotonic() + c.balance_period * random.uniform(0.5, 1.5)
                    self._rebalance()
                self._announce(ServerState.ONLINE)
            except Exception as e:
                logger.warning(f"Failed to announce: {e}; retrying in {c.update_period} s", exc_info=True)

    # ---- balancing ---------------------------------------------------------------------------------

    def _rebalance(self) -> None:
        """Moves this peer's span if the swarm-wide plan (see `plan_move`) names this peer.

        No block that this peer serves disappears from the swarm while it moves: the old layers keep
        serving until the switch, so the blocks it keeps and the blocks it drops stay ONLINE; only the
        blocks it adds are JOINING while they load. After the load, the peer checks again that every
        block it drops is served by another ONLINE peer (the swarm may have changed meanwhile; if not,
        the move is called off), announces those blocks OFFLINE, switches, and announces the new span
        ONLINE. Layers it keeps are reused, never reloaded."""
        records = fetch_block_records(self.dht, self.model_name, self.model_record.num_blocks)
        move = plan_move(records, self.config.balance_margin)
        me = self.dht.peer_id.to_base58()
        if move is None or move.peer_id != me:
            return
        old, target = self.span, range(move.start, move.end)
        added = [b for b in target if not old.start <= b < old.end]
        dropped = [b for b in range(old.start, old.end) if b not in target]
        logger.info(f"Moving from blocks {old.start}:{old.end} to {move.start}:{move.end}: the swarm will cover "
                    f"{move.covered_blocks} blocks, weakest at {move.bottleneck:.0f} tokens/s")
        self._moving_to = (move.start, move.end)  # until the move is done or called off (shutdown reads it)
        try:
            self._announce_moving(added)
            span = self._load_while_announcing(move.start, move.end, old, added)
        except BaseException:
            self._call_off_move(added)
            raise
        if span is None or self._stop.is_set():
            return  # shutting down: shutdown's OFFLINE covers the blocks being added too
        records = fetch_block_records(self.dht, self.model_name, self.model_record.num_blocks)
        alone = [b for b in dropped if not any(r.state == ServerState.ONLINE and r.peer_id != me for r in records[b])]
        if alone:
            logger.warning(f"Not moving to blocks {move.start}:{move.end}: no other peer serves blocks "
                           f"{alone[0]}:{alone[-1] + 1} any more")
            self._call_off_move(added)
            return
        self._announce(ServerState.OFFLINE, old.start, old.end, blocks=dropped)  # others serve them
        self.span = self.handler.span = span  # open sessions keep the old span until they close
        self._moving_to = None
        self._announce(ServerState.ONLINE)
        self.moves += 1
        logger.info(f"Serving blocks {span.start}:{span.end} of {self.model_name}")

    def _call_off_move(self, added: list[int]) -> None:
        """Withdraws the JOINING entries of a move that will not happen; the peer keeps its span."""
        try:
            self._announce(ServerState.OFFLINE, *self._moving_to, free=0, blocks=added)
        finally:
            self._moving_to = None

    def _announce_moving(self, added: list[int]) -> None:
        """While a move loads: the served span ONLINE, the blocks being added JOINING."""
        self._announce(ServerState.ONLINE)
        self._announce(ServerState.JOINING, *self._moving_to, free=0, blocks=added)

    def _load_while_announcing(self, start: int, end: int, reuse: BlockSpan, added: list[int]) -> Optional[BlockSpan]:
        """Loads blocks [start, end) in a helper thread while this thread keeps the move's announcements
        fresh (every update_period, and when the free cache changes). None if the peer shuts down meanwhile
        (the load is abandoned)."""
        loaded: concurrent.futures.Future = concurrent.futures.Future()

        def load() -> None:
            try:
                loaded.set_result(self._load_span(start, end, reuse=reuse))
            except BaseException as e:
                loaded.set_exception(e)
            finally:
                self._wake.set()

        threading.Thread(target=load, name="swarmlm-loader", daemon=True).start()
        while True:
            self._wake.wait(self.config.update_period)
            self._wake.clear()
            if self._stop.is_set():
                return None
            if loaded.done():
                return loaded.result()
            self._announce_moving(added)

    # ---- shutdown ---------------------------------------------------------------------------------

    def shutdown(self, drain_timeout: float = 10.0) -> None:
        """Stops taking sessions and calls, stops the announcer, announces OFFLINE (the last announcement),
        waits (at most `drain_timeout` s) for running sessions and calls, stops."""
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.handler is not None:
            self.handler.stop_accepting()
        self._stop.set()
        self._wake.set()
        if self._announcer is not None:
            self._announcer.join(timeout=5)
            if self._announcer.is_alive():
                logger.warning("The announcer is still busy; it will announce nothing more")
        with self._announce_lock:  # an announcement in progress ends first; none starts after this
            self._left = True
            moving = self._moving_to
            if self.dht is not None and self.span is not None and self.dht.is_alive():  # (a dead one never answers)
                try:
                    self._write(ServerState.OFFLINE, free=0)
                    if moving is not None:  # a move was loading: withdraw its JOINING blocks too
                        self._write(ServerState.OFFLINE, *moving, free=0,
                                    blocks=[b for b in range(*moving) if not self.span.start <= b < self.span.end])
                except Exception as e:
                    logger.warning(f"Could not announce OFFLINE: {e}")
        deadline = time.monotonic() + drain_timeout
        while self.handler is not None and self.handler.busy and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.handler is not None and self.handler.busy:
            logger.warning(f"Stopping with {self.handler.active_sessions} sessions and {self.handler.active_calls} "
                           f"calls still running after {drain_timeout} s")
        if self._loop is not None:
            if self._p2p is not None:
                try:
                    self._loop.run(self.handler.remove_handlers(), timeout=5)
                except Exception:
                    pass
            self._loop.stop()
        if self.trainer is not None:  # no request arrives any more; leave the run on the compute thread
            self.trainer.shutdown(self.handler.compute if self.handler is not None else None)
        if self.handler is not None:
            self.handler.shutdown()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        if self.dht is not None:
            shutdown_dht(self.dht)
        logger.info("Peer stopped")
