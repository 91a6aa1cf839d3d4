"""Ed25519 identities (NATS nkeys seeds) and envelope signatures.

A publisher signs the exact encoded envelope bytes; the signature and the
signer's public key travel in message headers, so verification never
re-encodes anything.
"""

from __future__ import annotations

import base64
import functools
import os
from pathlib import Path

import nacl.exceptions
import nacl.signing
import nkeys

ISSUER_HEADER = "Tg-Issuer"
SIGNATURE_HEADER = "Tg-Sig"


class Identity:
    """A signing identity: an nkeys user seed and its public key."""

    def __init__(self, seed: bytes):
        self._keys = nkeys.from_seed(bytearray(seed))
        self.public_key: str = self._keys.public_key.decode()

    @classmethod
    def generate(cls) -> "Identity":
        return cls(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))

    @classmethod
    def load_or_create(cls, path: Path) -> "Identity":
        """Load the seed at ``path``, creating it (mode 0600) on first use."""
        if not path.exists():
            write_private(path, nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))
        return cls(path.read_bytes().strip())

    def sign(self, data: bytes) -> str:
        """Return the URL-safe base64 Ed25519 signature of ``data``."""
        return base64.urlsafe_b64encode(self._keys.sign(data)).decode()

    def headers(self, data: bytes) -> dict[str, str]:
        """The signature headers for a message whose payload is ``data``."""
        return {ISSUER_HEADER: self.public_key, SIGNATURE_HEADER: self.sign(data)}


def write_private(path: Path, data: bytes) -> None:
    """Write a secret so that it is never readable by others, not even for a moment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


@functools.lru_cache(maxsize=4096)
def _verify_key(public_key: str) -> nacl.signing.VerifyKey:
    raw = base64.b32decode(public_key + "=" * (-len(public_key) % 8))
    if len(raw) != 35 or raw[0] != nkeys.PREFIX_BYTE_USER:
        raise ValueError("not an nkeys user public key")
    if nkeys.crc16(bytearray(raw[:-2])) != int.from_bytes(raw[-2:], "little"):
        raise ValueError("bad public key checksum")
    return nacl.signing.VerifyKey(raw[1:33])


def signature_valid(public_key: str, data: bytes, signature: str) -> bool:
    """True when ``signature`` is ``public_key``'s signature of exactly ``data``."""
    try:
        _verify_key(public_key).verify(data, base64.urlsafe_b64decode(signature))
        return True
    except (ValueError, TypeError, nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError):
        return False
