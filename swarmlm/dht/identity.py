"""A node's identity: one RSA key that is both its libp2p identity (so its peer id) and its DHT signing key.

Because the key that signs a DHT record is the key the peer id is derived from, anyone can check that a
record speaking for peer P was written by P: `owner_peer_id(subkey)` derives the peer id from the public
key in a signed subkey, offline, without asking P. (hivemind's own default signs with a process-wide key
unrelated to the peer id, which lets any node write records about any peer.)
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Optional

import base58
import multihash
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey

from swarmlm.errors import IdentityError

_OWNER_RE = re.compile(re.escape(RSASignatureValidator.PUBLIC_KEY_FORMAT).replace(b"_key_", rb"(.+?)"))
MAX_PUBLIC_KEY_BYTES = 1024  # an OpenSSH RSA-2048 public key is ~380 bytes; RSA-4096 ~720


@dataclass(frozen=True)
class NodeIdentity:
    private_key: RSAPrivateKey
    path: str  # the libp2p identity file the node's p2p daemon reads
    generated: bool  # True: a fresh key nobody else can hold (no need to check that it is free)
    peer_id: str  # base58, derived from the key

    @functools.cached_property
    def signer(self) -> RSASignatureValidator:
        """The DHT validator that signs this node's records (and checks everyone's signatures)."""
        return RSASignatureValidator(self.private_key)

    @property
    def owner_marker(self) -> bytes:
        """The "[owner:...]" marker that makes a subkey this node's own (only it can sign values under it)."""
        return self.signer.local_public_key

    @classmethod
    def load_or_create(cls, path: Optional[str] = None, directory: Optional[str] = None) -> "NodeIdentity":
        """Loads the identity at `path`, or creates it there (`path` None: in a private temporary file)."""
        generated = path is None or not os.path.exists(path)
        if path is None:
            handle, path = tempfile.mkstemp(prefix="swarmlm-identity-", dir=directory)
            os.close(handle)
            os.unlink(path)
        if generated:
            _write_new_key(path)
        key = _load_private_key(path)
        return cls(key, path, generated, peer_id_of_public_key(key.get_public_key().to_bytes()))

    def discard_file(self) -> None:
        """Removes a generated temporary identity file once the p2p daemon has read it."""
        if self.generated and os.path.basename(self.path).startswith("swarmlm-identity-"):
            try:
                os.chmod(self.path, 0o600)
                os.unlink(self.path)
            except OSError:
                pass


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _write_new_key(path: str) -> None:
    """A fresh RSA key in libp2p's identity file format (what the p2p daemon's -id flag reads), owner-read-only."""
    message = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=RSAPrivateKey().to_bytes())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    with os.fdopen(fd, "wb") as f:
        f.write(message.SerializeToString())


def _load_private_key(path: str) -> RSAPrivateKey:
    try:
        message = crypto_pb2.PrivateKey.FromString(_read(path))
    except Exception as e:
        raise IdentityError(f"{path} is not a libp2p private key file: {e}") from None
    if message.key_type != crypto_pb2.KeyType.RSA:
        raise IdentityError(f"{path} holds a {crypto_pb2.KeyType.Name(message.key_type)} key; swarmlm identities are "
                            f"RSA keys (so the peer id is derived from the key that signs its DHT records): "
                            f"give a new path and one is generated")
    try:
        key = serialization.load_der_private_key(message.data, password=None)
    except Exception as e:
        raise IdentityError(f"{path}: unreadable RSA key: {e}") from None
    wrapped = RSAPrivateKey.__new__(RSAPrivateKey)
    wrapped._private_key = key
    return wrapped


@functools.lru_cache(maxsize=4096)
def peer_id_of_public_key(openssh_key: bytes) -> Optional[str]:
    """The base58 libp2p peer id of an OpenSSH-encoded RSA public key (None if it is not one)."""
    if len(openssh_key) > MAX_PUBLIC_KEY_BYTES:
        return None
    try:
        key = serialization.load_ssh_public_key(openssh_key)
    except Exception:
        return None
    if not isinstance(key, rsa.RSAPublicKey):
        return None
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    digest = multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256"))
    return base58.b58encode(digest).decode()


def owner_peer_id(subkey: bytes) -> Optional[str]:
    """The peer id of the one owner named in a signed subkey; None without exactly one valid owner marker."""
    keys = _OWNER_RE.findall(subkey)
    if len(keys) != 1:
        return None
    return peer_id_of_public_key(keys[0])
