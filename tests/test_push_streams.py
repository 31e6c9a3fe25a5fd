"""A peer's push streams to other peers (Pushes.push): idle ones are closed, failed ones retried later.
No processes: the streams are stand-ins that record what happens to them."""

from __future__ import annotations

import time

import swarmlm.peer.push as push_module
from swarmlm.experts.protocol import PushTarget
from swarmlm.monitoring.metrics import PeerMetrics
from swarmlm.peer.push import PUSH_IDLE_SECONDS, PUSH_RETRY_SECONDS, Pushes


class _Stream:
    expired = push_module.PushStream.expired  # the real rule

    def __init__(self, *_, **__):
        self.started = self.last_used = time.monotonic()
        self.closed = False
        self.direct = False
        self.sent = 0

    def send(self, message) -> bool:
        self.sent += 1
        self.last_used = time.monotonic()
        return not self.closed

    def close(self) -> None:
        self.closed = True


def _handler(monkeypatch) -> Pushes:
    monkeypatch.setattr(push_module, "PushStream", _Stream)
    pushes = Pushes(PeerMetrics(), max_message_bytes=2**20)
    pushes.dialer = object()  # the stand-in streams never dial
    return pushes


def _target(i: int) -> PushTarget:
    """A push target on peer i; i = 0: a peer id that is not base58."""
    return PushTarget(peer_id=f"QmPeer{i}abc" if i else "0OIl not base58", session_id="0" * 32)


def test_a_stream_opens_on_first_use_then_carries_pushes(monkeypatch):
    handler, target = _handler(monkeypatch), _target(1)
    assert handler.push(target, None) is False  # opening in the background
    assert handler.push(target, None) is True
    assert handler.streams[target.peer_id].sent == 1


def test_idle_and_failed_streams_are_closed_and_reopened_later(monkeypatch):
    handler = _handler(monkeypatch)
    idle, busy, failed = _target(1), _target(2), _target(3)
    for target in (idle, busy, failed):
        handler.push(target, None)
    streams = dict(handler.streams)
    now = time.monotonic()
    streams[idle.peer_id].last_used = now - PUSH_IDLE_SECONDS
    streams[failed.peer_id].closed = True
    streams[failed.peer_id].started = now - PUSH_RETRY_SECONDS
    handler._checked = now - PUSH_IDLE_SECONDS  # the periodic check is due
    assert handler.push(busy, None) is True
    assert streams[idle.peer_id].closed and set(handler.streams) == {busy.peer_id}
    assert handler.push(failed, None) is False  # a fresh stream opens for the next push
    assert handler.streams[failed.peer_id] is not streams[failed.peer_id]


def test_a_target_that_is_no_peer_id_is_not_pushed_to(monkeypatch):
    handler = _handler(monkeypatch)
    assert handler.push(_target(0), None) is False and handler.streams == {}


def test_a_push_into_a_channel_that_broke_is_not_sent_and_the_stream_is_dropped():
    """The target went away: its channel is closing before our stream's task noticed. The push is not sent (and
    raises nothing into the session that pushes); the stream counts as closed, to be re-opened later."""
    from types import SimpleNamespace

    def send(message):
        raise AssertionError("written into a closing channel")

    stream = push_module.PushStream.__new__(push_module.PushStream)  # no task: the channel is a stand-in
    stream.closed, stream.task = False, SimpleNamespace(cancel=lambda: None)
    stream._channel = SimpleNamespace(closing=True, buffered_bytes=0, send=send)
    assert stream.send(None) is False and stream.closed
