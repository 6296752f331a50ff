"""Our signatures verify with the reference Standard Webhooks library, and only untampered."""

from __future__ import annotations

import time

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from callbacks.signing import InvalidWebhookSecret, WebhookSigner, generate_secret


def test_a_signed_body_verifies_with_the_standard_webhooks_library() -> None:
    secret = generate_secret()
    body = b'{"type":"job.succeeded"}'
    headers = WebhookSigner(secret).headers("msg_1", int(time.time()), body)

    assert Webhook(secret).verify(body, headers) == {"type": "job.succeeded"}
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body + b" ", headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(generate_secret()).verify(body, headers)


@pytest.mark.parametrize("secret", ["", "plain", "whsec_***", "whsec_c2hvcnQ="])
def test_a_malformed_secret_is_refused(secret: str) -> None:
    with pytest.raises(InvalidWebhookSecret):
        WebhookSigner(secret)


def test_the_secret_never_appears_in_a_repr() -> None:
    secret = generate_secret()
    assert secret.removeprefix("whsec_") not in repr(WebhookSigner(secret))


def test_given_two_secrets_then_receivers_holding_either_one_verify_and_a_third_does_not() -> None:
    old, new = generate_secret(), generate_secret()
    body = b'{"type":"job.failed"}'
    headers = WebhookSigner(f"{new} {old}").headers("msg_2", int(time.time()), body)

    assert len(headers["webhook-signature"].split(" ")) == 2
    assert Webhook(old).verify(body, headers) == {"type": "job.failed"}
    assert Webhook(new).verify(body, headers) == {"type": "job.failed"}
    with pytest.raises(WebhookVerificationError):
        Webhook(generate_secret()).verify(body, headers)


def test_given_one_bad_secret_among_good_ones_then_the_error_names_its_position() -> None:
    with pytest.raises(InvalidWebhookSecret, match="secret 2 of WEBHOOK_SECRET"):
        WebhookSigner(f"{generate_secret()} whsec_c2hvcnQ=")
