"""The exception hierarchy of swarmlm, drawn once.

SwarmError
├── ModelNotFoundError       a model name/path that resolves to nothing on this machine
├── UnsupportedModelError    a model family without an adapter
├── RequestError             a peer refused a request as invalid (bad shapes, dtypes, blocks...)
│   ├── CacheBudgetError     a peer has no room for the session's KV cache ("busy")
│   └── LimitError           a peer's limit on connections or streams is reached ("busy")
├── MissingBlocksError       no peer in the swarm serves some blocks the client needs
├── RemotePeerError          a call to a peer failed (network, peer died, remote error)
├── ExportError              `swarmlm export`: the swarm cannot provide every block of the model
├── TrainingDataError        the training data cannot be used (missing files, too small, ...)
├── TrainingDivergedError    a trainer's loss became NaN or infinite
├── CheckpointError          a save would delete files it did not write (nothing was changed)
├── IdentityError            an identity file that is not a libp2p RSA private key (also a ValueError)
├── WrongOutputError         a peer's output was caught wrong: it is banned, the session rolled back
├── VerificationError        outputs could not be verified (peers disagree and nothing can tell who is right)
├── ChannelClosedError       a message was sent into a closed channel (also a ConnectionError)
└── RefusedError             a node's admission hook refused a caller (also a PermissionError)
"""

from __future__ import annotations


class SwarmError(Exception):
    """Base class of all errors raised by swarmlm."""


class ModelNotFoundError(SwarmError):
    pass


class UnsupportedModelError(SwarmError):
    pass


class RequestError(SwarmError):
    """Raised by a peer when a request is invalid; the message is sent back to the caller."""

    code = "bad_request"


class CacheBudgetError(RequestError):
    """Raised by a peer that cannot reserve KV-cache tokens for a new session."""

    code = "busy"


class LimitError(RequestError):
    """Raised by a peer whose limit on open connections or streams (per source or in total) is reached."""

    code = "busy"


class MissingBlocksError(SwarmError):
    def __init__(self, model: str, missing: list[tuple[int, int]], hint: str = ""):
        self.model, self.missing = model, missing
        spans = ", ".join(f"{a}:{b}" for a, b in missing) or "(a route: every peer that could serve it is left out)"
        message = f"no peer serves blocks {spans} of model {model}"
        if missing:
            first_start, first_end = missing[0]
            message += (f"; start one with: swarmlm peer --model {hint or model} --blocks {first_start}:{first_end} "
                        f"--initial-peers <MADDR>")
        super().__init__(message)


class RemotePeerError(SwarmError):
    """A call to a remote peer failed. `code` is the peer's error code when it answered with one; `wrong_output`:
    the peer answered, with numbers no honest peer gives (NaN, infinite)."""

    def __init__(self, peer: str, message: str, code: str | None = None, wrong_output: bool = False):
        self.peer, self.code, self.wrong_output = peer, code, wrong_output
        super().__init__(f"peer {peer}: {message}")


class ExportError(SwarmError):
    """The swarm cannot provide every block of the model (the message lists what is missing)."""


class TrainingDataError(SwarmError):
    """The training data cannot be used (missing files, too small, an optional package not installed)."""


class TrainingDivergedError(SwarmError):
    """The training loss became NaN or infinite."""


class ChannelClosedError(SwarmError, ConnectionError):
    """A message was sent into a channel (swarmlm.transport.Channel) that is closed or closing."""


class RefusedError(SwarmError, PermissionError):
    """A node's admission hook (swarmlm.transport.Server.admit) refused the caller; the message says why."""


class CheckpointError(SwarmError):
    """A checkpoint save would delete files it did not write; nothing was changed (see save_checkpoint)."""


class IdentityError(SwarmError, ValueError):
    """An identity file that cannot be used: swarmlm identities are libp2p RSA private keys (see dht.identity)."""


class JoinError(SwarmError):
    """A node could not join the swarm: no initial peer answered (down, unreachable, or another private swarm)."""


class SwarmKeyError(SwarmError, ValueError):
    """A swarm key file that cannot be used (see dht.swarm_key)."""


class WrongOutputError(SwarmError):
    """A peer answered well-shaped wrong numbers and verification caught it (client.verification). The peer is
    banned for this client and the session has rolled back to `position` tokens; generate() reruns from there."""

    def __init__(self, peer: str, blocks: tuple[int, int], position: int, error: float):
        self.peer, self.blocks, self.position, self.error = peer, blocks, position, error
        super().__init__(f"peer {peer} answered wrong hidden states for blocks {blocks[0]}:{blocks[1]} at token "
                         f"{position} (relative error {error:.3g}); it is banned for this client")


class VerificationError(SwarmError):
    """Outputs could not be verified: peers disagree and no third computation (another replica, local blocks)
    can tell which one is right, or verification is required and no independent computation exists."""
