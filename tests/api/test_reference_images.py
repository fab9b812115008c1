"""Reference images at the gateway: decoding rules, data URIs, URL fetches, storage, and POST /v1/jobs."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis
from fastapi.testclient import TestClient
from moto import mock_aws
from PIL import Image

from api.app import create_app
from api.image_checks import decode_image
from api.references import ReferenceSource, read_source, store_references
from shared.errors import ApiError
from shared.keys import KeyStore
from shared.settings import Limits, ModelCapabilities, ModelConfig, ModelDefaults, Settings
from shared.storage import LocalStorage, S3Storage, StorageError
from tests.conftest import make_settings

LIMITS = Limits()


def encode(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def rgb(size: tuple[int, int] = (64, 64), color: tuple[int, int, int] = (10, 20, 30)) -> bytes:
    return encode(Image.new("RGB", size, color))


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def refused(call: Any, code: str, param: str = "images") -> ApiError:
    with pytest.raises(ApiError) as caught:
        call()
    assert (caught.value.status, caught.value.code, caught.value.param) == (400, code, param)
    return caught.value


# --- decoding -----------------------------------------------------------------------------------------


def test_an_rgb_png_is_kept_and_hashed() -> None:
    raw = rgb((80, 64))
    decoded = decode_image(raw, "images[0]", "images", LIMITS)
    assert (decoded.width, decoded.height) == (80, 64)
    assert decoded.sha256 == hashlib.sha256(decoded.data).hexdigest()
    assert decoded.source_sha256 == hashlib.sha256(raw).hexdigest()
    with Image.open(io.BytesIO(decoded.data)) as image:
        assert (image.format, image.mode, image.getpixel((0, 0))) == ("PNG", "RGB", (10, 20, 30))


@pytest.mark.parametrize(
    ("image", "fmt", "pixel"),
    [
        (Image.new("RGBA", (64, 64), (255, 0, 0, 0)), "PNG", (255, 255, 255)),  # transparent → white
        (Image.new("RGBA", (64, 64), (255, 0, 0, 255)), "WEBP", (255, 0, 0)),
        (Image.new("LA", (64, 64), (0, 0)), "PNG", (255, 255, 255)),
        (Image.new("L", (64, 64), 100), "PNG", (100, 100, 100)),
        (Image.new("1", (64, 64), 1), "PNG", (255, 255, 255)),
        (Image.new("CMYK", (64, 64), (0, 0, 0, 0)), "JPEG", (255, 255, 255)),
        (Image.new("P", (64, 64), 0), "GIF", (0, 0, 0)),
    ],
)
def test_modes_become_rgb(image: Image.Image, fmt: str, pixel: tuple[int, int, int]) -> None:
    decoded = decode_image(encode(image, fmt), "image", "image", LIMITS)
    with Image.open(io.BytesIO(decoded.data)) as out:
        assert out.mode == "RGB"
        assert all(abs(a - b) <= 2 for a, b in zip(out.getpixel((5, 5)), pixel, strict=True))


def test_a_palette_image_with_transparency_is_composited_on_white() -> None:
    image = Image.new("P", (64, 64), 0)
    image.putpalette([0, 0, 0, 255, 0, 0])
    decoded = decode_image(encode(image, "PNG", transparency=0), "image", "image", LIMITS)
    with Image.open(io.BytesIO(decoded.data)) as out:
        assert out.getpixel((0, 0)) == (255, 255, 255)


def test_an_animated_gif_uses_its_first_frame() -> None:
    frames = [Image.new("RGB", (64, 64), color) for color in ((255, 0, 0), (0, 0, 255))]
    raw = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=10, loop=0)
    with Image.open(io.BytesIO(decode_image(raw, "image", "image", LIMITS).data)) as out:
        red, _, blue = out.getpixel((0, 0))  # type: ignore[misc]
        assert red > 200 and blue < 50


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (128, 64), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    decoded = decode_image(encode(image, "JPEG", exif=exif), "image", "image", LIMITS)
    assert (decoded.width, decoded.height) == (64, 128)


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"not an image at all", "invalid_image"),
        (rgb()[:60], "invalid_image"),  # truncated
        (encode(Image.new("RGB", (64, 64)), "BMP"), "invalid_image"),  # a format we do not decode
        (encode(Image.new("I;16", (64, 64))), "unsupported_image_mode"),
        (encode(Image.new("F", (64, 64)), "TIFF"), "invalid_image"),
        (rgb((63, 64)), "image_too_small"),
        (rgb((576, 64)), "invalid_image"),  # 9:1
        (encode(Image.new("1", (4100, 4100))), "image_too_large"),  # 16.8 MP, above the limit
    ],
)
def test_bad_images_are_400_naming_the_field(raw: bytes, code: str) -> None:
    refused(lambda: decode_image(raw, "images[2]", "images", LIMITS), code)


def test_a_decompression_bomb_is_refused_from_its_header() -> None:
    bomb = encode(Image.new("1", (20_000, 20_000)))  # 400 MP of zeros in a few dozen KB
    assert len(bomb) < 100_000
    started = time.monotonic()
    error = refused(lambda: decode_image(bomb, "image", "image", LIMITS), "image_too_large", "image")
    assert "pixels" in error.message and time.monotonic() - started < 1


def test_byte_and_pixel_limits_are_settings() -> None:
    small = Limits(max_reference_image_bytes=1024, max_reference_image_pixels=64 * 64)
    refused(lambda: decode_image(b"x" * 1025, "image", "image", small), "image_too_large", "image")
    refused(lambda: decode_image(rgb((64, 80)), "image", "image", small), "image_too_large", "image")


# --- sources: data URIs and URLs -----------------------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path, redis_client: redis.Redis) -> Settings:
    models = [
        ModelConfig(name="flux-tiny", path="unused", defaults=ModelDefaults(width=64, height=64)),
        ModelConfig(
            name="flux2",
            path="unused",
            capabilities=ModelCapabilities(edit=True, max_reference_images=2),
            defaults=ModelDefaults(width=64, height=64),
        ),
    ]
    return make_settings(tmp_path, models=models, reference_fetch_timeout_s=1.0)


def source(value: str) -> ReferenceSource:
    return ReferenceSource("images[0]", "images", value)


def test_data_uris_decode_and_bad_ones_are_refused(settings: Settings) -> None:
    assert read_source(source(data_uri(b"abc")), settings) == b"abc"
    assert read_source(source("data:;base64," + base64.b64encode(b"abc").decode()), settings) == b"abc"
    refused(lambda: read_source(source("data:image/png;base64,@@@"), settings), "invalid_image")
    refused(lambda: read_source(source("data:text/plain;base64,YWJj"), settings), "invalid_image")
    refused(lambda: read_source(source("data:image/png,rawbytes"), settings), "invalid_image")
    refused(lambda: read_source(source("ftp://example.com/a.png"), settings), "invalid_image")
    huge = "data:image/png;base64," + "A" * (30 * 1024 * 1024)
    refused(lambda: read_source(source(huge), settings), "image_too_large")


class ImageServer(BaseHTTPRequestHandler):
    """/ok.png, /missing, /moved, /big and /slow."""

    def do_GET(self) -> None:
        if self.path == "/slow":
            time.sleep(3)
        routes = {"/ok.png": (200, rgb()), "/moved": (302, b""), "/big": (200, b"x" * 30_000_000)}
        status, body = routes.get(self.path, (404, b"no"))
        self.send_response(status)
        if status == 302:
            self.send_header("Location", "http://127.0.0.1/ok.png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(OSError):  # the client stopped reading at its limit
            self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def image_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), ImageServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_urls_are_fetched_within_bounds(settings: Settings, image_server: str) -> None:
    assert read_source(source(f"{image_server}/ok.png"), settings) == rgb()
    assert (
        "404"
        in refused(lambda: read_source(source(f"{image_server}/x"), settings), "image_fetch_failed").message
    )
    moved = refused(lambda: read_source(source(f"{image_server}/moved"), settings), "image_fetch_failed")
    assert "redirects" in moved.message
    refused(lambda: read_source(source(f"{image_server}/big"), settings), "image_too_large")
    started = time.monotonic()
    refused(lambda: read_source(source(f"{image_server}/slow"), settings), "image_fetch_failed")
    assert time.monotonic() - started < 2.5


@pytest.mark.parametrize("url", ["http://10.1.2.3/a.png", "http://169.254.169.254/latest", "http://[::1]/a"])
def test_private_and_metadata_urls_are_refused(settings: Settings, url: str) -> None:
    refused(lambda: read_source(source(url), settings), "url_refused")


# --- storage -------------------------------------------------------------------------------------------


def test_references_are_stored_under_the_job_and_read_back(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path, "http://h", b"k")
    decoded = decode_image(rgb(), "image", "image", LIMITS)
    (stored,) = store_references(storage, "job_X", [decoded])
    assert stored.key == "inputs/job_X/0.png" and storage.get(stored.key) == decoded.data
    assert (stored.sha256, stored.bytes, stored.content_type) == (
        decoded.sha256,
        len(decoded.data),
        "image/png",
    )
    with pytest.raises(StorageError, match="not in local storage"):
        storage.get("inputs/job_X/1.png")


def test_s3_storage_gets_what_it_put() -> None:
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="refs")
        storage = S3Storage("refs", "prefix", client)
        storage.put("inputs/j/0.png", b"png-bytes", "image/png")
        assert storage.get("inputs/j/0.png") == b"png-bytes"
        with pytest.raises(StorageError, match="not in S3 bucket"):
            storage.get("inputs/j/1.png")


def test_a_storage_failure_is_503_not_500(tmp_path: Path) -> None:
    class Broken(LocalStorage):
        def put(self, key: str, data: bytes, content_type: str) -> None:
            raise StorageError("disk full")

    decoded = decode_image(rgb(), "image", "image", LIMITS)
    with pytest.raises(ApiError) as caught:
        store_references(Broken(tmp_path, "http://h", b"k"), "job_X", [decoded])
    assert (caught.value.status, caught.value.code) == (503, "storage_unavailable")


# --- POST /v1/jobs with images -------------------------------------------------------------------------


@pytest.fixture
def api(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        key = KeyStore(client.app.state.services.redis).create("alice")  # type: ignore[attr-defined]
        client.headers["Authorization"] = f"Bearer {key}"
        yield client


def test_native_jobs_take_urls_and_data_uris(api: TestClient, settings: Settings, image_server: str) -> None:
    images = [f"{image_server}/ok.png", data_uri(rgb((96, 64), (1, 2, 3)))]
    response = api.post("/v1/jobs", json={"model": "flux2", "prompt": "edit", "images": images})
    assert response.status_code == 202, response.text
    job = response.json()
    refs = job["params"]["images"]
    assert [(ref["key"], ref["width"], ref["height"]) for ref in refs] == [
        (f"inputs/{job['id']}/0.png", 64, 64),
        (f"inputs/{job['id']}/1.png", 96, 64),
    ]
    root = Path(settings.storage_url.removeprefix("file://"))
    for ref in refs:
        assert hashlib.sha256((root / ref["key"]).read_bytes()).hexdigest() == ref["sha256"]
    assert api.get(f"/v1/jobs/{job['id']}").json()["params"]["images"] == refs


def test_text_to_image_params_have_no_images_field(api: TestClient) -> None:
    response = api.post("/v1/jobs", json={"prompt": "x", "images": []})
    assert response.status_code == 202 and "images" not in response.json()["params"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"model": "flux-tiny", "images": [data_uri(rgb())]}, "unsupported_parameter"),
        ({"model": "flux2", "images": [data_uri(rgb())] * 3}, "too_many_images"),
        ({"model": "flux2", "images": ["data:image/png;base64,AAAA"]}, "invalid_image"),
        ({"model": "flux2", "images": ["file:///etc/passwd"]}, "invalid_image"),
        ({"model": "flux2", "images": ["http://10.0.0.1/a.png"]}, "url_refused"),
        ({"model": "flux2", "images": "https://example.com/a.png"}, "invalid_parameter"),
    ],
)
def test_bad_native_images_are_400_naming_images(api: TestClient, body: dict[str, Any], code: str) -> None:
    response = api.post("/v1/jobs", json={"prompt": "x", **body})
    assert response.status_code == 400, response.text
    assert (response.json()["error"]["code"], response.json()["error"]["param"]) == (code, "images")
    assert api.get("/v1/jobs").json()["data"] == []


def test_an_idempotent_replay_with_images_returns_the_first_job(api: TestClient) -> None:
    body = {"model": "flux2", "prompt": "x", "images": [data_uri(rgb())]}
    headers = {"Idempotency-Key": "k-1"}
    first = api.post("/v1/jobs", json=body, headers=headers)
    second = api.post("/v1/jobs", json=body, headers=headers)
    assert (first.status_code, second.status_code) == (202, 200)
    assert first.json()["id"] == second.json()["id"] and len(api.get("/v1/jobs").json()["data"]) == 1


def test_image_routes_take_large_bodies_but_everything_else_stays_bounded(api: TestClient) -> None:
    noise = Image.frombytes("RGB", (1024, 1024), bytes(range(256)) * (3 * 1024 * 4))
    big = data_uri(encode(noise, "PNG", compress_level=0))  # ~4 MiB as base64, over the 1 MiB default
    response = api.post("/v1/jobs", json={"model": "flux2", "prompt": "x", "images": [big]})
    assert response.status_code == 202, response.text
    padded = api.post(
        "/v1/jobs", json={"model": "flux2", "prompt": "x", "metadata": {"pad": "y" * 2_000_000}}
    )
    assert padded.status_code == 413 and padded.json()["error"]["param"] == "body"
    generations = api.post("/v1/images/generations", json={"prompt": "x", "user": "u" * 2_000_000})
    assert generations.status_code == 413
    files = {"image": ("a.png", b"x" * (33 * 1024 * 1024), "image/png")}
    assert api.post("/v1/images/edits", data={"prompt": "x"}, files=files).status_code == 413
