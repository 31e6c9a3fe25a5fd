"""Membership proofs on swarmlm's own RPCs in a private swarm (the key: swarmlm.utils.swarm_key).

In a private swarm the first frame of every channel, and the request of every unary call, is a proof frame: an
ExpertRequest whose metadata is PROOF_PREFIX and `SwarmKey.member_proof(caller, callee)`. The Dialer writes it
(with the channel's first request, no extra round trip); the Server checks it before any handler runs, and
refuses the caller without one. The caller's peer id is proven by libp2p (or by its ticket on a direct
connection), so a proof shown to one peer is of no use to anyone else.
"""

from __future__ import annotations

import asyncio
from typing import Optional

from hivemind.proto import runtime_pb2

from swarmlm.utils.swarm_key import SwarmKey
from swarmlm.errors import RequestError
from swarmlm.transport import framing

PROOF_PREFIX = b"swarmlm-member/1 "
MAX_PROOF_BYTES = 256  # a proof frame longer than this is refused from its header
PROOF_TIMEOUT = 10.0  # seconds a new channel may take to show its proof
NOT_A_MEMBER = "not a member of this private swarm (no valid swarm key proof; see --swarm-key)"


def proof_request(key: SwarmKey, caller: str, callee: str) -> runtime_pb2.ExpertRequest:
    """The proof frame `caller` sends `callee`."""
    return runtime_pb2.ExpertRequest(metadata=PROOF_PREFIX + key.member_proof(caller, callee))


def refusal(key: SwarmKey, request: Optional[runtime_pb2.ExpertRequest], caller: str, callee: str) -> Optional[str]:
    """None if `request` is `caller`'s valid proof frame for `callee`, else why the caller is refused."""
    metadata = request.metadata if request is not None else b""
    if not metadata.startswith(PROOF_PREFIX) or not key.valid_member_proof(caller, callee, metadata[len(PROOF_PREFIX):]):
        return NOT_A_MEMBER
    return None


async def channel_refusal(key: SwarmKey, reader: asyncio.StreamReader, caller: str, callee: str) -> Optional[str]:
    """Reads a channel's first frame, its proof; None if it is valid, else why the caller is refused."""
    try:
        async with asyncio.timeout(PROOF_TIMEOUT):
            request = await framing.read_message(reader, runtime_pb2.ExpertRequest, MAX_PROOF_BYTES)
    except (RequestError, TimeoutError):
        request = None
    return refusal(key, request, caller, callee)
