"""Badly framed inference messages and how a peer answers them (shared by the p2p and direct-connection tests)."""

from __future__ import annotations

import asyncio

from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from swarmlm.experts.protocol import check_response

BAD_FRAMES = [  # (raw bytes written into an inference stream, what the peer's bad_request error says)
    (b"\x07" + b"\x00" * 16, "unknown stream frame marker"),
    (b"\x00" + (2**40).to_bytes(8, "big"), "exceeds the limit of"),  # refused before any of it is read
    (b"\x00" + (3).to_bytes(8, "big") + b"\xff\xff\xff", "not a valid ExpertRequest"),
]


async def answer_to_frame(peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          frame: bytes) -> runtime_pb2.ExpertResponse:
    """Writes `frame` into an inference stream and returns the peer's answer (RemotePeerError if it is an error)."""
    try:
        writer.write(frame)
        response, error = await asyncio.wait_for(P2P.receive_protobuf(runtime_pb2.ExpertResponse, reader), 30)
        assert error is None
        return check_response(peer, response)
    finally:
        writer.close()
