"""Channels: one open stream with one other node for one method, over direct TCP or p2p; and the Dialer
that opens them (and makes protobuf calls) for a client or a peer.

A channel carries frames (swarmlm.transport.framing) both ways; `send` writes a frame at once, without a
writer task (a step leaves as soon as it is sent), `receive` reads the next one under a size limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator, Optional, TypeVar

from google.protobuf.message import Message
from hivemind.p2p import P2P

from hivemind.proto import runtime_pb2

from swarmlm.utils.swarm_key import SwarmKey
from swarmlm.errors import ChannelClosedError
from swarmlm.transport import framing, membership, p2p as p2p_adapter
from swarmlm.transport.direct import connect

M = TypeVar("M", bound=Message)
logger = logging.getLogger(__name__)

DIRECT, P2P_KIND = "direct", "p2p"


class Channel:
    """One stream. `peer`: who is on the other end, a base58 peer id (proven by libp2p on p2p, by the caller's
    ticket on a direct connection, see swarmlm.transport.direct). `kind`: "direct" or "p2p"."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str, kind: str):
        self.reader, self.writer, self.peer, self.kind = reader, writer, peer, kind

    @property
    def direct(self) -> bool:
        return self.kind == DIRECT

    @property
    def source(self) -> str:
        """Whom the channel counts against (swarmlm.transport.limits): the peer id on p2p; the IP address of a
        direct connection ("ip:HOST"), since one machine can make peer ids, and tickets for them, at will."""
        if not self.direct:
            return self.peer
        peername = self.writer.get_extra_info("peername")
        return f"ip:{peername[0]}" if peername else "ip:?"

    @property
    def closing(self) -> bool:
        return self.writer.is_closing()

    @property
    def buffered_bytes(self) -> int:
        """Bytes written but not yet sent (a reader that reads slowly makes this grow)."""
        return self.writer.transport.get_write_buffer_size()

    def send(self, message: Message) -> None:
        """Writes `message` as one frame; ChannelClosedError if the channel is closed."""
        if self.writer.is_closing():
            raise ChannelClosedError("the channel is closed")
        self.writer.write(framing.encode(message))

    async def drain(self) -> None:
        """Returns once the written frames are (mostly) sent: at once unless the other side reads slowly."""
        await self.writer.drain()

    async def receive(self, message_type: type[M], max_bytes: int) -> Optional[M]:
        """The next message, None at the end of the stream; RequestError for a bad frame (framing.read_message)."""
        return await framing.read_message(self.reader, message_type, max_bytes)

    async def discard_input(self) -> None:
        """Reads and drops whatever the other side sends, until it ends the stream."""
        while await self.reader.read(2**16):
            pass

    def end(self) -> None:
        """Ends our side of the stream (an end-of-stream frame) and closes it."""
        if not self.writer.is_closing():
            self.writer.write(framing.END_OF_STREAM_FRAME)
            self.writer.close()

    def close(self) -> None:
        self.writer.close()


class Dialer:
    """Opens channels and makes protobuf calls from one node (a client, or a peer pushing steps) over its p2p
    instance, and over direct TCP to peers that gave it a direct address and ticket in their info answer (when
    `direct`; see `learn`). In a private swarm (`swarm_key`) every channel and call starts with this node's
    membership proof (swarmlm.transport.membership)."""

    MAX_TICKETS = 4096  # peers whose tickets are kept at most (the oldest are forgotten first)

    def __init__(self, p2p: P2P, direct: bool = True, swarm_key: Optional[SwarmKey] = None):
        self.p2p, self.direct, self.swarm_key = p2p, direct, swarm_key
        self.peer_id = p2p_adapter.own_id(p2p)
        self._tickets: dict[str, str] = {}  # peer id -> the ticket it gave us for its direct connections

    def learn(self, peer: str, ticket: Optional[str]) -> None:
        """Keeps (or, for None, forgets) the direct-connection ticket `peer` gave us in its info answer."""
        self._tickets.pop(peer, None)
        if ticket is not None:
            if len(self._tickets) >= self.MAX_TICKETS:
                self._tickets.pop(next(iter(self._tickets)))
            self._tickets[peer] = ticket

    async def open(self, peer: str, method: str, direct_address: Optional[str] = None) -> Channel:
        """A channel to `peer` for `method`: direct where it has an address and direct connections are on
        (falling back to p2p, logged, if that fails), else p2p. Raises if the p2p stream cannot be opened."""
        if self.direct and direct_address is not None:
            channel = await self.open_direct(peer, method, direct_address)
            if channel is not None:
                return channel
        return await self.open_p2p(peer, method)

    async def open_direct(self, peer: str, method: str, address: str) -> Optional[Channel]:
        """A direct channel, or None (logged) if we have no ticket of `peer`, the connection fails or the other side
        is not `peer`."""
        ticket = self._tickets.get(peer)
        if ticket is None:
            logger.info(f"No direct connection to {peer} at {address}: it gave us no ticket; using p2p")
            return None
        try:
            reader, writer = await connect(address, peer, method, self.peer_id, ticket)
        except Exception as e:
            logger.info(f"No direct connection to {peer} at {address} ({type(e).__name__}: {e}); using p2p")
            return None
        return self._opened(Channel(reader, writer, peer, DIRECT))

    async def open_p2p(self, peer: str, method: str) -> Channel:
        reader, writer = await p2p_adapter.open_raw(self.p2p, peer, method)
        return self._opened(Channel(reader, writer, peer, P2P_KIND))

    def _opened(self, channel: Channel) -> Channel:
        if self.swarm_key is not None:
            channel.send(self._proof(channel.peer))
        return channel

    def _proof(self, peer: str) -> runtime_pb2.ExpertRequest:
        return membership.proof_request(self.swarm_key, self.peer_id, peer)

    async def call(self, peer: str, method: str, request: Message, response_type: type[M]) -> M:
        """A unary protobuf call (request -> one answer) over p2p. In a private swarm the request carries the proof
        as its metadata: unary requests are ExpertRequests without metadata of their own (info's)."""
        if self.swarm_key is not None:
            if not isinstance(request, runtime_pb2.ExpertRequest) or request.metadata:
                raise ValueError("a unary call in a private swarm takes an ExpertRequest without metadata")
            proof = self._proof(peer)
            proof.MergeFrom(request)
            request = proof
        return await p2p_adapter.call_unary(self.p2p, peer, method, request, response_type)

    @contextlib.asynccontextmanager
    async def answers(self, peer: str, method: str, request: Message, response_type: type[M]
                      ) -> AsyncIterator[AsyncIterator[M]]:
        """The answer stream of a one-message request over p2p (forward, backward, state). Our side of the
        stream stays open until the block exits (the whole answer read): peers close theirs only after ours
        ends, so a peer never closes first, which could make the p2p daemons drop the answer's tail."""
        answered = asyncio.Event()

        async def requests():
            if self.swarm_key is not None:
                yield self._proof(peer)
            yield request
            await answered.wait()

        try:
            yield await p2p_adapter.iterate(self.p2p, peer, method, requests(), response_type)
        finally:
            answered.set()
