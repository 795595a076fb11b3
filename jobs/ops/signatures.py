"""The webhook's signature: HMAC-SHA256 of the timestamp and the body, keyed by WEBHOOK_SECRET.
The intake checks it; the bench (and any sender) signs with it."""

from __future__ import annotations

import hashlib
import hmac


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The `X-Oncelery-Signature` value for a body sent at `timestamp`."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={digest.hexdigest()}"
