"""Canonical JSON for signed commands, and the ed25519 signature over it.

The canonical form of a command body is: the JSON object without its "sig" member,
keys sorted by code point at every level, no whitespace (separators "," and ":"),
non-ASCII characters written as themselves, encoded as UTF-8; NaN and infinities are
not allowed. "sig" is the standard base64 (with padding) of the 64-byte ed25519
signature over those bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.protocol.messages import Code
from agent.signing import key_id

SIG_FIELD = "sig"


class SignatureError(Exception):
    """A body that carries no signature, or one no trusted key made."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def canonical_json(body: Mapping[str, Any]) -> bytes:
    """The bytes that are signed: see the module docstring. Raises ValueError on NaN."""
    unsigned = {k: v for k, v in body.items() if k != SIG_FIELD}
    text = json.dumps(
        unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8")


def sign_body(body: Mapping[str, Any], private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """A copy of `body` with "sig" set (any old signature replaced)."""
    signature = private_key.sign(canonical_json(body))
    return {**{k: v for k, v in body.items() if k != SIG_FIELD}, SIG_FIELD: _b64(signature)}


def verify_body(body: Mapping[str, Any], keys: Iterable[Ed25519PublicKey]) -> str:
    """Return the key id of the trusted key that signed `body`, or raise SignatureError."""
    sig = body.get(SIG_FIELD)
    if sig is None:
        raise SignatureError(Code.UNSIGNED, 'command carries no "sig" and signatures are required')
    if not isinstance(sig, str):
        raise SignatureError(Code.BAD_SIGNATURE, '"sig" must be a base64 string')
    try:
        raw = base64.b64decode(sig.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise SignatureError(Code.BAD_SIGNATURE, f'"sig" is not base64: {exc}') from exc
    if len(raw) != 64:
        raise SignatureError(
            Code.BAD_SIGNATURE, f'"sig" decodes to {len(raw)} bytes; ed25519 needs 64'
        )
    try:
        data = canonical_json(body)
    except (ValueError, TypeError) as exc:
        raise SignatureError(Code.BAD_SIGNATURE, f"body has no canonical form: {exc}") from exc
    for key in keys:
        try:
            key.verify(raw, data)
        except InvalidSignature:
            continue
        return key_id(key)
    raise SignatureError(Code.BAD_SIGNATURE, "signature is not by any trusted console key")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
