"""Pure Standard Webhooks signing (https://www.standardwebhooks.com/).

The signed content is `{webhook-id}.{webhook-timestamp}.{body}`, HMAC-SHA256, base64, sent as
`webhook-signature: v1,<signature>`. A secret of the form `whsec_<base64>` is decoded as the spec
says; any other string is used as raw bytes, so existing shared secrets keep working.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

PREFIX = "whsec_"


def secret_key(secret: str) -> bytes:
    if secret.startswith(PREFIX):
        try:
            return base64.b64decode(secret[len(PREFIX) :], validate=True)
        except binascii.Error as exc:
            raise ValueError(
                "a secret starting with 'whsec_' must be followed by base64; "
                "drop the prefix to use the text as the key"
            ) from exc
    return secret.encode()


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    content = b"%s.%d.%s" % (msg_id.encode(), timestamp, body)
    digest = hmac.new(key, content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(key: bytes, msg_id: str, timestamp: int, body: bytes, header: str) -> bool:
    """True if any `v1,` signature in the (space-separated) header matches."""
    expected = sign(key, msg_id, timestamp, body)
    return any(hmac.compare_digest(expected, candidate) for candidate in header.split())
