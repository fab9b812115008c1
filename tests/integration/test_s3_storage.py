"""Results on S3-compatible storage (moto's S3 server over HTTP): presigned links, and a missing bucket."""

from __future__ import annotations

import hashlib

import boto3
import httpx

from tests.integration.conftest import Stack


def run(stack: Stack, body: dict[str, object]) -> dict[str, object]:
    with stack.client() as client:
        response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return stack.wait_for_job(response.json()["id"])


def s3(stack: Stack):  # type: ignore[no-untyped-def]
    return boto3.client(
        "s3",
        endpoint_url=stack.env["FLUXGATE_S3_ENDPOINT_URL"],
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    )


def test_images_upload_to_s3_and_download_through_presigned_urls(s3_stack: Stack) -> None:
    job = run(s3_stack, {"prompt": "to the bucket", "seed": 3})
    assert job["status"] == "succeeded", job["error"]
    image = job["result"]["images"][0]  # type: ignore[index]
    assert image["url"].startswith(s3_stack.env["FLUXGATE_S3_ENDPOINT_URL"] + "/fluxgate-it/results/")
    assert "Signature" in image["url"] or "X-Amz-Signature" in image["url"]
    data = httpx.get(image["url"], timeout=10).content
    assert hashlib.sha256(data).hexdigest() == image["sha256"]
    keys = [o["Key"] for o in s3(s3_stack).list_objects_v2(Bucket="fluxgate-it")["Contents"]]
    assert f"results/{job['id']}/1/0.png" in keys


def test_missing_bucket_fails_the_job_with_storage_error(s3_stack: Stack) -> None:
    client = s3(s3_stack)
    for listed in client.list_objects_v2(Bucket="fluxgate-it").get("Contents", []):
        client.delete_object(Bucket="fluxgate-it", Key=listed["Key"])
    client.delete_bucket(Bucket="fluxgate-it")
    try:
        job = run(s3_stack, {"prompt": "nowhere to go"})
        assert job["status"] == "failed" and job["result"] is None
        error = job["error"]
        assert error["code"] == "storage_error"  # type: ignore[index]
        assert "fluxgate-it" in error["message"] and "does not exist" in error["message"]  # type: ignore[index]
        with s3_stack.client() as api:
            assert api.get("/readyz").status_code == 503
    finally:
        client.create_bucket(Bucket="fluxgate-it")
