"""Standard Webhooks signatures (https://www.standardwebhooks.com/, "Signature scheme").

``webhook-signature`` is ``v1,<base64 HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}">``
keyed with the base64-decoded part of a ``whsec_`` secret; with several active secrets (a rotation's
overlap window) the header carries one space-separated signature per secret, current first.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence

from shared.webhook_secrets import secret_bytes


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,<signature>`` for ``body`` sent as message ``webhook_id`` at ``timestamp`` (epoch s)."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_bytes(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def webhook_headers(webhook_id: str, timestamp: int, body: bytes, secrets: Sequence[str]) -> dict[str, str]:
    """The headers of one delivery attempt: id, timestamp, signatures and the JSON content type."""
    if not secrets:
        raise ValueError("a webhook needs at least one signing secret")
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(sign(secret, webhook_id, timestamp, body) for secret in secrets),
        "content-type": "application/json",
    }
