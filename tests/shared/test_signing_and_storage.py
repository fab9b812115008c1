"""File tokens, local storage and S3 storage (against moto's S3 server over HTTP)."""

from __future__ import annotations

import time
from pathlib import Path

import boto3
import pytest
import redis
import requests

from shared.signing import file_signing_secret, sign_file_token, verify_file_token
from shared.storage import LocalStorage, S3Storage, StorageError, open_storage


def test_token_grants_its_key_until_it_expires() -> None:
    token = sign_file_token("a/b.png", int(time.time()) + 60, b"k")
    assert verify_file_token(token, b"k") == "a/b.png"
    assert verify_file_token(token, b"other") is None
    assert verify_file_token(token, b"k", now=time.time() + 120) is None


def test_signing_secret_is_created_once_and_shared(redis_client: redis.Redis) -> None:
    first = file_signing_secret(None, redis_client)
    assert file_signing_secret(None, redis_client) == first and len(first) == 64
    assert file_signing_secret("configured", redis_client) == b"configured"


def test_local_storage_writes_reads_and_refuses_escaping_keys(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path, "http://h", b"k")
    storage.put("job/1/0.webp", b"img", "image/webp")
    assert storage.read("job/1/0.webp") == (b"img", "image/webp")
    assert storage.read("job/1/9.png") is None
    with pytest.raises(StorageError):
        storage.put("../outside.png", b"x", "image/png")
    assert storage.url("job/1/0.webp", 60).startswith("http://h/v1/files/")


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def test_s3_storage_uploads_and_presigns_a_downloadable_url(s3_endpoint: str, aws_env: None) -> None:
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="results")
    storage = open_storage("s3://results/fluxgate", "http://unused", b"k", s3_endpoint)
    assert isinstance(storage, S3Storage)
    storage.check()
    storage.put("job/1/0.png", b"png-bytes", "image/png")
    response = requests.get(storage.url("job/1/0.png", 60), timeout=10)
    assert response.status_code == 200 and response.content == b"png-bytes"
    assert response.headers["content-type"] == "image/png"


def test_s3_missing_bucket_is_a_clear_storage_error(s3_endpoint: str, aws_env: None) -> None:
    storage = open_storage("s3://no-such-bucket", "http://unused", b"k", s3_endpoint)
    with pytest.raises(StorageError, match=r"no-such-bucket.*does not exist"):
        storage.put("job/1/0.png", b"x", "image/png")
    with pytest.raises(StorageError, match="does not exist"):
        storage.check()
