"""Private swarms: every member holds one shared secret, the swarm key; a node without it is refused everywhere.

The key file has the layout of a libp2p swarm key (`swarmlm swarm-key FILE` writes a new one, readable by its
owner only):

    /key/swarm/psk/1.0.0/
    /base16/
    <64 hex digits: 32 random bytes>

The key is never sent. Members prove they hold it with HMAC-SHA256 tags:
- DHT (swarmlm.dht.authorizer, plugged into hivemind's DHT protocol as its authorizer): every ping, store and
  find request carries a tag over the request (its time and a fresh nonce included), and every answer a tag over
  the answer and the request's nonce. A node refuses requests without a valid tag, or older than MAX_CLOCK_SKEW, or
  replayed, and drops answers without one; so a stranger can neither join the routing tables nor read or write
  records, and a member does not take a stranger's routing answers.
- swarmlm's own RPCs (swarmlm.transport.membership): each channel and call starts with `member_proof(caller,
  callee)`, a tag over both peer ids; libp2p proves the caller's id, so a proof is worth nothing to anyone else.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path
from typing import Optional

from swarmlm.errors import SwarmKeyError

HEADER = "/key/swarm/psk/1.0.0/\n/base16/\n"
KEY_BYTES = 32
MAX_CLOCK_SKEW = 60.0  # seconds a DHT request's time may differ from ours
_KEY_PATTERN = re.compile(r"^/key/swarm/psk/1\.0\.0/\r?\n/base16/\r?\n([0-9a-fA-F]{64})\s*$")


class SwarmKey:
    """The secret of one private swarm."""

    def __init__(self, secret: bytes):
        if len(secret) != KEY_BYTES:
            raise SwarmKeyError(f"a swarm key has {KEY_BYTES} bytes, got {len(secret)}")
        self._secret = secret

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SwarmKey":
        """Reads a swarm key file; SwarmKeyError (what is wrong, and how to make one) if it is none."""
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise SwarmKeyError(f"cannot read the swarm key {path}: {e}") from None
        match = _KEY_PATTERN.match(text)
        if match is None:
            raise SwarmKeyError(f"{path} is not a swarm key file (expected the lines /key/swarm/psk/1.0.0/, /base16/ "
                                f"and 64 hex digits; `swarmlm swarm-key FILE` writes a new one)")
        return cls(bytes.fromhex(match.group(1)))

    @classmethod
    def generate(cls, path: str | os.PathLike) -> "SwarmKey":
        """Writes a new random key to `path` (mode 0600); SwarmKeyError if the file exists (a key in use is never
        replaced by accident)."""
        key = cls(secrets.token_bytes(KEY_BYTES))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise SwarmKeyError(f"{path} exists; a swarm key is not overwritten (remove it first)") from None
        except OSError as e:
            raise SwarmKeyError(f"cannot write the swarm key {path}: {e}") from None
        with os.fdopen(fd, "w") as file:
            file.write(HEADER + key._secret.hex() + "\n")
        return key

    @property
    def fingerprint(self) -> str:
        """A short public name of the key (to tell swarms apart in logs; reveals nothing of the secret)."""
        return hashlib.sha256(b"swarmlm-swarm-key-fingerprint\0" + self._secret).hexdigest()[:12]

    def tag(self, *parts: bytes) -> bytes:
        """HMAC-SHA256 over `parts` (each length-prefixed, so no two sequences of parts share a tag)."""
        mac = hmac.new(self._secret, digestmod=hashlib.sha256)
        for part in parts:
            mac.update(len(part).to_bytes(8, "big"))
            mac.update(part)
        return mac.digest()

    def member_proof(self, caller: str, callee: str) -> bytes:
        """What `caller` shows `callee` (both peer ids) to prove it is a member."""
        return self.tag(b"swarmlm-member", caller.encode(), callee.encode())

    def valid_member_proof(self, caller: str, callee: str, proof: bytes) -> bool:
        return hmac.compare_digest(self.member_proof(caller, callee), proof)


def load_swarm_key(path: Optional[str]) -> Optional[SwarmKey]:
    """The key at `path`, or None for a public swarm (no path)."""
    return SwarmKey.load(path) if path else None
