"""Pushed steps: a peer sends its output of an inference step straight to the next peer of the client's route.

Outgoing (`Pushes.push`): one long-lived channel per target peer, opened in the background on first use,
re-opened at most every PUSH_RETRY_SECONDS after it failed, closed after PUSH_IDLE_SECONDS unused; at most
MAX_PUSH_STREAMS. Incoming (`Pushes.serve`): another peer's channel of pushed steps, each handed to
`deliver(step, message, pusher)` (the session it names, if it takes pushes from that peer; validated there like a
client's step); at most
MAX_PUSH_STREAMS such channels are open to us.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Optional

from hivemind.proto import runtime_pb2

from swarmlm.errors import RequestError
from swarmlm.experts.protocol import INFO, PUSH, InferenceStep, PeerInfo, PushTarget, unpack
from swarmlm.monitoring.metrics import PeerMetrics
from swarmlm.transport import Channel, Dialer
from swarmlm.transport.p2p import is_peer_id

logger = logging.getLogger(__name__)

MAX_PUSH_STREAMS = 256  # open push streams to other peers at most (one per peer pushed to), and from them
PUSH_RETRY_SECONDS = 30.0  # a push stream that failed is re-opened no sooner than this after it was opened
PUSH_IDLE_SECONDS = 300.0  # a push stream unused this long is closed (checked while pushing, every 30 s)

Deliver = Callable[[InferenceStep, runtime_pb2.ExpertRequest, str], None]  # (step, message, pusher's peer id);
# raises RequestError if not delivered


class PushStream:
    """Our long-lived push channel to one peer; `closed` once it ends or fails (a new one is opened then).

    Where this peer serves direct connections itself (`dialer.direct`), the channel is a direct connection
    if the target serves them too: its address comes from the target's own info answer over p2p, which
    authenticates the target (an address named by a client or a DHT record could be anyone's). Otherwise
    it is a p2p stream.

    `send` writes into the channel at once, without waiting for a writer task, so a pushed step leaves
    before the answer to the client does. A push that was written but never arrives (the stream broke
    meanwhile) costs the client its push timeout, after which it sends the step itself
    (ClientConfig.push_timeout)."""

    MAX_BUFFERED_BYTES = 64 * 1024**2  # a target that reads slower than this is given up on
    INFO_TIMEOUT = 5.0  # seconds to wait for the target's info (its direct address)

    def __init__(self, dialer: Dialer, peer: str):
        self._channel: Optional[Channel] = None
        self.closed = False
        self.direct = False  # whether the stream is a direct connection
        self.started = self.last_used = time.monotonic()
        self.task = asyncio.create_task(self._run(dialer, peer))

    async def _open(self, dialer: Dialer, peer: str) -> Channel:
        if dialer.direct:
            address = None
            try:
                async with asyncio.timeout(self.INFO_TIMEOUT):
                    response = await dialer.call(peer, INFO, runtime_pb2.ExpertRequest(), runtime_pb2.ExpertResponse)
                info = unpack(response.metadata, PeerInfo)
                address = info.direct_address
                dialer.learn(peer, info.direct_ticket)
                if address is not None:
                    channel = await dialer.open_direct(peer, PUSH, address)
                    if channel is not None:
                        return channel
                    logger.info(f"No direct push connection to {peer} (at {address}); pushing over p2p")
            except Exception as e:
                logger.info(f"No direct push connection to {peer} (at {address}): {type(e).__name__}: {e}; "
                            f"pushing over p2p")
        return await dialer.open_p2p(peer, PUSH)

    async def _run(self, dialer: Dialer, peer: str) -> None:
        try:
            self._channel = await self._open(dialer, peer)
            self.direct = self._channel.direct
            await self._channel.discard_input()  # the peer answers nothing; whatever comes is dropped, not kept
        except Exception as e:
            logger.debug(f"Push stream to {peer} ended: {type(e).__name__}: {e}")
        finally:
            self.closed = True
            if self._channel is not None:
                self._channel.close()

    def expired(self, now: float) -> bool:
        """Whether to drop this stream: idle for PUSH_IDLE_SECONDS, or failed PUSH_RETRY_SECONDS after it was
        opened (a new one may be opened then)."""
        return now - self.last_used >= PUSH_IDLE_SECONDS or (self.closed and now - self.started >= PUSH_RETRY_SECONDS)

    def send(self, message: runtime_pb2.ExpertRequest) -> bool:
        """Writes `message` into the stream; False (nothing sent) while it is not open or after it closed."""
        if self._channel is None or self.closed:
            return False
        if self._channel.closing or self._channel.buffered_bytes > self.MAX_BUFFERED_BYTES:  # broke, or too slow
            self.close()
            return False
        self._channel.send(message)
        self.last_used = time.monotonic()
        return True

    def close(self) -> None:
        self.closed = True
        self.task.cancel()


class Pushes:
    def __init__(self, metrics: PeerMetrics, max_message_bytes: int):
        self.metrics, self.max_message_bytes = metrics, max_message_bytes
        self.dialer: Optional[Dialer] = None  # set once the peer serves (SpanHandler.serve): no pushes before
        self.streams: dict[str, PushStream] = {}  # peer id -> our stream of pushed steps to it
        self._checked = time.monotonic()  # when idle push streams were last closed
        self.incoming = 0  # push streams other peers have open to us

    def push(self, target: PushTarget, message: runtime_pb2.ExpertRequest) -> bool:
        """Sends `message` on our push stream to `target.peer_id`; False if that stream is not open (yet): it is
        opened in the background on first use and re-opened at most every PUSH_RETRY_SECONDS after it failed."""
        now = time.monotonic()
        if now - self._checked >= PUSH_IDLE_SECONDS / 10:
            self.close_idle(now)
        stream = self.streams.get(target.peer_id)
        if stream is not None and stream.expired(now):
            stream.close()
            del self.streams[target.peer_id]
            stream = None
        if stream is None:
            if len(self.streams) >= MAX_PUSH_STREAMS:
                self.close_idle(now)
            if self.dialer is None or len(self.streams) >= MAX_PUSH_STREAMS or not is_peer_id(target.peer_id):
                return False
            self.streams[target.peer_id] = PushStream(self.dialer, target.peer_id)
            return False
        if not stream.send(message):
            return False
        self.metrics.step_pushed("direct" if stream.direct else "p2p")
        return True

    def close_idle(self, now: float) -> None:
        """Closes and forgets the push streams that carried nothing for PUSH_IDLE_SECONDS (and failed ones that
        may be retried), so that a long-lived peer keeps only the streams its current routes use."""
        self._checked = now
        for peer_id, stream in list(self.streams.items()):
            if stream.expired(now):
                stream.close()
                del self.streams[peer_id]

    async def close_all(self) -> None:
        """Closes every push stream and waits until their tasks have ended."""
        streams, self.streams = list(self.streams.values()), {}
        for stream in streams:
            stream.close()
        await asyncio.gather(*(stream.task for stream in streams), return_exceptions=True)

    async def serve(self, channel: Channel, deliver: Deliver) -> None:
        """An incoming push channel: each step goes to `deliver`; a step it refuses is dropped (logged). A
        channel that is not framed right, or idle for twice PUSH_IDLE_SECONDS, is closed, and so is one
        beyond MAX_PUSH_STREAMS open to us."""
        if self.incoming >= MAX_PUSH_STREAMS:
            logger.info(f"Refused a push stream of {channel.peer}: {MAX_PUSH_STREAMS} are open")
            channel.close()
            return
        self.incoming += 1
        try:
            while (message := await _within(channel, self.max_message_bytes, PUSH_IDLE_SECONDS * 2)) is not None:
                try:
                    deliver(unpack(message.metadata, InferenceStep), message, channel.peer)
                except RequestError as e:
                    logger.info(f"Dropped a step pushed by {channel.peer}: {e}")
        except RequestError as e:
            logger.info(f"Closed the push stream of {channel.peer}: {e}")
        finally:
            self.incoming -= 1
            channel.close()


async def _within(channel: Channel, max_bytes: int, seconds: float) -> Optional[runtime_pb2.ExpertRequest]:
    """The next message, or None (the stream is given up on) if none starts arriving within `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            return await channel.receive(runtime_pb2.ExpertRequest, max_bytes)
    except TimeoutError:
        return None
