"""Frames: how one protobuf message travels on a stream (p2p or direct TCP alike).

A frame is a marker byte (message or error), an 8-byte big-endian length and the serialized message:
the framing of hivemind's protobuf streams (swarmlm.transport.p2p), so that raw streams and hivemind's
protobuf handlers read each other's frames. An error frame with an empty error ends a stream.
A frame longer than the reader's limit is refused before its bytes are read.
"""

from __future__ import annotations

import asyncio
from typing import Optional, TypeVar

from google.protobuf.message import Message
from hivemind.proto.p2pd_pb2 import RPCError

from swarmlm.errors import RequestError
from swarmlm.transport.p2p import BYTEORDER, END_OF_STREAM_BYTES, ERROR_MARKER, HEADER_LEN, MESSAGE_MARKER

M = TypeVar("M", bound=Message)

END_OF_STREAM_FRAME = ERROR_MARKER + len(END_OF_STREAM_BYTES).to_bytes(HEADER_LEN, BYTEORDER) + END_OF_STREAM_BYTES


def encode(message: Message) -> bytes:
    """`message` as one frame, for writing into a stream in one write."""
    data = message.SerializeToString()
    return MESSAGE_MARKER + len(data).to_bytes(HEADER_LEN, BYTEORDER) + data


async def read_message(reader: asyncio.StreamReader, message_type: type[M], max_bytes: int) -> Optional[M]:
    """The next message of the stream; None where the stream ends (an end-of-stream frame, or the connection
    closing, even mid-frame). RequestError on an unknown marker, a frame over `max_bytes` (refused before it
    is read), an error frame that carries an error (its text is in the message) or bytes that are no
    `message_type`."""
    try:
        marker = await reader.readexactly(1)
        if marker not in (MESSAGE_MARKER, ERROR_MARKER):
            raise RequestError(f"unknown stream frame marker {marker!r}")
        size = int.from_bytes(await reader.readexactly(HEADER_LEN), BYTEORDER)
        if size > max_bytes:
            raise RequestError(f"a message of {size} bytes exceeds the limit of {max_bytes}")
        data = await reader.readexactly(size)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    if marker == ERROR_MARKER:
        if data == END_OF_STREAM_BYTES:
            return None
        try:
            text = RPCError.FromString(data).message
        except Exception:
            text = "(unreadable)"
        raise RequestError(f"the other side failed the stream: {text[:1000]}")
    message = message_type()
    try:
        message.ParseFromString(data)
    except Exception as e:
        raise RequestError(f"a message is not a valid {message_type.__name__} ({type(e).__name__})") from None
    return message
