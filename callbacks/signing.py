"""Standard Webhooks signatures, made by the `standardwebhooks` reference library:
`webhook-signature: v1,<base64 HMAC-SHA256(id.timestamp.body)>`.

Key rotation: WEBHOOK_SECRET may hold several space-separated `whsec_<base64>` secrets.
Every delivery carries one signature per secret (the spec allows several, space-separated,
and a receiver accepts any one that verifies), so a receiver can move to the new secret
before the old one is dropped. We check the secrets' form ourselves, strictly, because
the library decodes whatever it is given (padding added, no length check).
"""

from __future__ import annotations

import base64
import binascii
import secrets
from datetime import UTC, datetime

from standardwebhooks.webhooks import Webhook

SECRET_PREFIX = "whsec_"
MIN_KEY_BYTES = 16


class InvalidWebhookSecret(ValueError):
    """WEBHOOK_SECRET is not one or more space-separated `whsec_<base64>` secrets."""


def generate_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def parse_secrets(value: str) -> tuple[bytes, ...]:
    """The keys of a space-separated list of `whsec_<base64>` secrets, in order."""
    keys = tuple(_key(secret, position) for position, secret in enumerate(value.split(), start=1))
    if not keys:
        raise InvalidWebhookSecret("WEBHOOK_SECRET is empty; expected whsec_<base64>")
    return keys


def _key(secret: str, position: int) -> bytes:
    if not secret.startswith(SECRET_PREFIX):
        raise InvalidWebhookSecret(f"secret {position} of WEBHOOK_SECRET must look like whsec_<base64>")
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except binascii.Error as exc:
        raise InvalidWebhookSecret(f"secret {position} of WEBHOOK_SECRET is not base64 after whsec_") from exc
    if len(key) < MIN_KEY_BYTES:
        raise InvalidWebhookSecret(
            f"secret {position} of WEBHOOK_SECRET holds {len(key)} bytes of key; at least {MIN_KEY_BYTES}"
        )
    return key


class WebhookSigner:
    def __init__(self, secret: str) -> None:
        self._webhooks = [Webhook(key) for key in parse_secrets(secret)]

    def __repr__(self) -> str:
        return f"WebhookSigner(secrets={len(self._webhooks)}, ***)"

    def headers(self, webhook_id: str, timestamp_s: int, body: bytes) -> dict[str, str]:
        signed_at = datetime.fromtimestamp(timestamp_s, UTC)
        data = body.decode()  # the library signs text; our bodies are UTF-8 JSON
        return {
            "webhook-id": webhook_id,
            "webhook-timestamp": str(timestamp_s),
            "webhook-signature": " ".join(w.sign(webhook_id, signed_at, data) for w in self._webhooks),
        }
