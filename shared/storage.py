"""Result storage: local disk (``file://``, served by the signed file route) or S3-compatible (``s3://``)."""

from __future__ import annotations

import mimetypes
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from shared.signing import sign_file_token


class StorageError(Exception):
    """Storage refused or could not be reached; the message is safe to show to users."""


class Storage(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> None: ...

    def get(self, key: str) -> bytes: ...

    def delete(self, keys: list[str]) -> None: ...

    def url(self, key: str, expires_in: int) -> str: ...

    def check(self) -> None: ...


class LocalStorage:
    """Files under a directory; links go through ``GET /v1/files/{token}``."""

    def __init__(self, root: Path, public_base_url: str, secret: bytes) -> None:
        self.root = root.resolve()
        self.public_base_url = public_base_url.rstrip("/")
        self.secret = secret

    def path(self, key: str) -> Path:
        """The file of ``key``; refuses keys that would leave the root."""
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise StorageError(f"storage key {key!r} leaves the storage root")
        return path

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self.path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename, so that a reader never sees half a file.
            with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as handle:
                handle.write(data)
            os.replace(handle.name, path)
        except OSError as error:
            raise StorageError(f"could not write {key} to local storage: {error.strerror}") from error

    def delete(self, keys: list[str]) -> None:
        """Remove ``keys`` (missing ones are fine: deleting is idempotent)."""
        for key in keys:
            path = self.path(key)
            try:
                path.unlink(missing_ok=True)
            except OSError as error:
                raise StorageError(f"could not delete {key} from local storage: {error.strerror}") from error
            self._remove_empty_parents(path.parent)

    def _remove_empty_parents(self, directory: Path) -> None:
        while directory != self.root and directory.is_relative_to(self.root):
            try:
                directory.rmdir()  # only succeeds when empty
            except OSError:
                return
            directory = directory.parent

    def get(self, key: str) -> bytes:
        """The bytes stored under ``key``; StorageError when it is missing or unreadable."""
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"{key} is not in local storage") from None
        except OSError as error:
            raise StorageError(f"could not read {key} from local storage: {error.strerror}") from error

    def url(self, key: str, expires_in: int) -> str:
        token = sign_file_token(key, int(time.time()) + expires_in, self.secret)
        return f"{self.public_base_url}/v1/files/{token}"

    def read(self, key: str) -> tuple[bytes, str] | None:
        """The bytes and content type of ``key``, or None if it is gone (or would leave the root)."""
        try:
            data = self.get(key)
        except StorageError:
            return None
        return data, mimetypes.guess_type(key)[0] or "application/octet-stream"

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StorageError(f"local storage {self.root} is not writable: {error.strerror}") from error
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"local storage {self.root} is not writable")


class S3Storage:
    """An S3-compatible bucket (AWS, MinIO, moto); links are presigned GET URLs."""

    def __init__(self, bucket: str, prefix: str, client: Any) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, content_type: str) -> None:
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type
            )
        except Exception as error:
            raise StorageError(_describe_s3_error(error, self.bucket)) from error

    def delete(self, keys: list[str]) -> None:
        """Remove ``keys`` in batches of 1000 (S3's limit); missing objects are fine."""
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self._key(key)} for key in keys[start : start + 1000]]
            try:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            except Exception as error:
                raise StorageError(_describe_s3_error(error, self.bucket)) from error

    def get(self, key: str) -> bytes:
        """The object's bytes; StorageError (with the S3 reason) when missing or unreachable."""
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            return bytes(body.read())
        except Exception as error:
            raise StorageError(_describe_s3_error(error, self.bucket, key)) from error

    def url(self, key: str, expires_in: int) -> str:
        params = {"Bucket": self.bucket, "Key": self._key(key)}
        return str(self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_in))

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as error:
            raise StorageError(_describe_s3_error(error, self.bucket)) from error


def _describe_s3_error(error: Exception, bucket: str, key: str | None = None) -> str:
    response = getattr(error, "response", None)
    code = str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
    if key is not None and code in {"NoSuchKey", "404"}:
        return f"{key} is not in S3 bucket {bucket!r}"
    if code in {"NoSuchBucket", "404"}:
        return f"S3 bucket {bucket!r} does not exist"
    if code in {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
        return f"S3 refused access to bucket {bucket!r} ({code})"
    if code:
        return f"S3 error on bucket {bucket!r}: {code}"
    return f"S3 unreachable for bucket {bucket!r}: {type(error).__name__}"


def open_storage(storage_url: str, public_base_url: str, secret: bytes, endpoint_url: str | None) -> Storage:
    """The storage named by ``FLUXGATE_STORAGE_URL``."""
    parsed = urlparse(storage_url)
    if parsed.scheme == "file":
        return LocalStorage(Path(parsed.path), public_base_url, secret)
    if parsed.scheme == "s3" and parsed.netloc:
        import boto3
        from botocore.config import Config

        config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=30)
        client = boto3.client("s3", endpoint_url=endpoint_url, config=config)
        return S3Storage(parsed.netloc, parsed.path, client)
    raise ValueError(f"FLUXGATE_STORAGE_URL {storage_url!r}: expected file:///path or s3://bucket/prefix")
