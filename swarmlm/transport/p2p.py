"""The one adapter to hivemind's P2P: method names on the wire, handler registration, calls, stream framing.

Everything here is public hivemind API (`P2P.add_protobuf_handler`, `iterate_protobuf_handler`,
`call_protobuf_handler`, `add_binary_stream_handler`, `call_binary_stream_handler`, their `remove_*`, and
the framing constants `P2P.MESSAGE_MARKER`, `ERROR_MARKER`, `HEADER_LEN`, `BYTEORDER`, `END_OF_STREAM`).
The rest of swarmlm reaches P2P only through this module; tests/test_transport.py pins what it relies on
(that our frames are the frames hivemind's protobuf streams read and write).

A method's handle name on the wire is "swarmlm.SpanService.rpc_<method>": the names peers have always
served, so older and newer peers still understand each other.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Awaitable, Callable

from google.protobuf.message import Message
from hivemind.p2p import P2P, P2PContext, PeerID

SERVICE = "swarmlm.SpanService"
MESSAGE_MARKER: bytes = P2P.MESSAGE_MARKER  # a frame carrying a message
ERROR_MARKER: bytes = P2P.ERROR_MARKER  # a frame carrying an RPCError (an empty one: end of stream)
HEADER_LEN: int = P2P.HEADER_LEN  # bytes of a frame's length field
BYTEORDER: str = P2P.BYTEORDER
END_OF_STREAM_BYTES: bytes = P2P.END_OF_STREAM.SerializeToString()

RawHandler = Callable[[str, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]  # (caller, reader, writer)


def handle_name(method: str) -> str:
    """The wire name of `method` ("inference" -> "swarmlm.SpanService.rpc_inference")."""
    return f"{SERVICE}.rpc_{method}"


def peer_id(text: str) -> PeerID:
    """A base58 peer id -> PeerID; ValueError if it is not one."""
    try:
        return PeerID.from_base58(text)
    except Exception as e:
        raise ValueError(f"not a peer id: {text[:80]!r} ({type(e).__name__})") from None


def is_peer_id(text: str) -> bool:
    try:
        peer_id(text)
    except ValueError:
        return False
    return True


def own_id(p2p: P2P) -> str:
    return p2p.peer_id.to_base58()


def caller_of(context: "P2PContext | str") -> str:
    """Who made a call: the base58 peer id of a protobuf call's caller (proven by libp2p's handshake); a
    channel's caller (already a string) as it is."""
    if isinstance(context, str):
        return context
    return context.remote_id.to_base58() if isinstance(context.remote_id, PeerID) else str(context.remote_id)


async def daemon_answers(p2p: P2P) -> bool:
    """Whether the p2p daemon behind `p2p` answers (it lists its connections)."""
    try:
        await p2p.list_peers()
    except Exception:
        return False
    return True


async def serve_raw(p2p: P2P, method: str, handler: RawHandler, balanced: bool = False) -> None:
    """Serves `method` as a raw stream: `handler(caller peer id, reader, writer)` reads and writes frames itself."""
    async def handle(info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await handler(info.peer_id.to_base58(), reader, writer)

    await p2p.add_binary_stream_handler(handle_name(method), handle, balanced)


async def serve_unary(p2p: P2P, method: str, handler, request_type: type[Message], balanced: bool = False) -> None:
    """Serves `method` as a unary protobuf call: `handler(request, context)` returns the one answer."""
    await p2p.add_protobuf_handler(handle_name(method), handler, request_type, balanced=balanced)


async def stop_serving(p2p: P2P, raw: list[str], unary: list[str]) -> None:
    """Stops serving the `raw` methods and the `unary` ones."""
    await asyncio.gather(*(p2p.remove_binary_stream_handler(handle_name(m)) for m in raw),
                         *(p2p.remove_protobuf_handler(handle_name(m)) for m in unary))


async def open_raw(p2p: P2P, peer: str, method: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Opens a raw stream to `peer` (base58) for `method`."""
    _, reader, writer = await p2p.call_binary_stream_handler(peer_id(peer), handle_name(method))
    return reader, writer


async def call_unary(p2p: P2P, peer: str, method: str, request: Message, response_type: type[Message]) -> Message:
    return await p2p.call_protobuf_handler(peer_id(peer), handle_name(method), request, response_type)


async def iterate(p2p: P2P, peer: str, method: str, requests: AsyncIterator[Message],
                  response_type: type[Message]) -> AsyncIterator[Message]:
    """The answers of a stream-in, stream-out protobuf call."""
    return await p2p.iterate_protobuf_handler(peer_id(peer), handle_name(method), requests, response_type)
