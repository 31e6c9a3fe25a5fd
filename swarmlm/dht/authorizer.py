"""hivemind's DHT authorizer for a private swarm: requests and answers carry swarm key tags
(swarmlm.utils.swarm_key says what they prove)."""

from __future__ import annotations

import hmac
import secrets
import threading
import time

from hivemind.utils.auth import AuthorizerBase
from hivemind.utils.timed_storage import get_dht_time

from swarmlm.utils.swarm_key import MAX_CLOCK_SKEW, SwarmKey


class SwarmKeyAuthorizer(AuthorizerBase):
    """Tags every DHT request and answer with the swarm key; refuses untagged, stale (MAX_CLOCK_SKEW) or replayed
    requests and untagged answers. Runs in the DHT's process."""

    REPLAY_WINDOW = 3 * MAX_CLOCK_SKEW  # seconds a nonce is remembered

    def __init__(self, key: SwarmKey):
        self.key = key
        self._nonces: dict[bytes, float] = {}  # nonce -> when it may be forgotten
        self._sweep_at = 4096  # entries at which expired nonces are swept out (then twice what is left)
        self._lock = threading.Lock()

    async def sign_request(self, request, service_public_key) -> None:
        auth = request.auth
        auth.time = get_dht_time()
        auth.nonce = secrets.token_bytes(16)
        auth.signature = b""
        auth.signature = self.key.tag(b"dht-request", request.SerializeToString())

    async def validate_request(self, request) -> bool:
        auth = request.auth
        signature, auth.signature = auth.signature, b""
        if not hmac.compare_digest(self.key.tag(b"dht-request", request.SerializeToString()), signature):
            return False
        if abs(auth.time - get_dht_time()) > MAX_CLOCK_SKEW or len(auth.nonce) < 16:
            return False
        return self._first_use(auth.nonce)

    async def sign_response(self, response, request) -> None:
        auth = response.auth
        auth.nonce = request.auth.nonce
        auth.signature = b""
        auth.signature = self.key.tag(b"dht-response", response.SerializeToString())

    async def validate_response(self, response, request) -> bool:
        auth = response.auth
        signature, auth.signature = auth.signature, b""
        if not hmac.compare_digest(self.key.tag(b"dht-response", response.SerializeToString()), signature):
            return False
        return auth.nonce == request.auth.nonce

    def _first_use(self, nonce: bytes) -> bool:
        """Whether `nonce` was not seen within REPLAY_WINDOW (and remembers it)."""
        now = time.monotonic()
        with self._lock:
            if len(self._nonces) >= self._sweep_at:
                self._nonces = {n: until for n, until in self._nonces.items() if until > now}
                self._sweep_at = max(4096, 2 * len(self._nonces))
            if self._nonces.get(nonce, 0.0) > now:
                return False
            self._nonces[nonce] = now + self.REPLAY_WINDOW
            return True

