"""Server: what one node serves, over p2p and (when asked) direct TCP, behind one admission hook.

Two kinds of methods:
- channel methods (a peer's inference, push, forward, backward, state): `handler(channel)` owns a raw framed
  stream (swarmlm.transport.channel), served on p2p streams and, after `serve_direct`, on direct connections too;
- unary protobuf methods (a peer's info): hivemind's unary handlers, p2p only, `handler(request, context)`.

`admit(peer, kind, method)` runs before any handler: it returns None to let the caller in, or the reason it
is refused (the stream is closed, a protobuf call fails with that reason); the default admits everyone. Channels
then count against their source's and the total limit (swarmlm.transport.limits). In a private swarm
(`swarm_key`), a caller must then show its membership proof (swarmlm.transport.membership) before any handler
runs. A refused channel gets `refuse(channel, reason)`'s answer before it is closed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Optional

from google.protobuf.message import Message
from hivemind.p2p import P2P

from swarmlm.utils.swarm_key import SwarmKey
from swarmlm.errors import RefusedError
from swarmlm.transport import membership, p2p as p2p_adapter
from swarmlm.transport.channel import DIRECT, P2P_KIND, Channel
from swarmlm.transport.direct import DirectListener
from swarmlm.transport.limits import ChannelCounts, ChannelLimits

logger = logging.getLogger(__name__)

ChannelHandler = Callable[[Channel], Awaitable[None]]
Admit = Callable[[str, str, str], Optional[str]]  # (peer, "p2p" | "direct", method) -> None or why refused
Refuse = Callable[[Channel, str], None]  # (channel, reason): answers a refused channel before it is closed


class Server:
    def __init__(self, p2p: P2P, admit: Optional[Admit] = None, limits: ChannelLimits = ChannelLimits(),
                 refuse: Optional[Refuse] = None, swarm_key: Optional[SwarmKey] = None):
        self.p2p, self.swarm_key = p2p, swarm_key
        self.peer_id = p2p_adapter.own_id(p2p)
        self.admit: Admit = admit if admit is not None else (lambda peer, kind, method: None)
        self.channels = ChannelCounts(limits)  # open channels per source (see swarmlm.transport.limits)
        self.refuse = refuse
        self.direct: Optional[DirectListener] = None
        self._channels: dict[str, ChannelHandler] = {}
        self._unary: list[str] = []

    @property
    def direct_address(self) -> Optional[str]:
        """"IPV4:PORT" where direct connections are served (None: not served)."""
        return self.direct.address if self.direct is not None else None

    def health(self) -> dict[str, Callable[[], Awaitable[Optional[str]]]]:
        """Checks of what this server depends on, for a watchdog: part -> async check (None while it works)."""
        async def daemon() -> Optional[str]:
            return None if await p2p_adapter.daemon_answers(self.p2p) else "it does not answer"

        async def direct() -> Optional[str]:
            return None if self.direct.serving else "it stopped listening"

        return {"p2p daemon": daemon, **({"direct listener": direct} if self.direct is not None else {})}

    def direct_ticket(self, caller: str) -> Optional[str]:
        """The ticket `caller` (a peer id proven by p2p) shows on direct connections; None where none are served.
        Hand it out only over p2p (swarmlm.transport.direct)."""
        return self.direct.tickets.issue(caller) if self.direct is not None else None

    async def serve(self, channels: dict[str, ChannelHandler],
                    unary: dict[str, tuple[Callable, type[Message]]]) -> None:
        """Serves `channels` ({method: handler}) and `unary` protobuf methods ({method: (handler, request type)})
        on p2p."""
        self._channels.update(channels)
        self._unary += list(unary)
        await asyncio.gather(
            *(p2p_adapter.serve_raw(self.p2p, method, self._stream_handler(method, P2P_KIND)) for method in channels),
            *(p2p_adapter.serve_unary(self.p2p, method, self._admitted(method, handler), request_type)
              for method, (handler, request_type) in unary.items()),
        )

    async def serve_direct(self, host: str, port: int, announce_host: str) -> str:
        """Also serves the channel methods on direct TCP at host:port (0: any free port); returns the address
        to announce (in the peer's info answer, never in a DHT record)."""
        self.direct = DirectListener(self.peer_id, {m: self._stream_handler(m, DIRECT) for m in self._channels},
                                     max_connections=self.channels.limits.total)
        return await self.direct.start(host, port, announce_host)

    async def stop(self) -> None:
        """No new streams or calls; direct connections closed."""
        if self.direct is not None:
            await self.direct.stop()
        await p2p_adapter.stop_serving(self.p2p, list(self._channels), self._unary)

    def _refusal(self, peer: str, kind: str, method: str) -> Optional[str]:
        reason = self.admit(peer, kind, method)
        if reason is not None:
            logger.info(f"Refused {method} from {peer} ({kind}): {reason}")
        return reason

    def _gated(self, method: str, handler: ChannelHandler) -> ChannelHandler:
        """The handler behind `admit` and the channel limits: a refused channel gets `refuse`'s answer (if any)
        and is closed; an admitted one counts against its source until its handler returns."""
        async def gated(channel: Channel) -> None:
            source = channel.source
            reason = self._refusal(channel.peer, channel.kind, method)
            if reason is not None:
                self.channels.refused["admission"] += 1
            else:
                reason = self.channels.acquire(source)
                if reason is not None:
                    logger.info(f"Refused {method} from {channel.peer} ({channel.kind}): {reason}")
                elif self.swarm_key is not None:
                    reason = await membership.channel_refusal(self.swarm_key, channel.reader, channel.peer, self.peer_id)
                    if reason is not None:
                        self.channels.release(source)
                        self.channels.refused["admission"] += 1
                        logger.info(f"Refused {method} from {channel.peer} ({channel.kind}): {reason}")
            if reason is not None:
                if self.refuse is not None:
                    self.refuse(channel, reason)
                channel.close()
                return
            try:
                await handler(channel)
            finally:
                self.channels.release(source)

        return gated

    def _stream_handler(self, method: str, kind: str):
        """(caller, reader, writer) -> the method's channel handler, once `admit` lets the caller in."""
        gated = self._gated(method, self._channels[method])

        async def handle(peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await gated(Channel(reader, writer, peer, kind))

        return handle

    def _admitted(self, method: str, handler: Callable) -> Callable:
        """A unary handler behind `admit` (and, in a private swarm, behind the proof its request carries): a refused
        call fails with the reason (RefusedError)."""
        async def unary(request, context):
            caller = p2p_adapter.caller_of(context)
            reason = self._refusal(caller, P2P_KIND, method)
            if reason is None and self.swarm_key is not None:
                reason = membership.refusal(self.swarm_key, request, caller, self.peer_id)
                if reason is not None:
                    logger.info(f"Refused {method} from {caller} ({P2P_KIND}): {reason}")
            if reason is not None:
                self.channels.refused["admission"] += 1
                raise RefusedError(reason)
            return await handler(request, context)

        return unary
