"""Webhook secrets, rotation and Standard Webhooks signatures (verified with `standardwebhooks`)."""

from __future__ import annotations

import base64
import json
import time

import pytest
import redis
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from shared.webhook_secrets import SECRET_PREFIX, WebhookSecrets, secret_bytes
from shared.webhook_signing import sign, webhook_headers


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(redis_client: redis.Redis, clock: Clock) -> WebhookSecrets:
    return WebhookSecrets(redis_client, overlap_s=3600, clock=clock)


BODY = json.dumps({"type": "job.succeeded", "timestamp": "2026-11-25T21:00:00.000Z", "data": {"id": "job_1"}})


def signed(secrets: list[str], webhook_id: str = "evt_job_1_1-0") -> tuple[bytes, dict[str, str]]:
    body = BODY.encode()
    return body, webhook_headers(webhook_id, int(time.time()), body, secrets)


def test_a_secret_is_created_on_first_use_and_then_stable(store: WebhookSecrets) -> None:
    key = store.current("alice")
    assert key.startswith(SECRET_PREFIX)
    assert len(secret_bytes(key)) == 32
    assert store.current("alice") == key
    assert store.current("bob") != key
    assert store.signing_secrets("alice") == [key]


def test_a_signature_verifies_with_standardwebhooks(store: WebhookSecrets) -> None:
    key = store.current("alice")
    body, headers = signed([key])
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature", "content-type"}
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(key).verify(body, headers)["data"] == {"id": "job_1"}
    with pytest.raises(WebhookVerificationError):
        Webhook(store.current("bob")).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(key).verify(body + b" ", headers)


def test_the_signature_is_hmac_sha256_over_id_timestamp_and_body() -> None:
    import hashlib
    import hmac

    key = SECRET_PREFIX + base64.b64encode(b"k" * 32).decode()
    expected = hmac.new(b"k" * 32, b"msg_1.1700000000.{}", hashlib.sha256).digest()
    assert sign(key, "msg_1", 1700000000, b"{}") == "v1," + base64.b64encode(expected).decode()


def test_rotation_signs_with_both_secrets_during_the_overlap(store: WebhookSecrets, clock: Clock) -> None:
    old = store.current("alice")
    rotation = store.rotate("alice")
    assert rotation.key != old and rotation.key.startswith(SECRET_PREFIX)
    assert rotation.previous_valid_until is not None
    assert store.current("alice") == rotation.key
    assert store.signing_secrets("alice") == [rotation.key, old]
    body, headers = signed(store.signing_secrets("alice"))
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(old).verify(body, headers)  # receivers not yet switched still verify
    Webhook(rotation.key).verify(body, headers)


def test_after_the_overlap_only_the_new_secret_signs(store: WebhookSecrets, clock: Clock) -> None:
    old = store.current("alice")
    new = store.rotate("alice").key
    clock.now += 3601
    assert store.signing_secrets("alice") == [new]
    body, headers = signed(store.signing_secrets("alice"))
    assert " " not in headers["webhook-signature"]
    Webhook(new).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(body, headers)


def test_a_second_rotation_retires_the_oldest_secret(store: WebhookSecrets) -> None:
    first = store.current("alice")
    second = store.rotate("alice").key
    third = store.rotate("alice").key
    assert store.signing_secrets("alice") == [third, second]
    assert first not in store.signing_secrets("alice")


def test_rotating_before_any_secret_exists_has_no_previous(store: WebhookSecrets) -> None:
    rotation = store.rotate("carol")
    assert rotation.previous_valid_until is None
    assert store.signing_secrets("carol") == [rotation.key]


def test_headers_need_a_secret() -> None:
    with pytest.raises(ValueError):
        webhook_headers("evt", 1, b"{}", [])
