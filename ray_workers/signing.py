"""Standard Webhooks signatures: `v1,<base64 HMAC-SHA256(id.timestamp.body)>`.

The secret has the `whsec_<base64>` form; the key is the decoded bytes. Any Standard
Webhooks library verifies what this produces.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

SECRET_PREFIX = "whsec_"


class InvalidWebhookSecret(ValueError):
    """WEBHOOK_SECRET is not `whsec_<base64>`."""


def generate_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


class WebhookSigner:
    def __init__(self, secret: str) -> None:
        if not secret.startswith(SECRET_PREFIX):
            raise InvalidWebhookSecret("WEBHOOK_SECRET must look like whsec_<base64>")
        try:
            self._key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
        except binascii.Error as exc:
            raise InvalidWebhookSecret("WEBHOOK_SECRET's part after whsec_ is not base64") from exc
        if len(self._key) < 16:
            raise InvalidWebhookSecret("WEBHOOK_SECRET must hold at least 16 bytes of key")

    def __repr__(self) -> str:
        return "WebhookSigner(secret=***)"

    def headers(self, webhook_id: str, timestamp_s: int, body: bytes) -> dict[str, str]:
        signed = f"{webhook_id}.{timestamp_s}.".encode() + body
        digest = hmac.new(self._key, signed, hashlib.sha256).digest()
        return {
            "webhook-id": webhook_id,
            "webhook-timestamp": str(timestamp_s),
            "webhook-signature": "v1," + base64.b64encode(digest).decode(),
        }
