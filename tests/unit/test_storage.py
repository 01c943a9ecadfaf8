"""Generated media stores: inline data: URLs, and an S3-compatible store (moto's standalone S3 server, a real HTTP
server in its own process on 127.0.0.1) with presigned URLs and the inline fallback when the store fails."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
from urllib.parse import parse_qs, urlsplit

import boto3
import httpx
import pybase64
import pydantic
import pytest

from hcxserve.config import GatewayConfig, StorageConfig, load_deployment
from hcxserve.gateway import storage
from hcxserve.gateway.storage import InlineStore, S3Store, StoredMedia, media_store
from hcxserve.tooling.testing import S3_ACCESS_KEY, S3_SECRET_KEY

ACCESS_KEY, SECRET_KEY = S3_ACCESS_KEY, S3_SECRET_KEY
BUCKET = "media"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40
_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


@pytest.fixture(scope="module")
def moto_endpoint(s3_store):
    """moto's S3 server (tests/conftest.py) with bucket `media`; proxy variables are cleared for the module, so no
    request here leaves the loopback interface."""
    with pytest.MonkeyPatch.context() as patch:
        for name in _PROXY_VARS:
            patch.delenv(name, raising=False)
        yield s3_store.url


def _admin_client(endpoint: str):
    return boto3.session.Session(
        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name="us-east-1"
    ).client("s3", endpoint_url=endpoint)


def s3_config(endpoint: str, **overrides) -> StorageConfig:
    values = dict(
        backend="s3",
        endpoint_url=endpoint,
        region="us-east-1",
        bucket=BUCKET,
        access_key_id=ACCESS_KEY,
        secret_access_key=SECRET_KEY,
        timeout_s=2.0,
    )
    return StorageConfig(**(values | overrides))


def fetch(url: str) -> httpx.Response:
    assert urlsplit(url).hostname in ("127.0.0.1", "localhost")  # loopback only
    return httpx.get(url, timeout=10, trust_env=False)


def put(store, data: bytes = PNG, content_type: str = "image/png", suffix: str = ".png") -> StoredMedia:
    return asyncio.run(store.put(data, content_type=content_type, suffix=suffix))


def assert_inline(stored: StoredMedia, data: bytes, content_type: str) -> None:
    header, _, payload = stored.url.partition(",")
    assert header == f"data:{content_type};base64"
    assert pybase64.b64decode(payload, validate=True) == data
    assert stored.key is None and stored.expires_at is None


# ---------------------------------------------------------------------------------------------------------- S3


def test_s3_put_answers_a_presigned_url_to_the_bytes(moto_endpoint):
    store = media_store(s3_config(moto_endpoint, prefix="answers/", url_expiry_s=900))
    assert isinstance(store, S3Store)
    stored = put(store)
    assert re.fullmatch(r"answers/\d{4}/\d{2}/\d{2}/[0-9a-f]{32}\.png", stored.key), stored.key
    assert abs(stored.expires_at - (time.time() + 900)) <= 5

    url = urlsplit(stored.url)
    assert f"{url.scheme}://{url.netloc}" == moto_endpoint
    assert url.path == f"/{BUCKET}/{stored.key}"  # path-style addressing on a custom endpoint
    query = parse_qs(url.query)
    assert query["X-Amz-Expires"] == ["900"] and query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert SECRET_KEY not in stored.url

    response = fetch(stored.url)
    assert response.status_code == 200
    assert response.content == PNG
    assert response.headers["content-type"] == "image/png"


def test_each_put_is_its_own_object(moto_endpoint):
    store = S3Store(s3_config(moto_endpoint))
    wav = b"RIFF" + bytes(1000)

    async def both():
        return await asyncio.gather(
            store.put(PNG, content_type="image/png", suffix=".png"),
            store.put(wav, content_type="audio/wav", suffix=".wav"),
        )

    image, speech = asyncio.run(both())
    assert image.key != speech.key
    assert image.key.startswith("generated/") and speech.key.endswith(".wav")
    assert fetch(image.url).content == PNG
    response = fetch(speech.url)
    assert response.content == wav and response.headers["content-type"] == "audio/wav"


def test_public_endpoint_changes_the_url_host_not_the_upload(moto_endpoint):
    port = urlsplit(moto_endpoint).port
    public = f"http://localhost:{port}"
    stored = put(S3Store(s3_config(moto_endpoint, public_endpoint_url=public)))
    url = urlsplit(stored.url)
    assert f"{url.scheme}://{url.netloc}" == public
    assert url.path == f"/{BUCKET}/{stored.key}"
    # the object went to the store's own endpoint...
    head = _admin_client(moto_endpoint).head_object(Bucket=BUCKET, Key=stored.key)
    assert head["ContentLength"] == len(PNG) and head["ContentType"] == "image/png"
    # ...and the URL, signed for the public host, fetches it from there
    response = fetch(stored.url)
    assert response.status_code == 200 and response.content == PNG


def test_an_unreachable_store_answers_inline_with_one_warning(caplog):
    with socket.socket() as closed:  # bound, never listening: connections to it are refused
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
        store = S3Store(s3_config(endpoint, timeout_s=1.0))
        caplog.set_level(logging.WARNING)
        start = time.monotonic()
        stored = put(store, content_type="audio/wav", suffix=".wav")
        assert time.monotonic() - start < 5
    assert_inline(stored, PNG, "audio/wav")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, caplog.text
    message = warnings[0].getMessage()
    assert warnings[0].name == storage.__name__ and warnings[0].exc_info is None
    assert endpoint in message and repr(BUCKET) in message and "EndpointConnectionError" in message
    assert SECRET_KEY not in caplog.text and ACCESS_KEY not in caplog.text


def test_a_store_that_does_not_answer_times_out_to_inline(caplog):
    with socket.socket() as silent:  # listening, never accepting: connections open, no answer ever comes
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        caplog.set_level(logging.WARNING)
        start = time.monotonic()
        stored = put(S3Store(s3_config(endpoint, timeout_s=0.2)))
        elapsed = time.monotonic() - start
    # two attempts, each botocore's 1 s wait for `100 Continue` and the 0.2 s read timeout, a backoff between them
    assert 0.4 <= elapsed < 6
    assert_inline(stored, PNG, "image/png")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "ReadTimeoutError" in warnings[0].getMessage(), caplog.text


def test_a_missing_bucket_answers_inline_with_a_warning(moto_endpoint, caplog):
    caplog.set_level(logging.WARNING)
    stored = put(S3Store(s3_config(moto_endpoint, bucket="no-such-bucket")))
    assert_inline(stored, PNG, "image/png")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, caplog.text
    assert "'no-such-bucket'" in warnings[0].getMessage() and "NoSuchBucket" in warnings[0].getMessage()
    assert SECRET_KEY not in caplog.text


# ------------------------------------------------------------------------------------------------------ inline


def test_inline_store_answers_a_data_url(monkeypatch):
    threaded = []

    async def spy(func, /, *args, **kwargs):
        threaded.append(func)
        return func(*args, **kwargs)

    monkeypatch.setattr(storage.asyncio, "to_thread", spy)
    store = media_store(StorageConfig())
    assert isinstance(store, InlineStore)
    assert_inline(put(store), PNG, "image/png")
    assert threaded == []  # small: encoded on the event loop

    large = os.urandom((256 << 10) + 1)
    assert_inline(put(store, large, "audio/flac", ".flac"), large, "audio/flac")
    assert threaded == [storage.data_url]  # large: encoded in a thread


def test_inline_store_empty_media():
    assert put(InlineStore(), b"", "audio/wav", ".wav") == StoredMedia(
        url="data:audio/wav;base64,", key=None, expires_at=None
    )


# ------------------------------------------------------------------------------------------------------ config


def test_storage_config_defaults_and_validation():
    cfg = GatewayConfig().storage
    assert cfg.backend == "inline" and cfg.bucket is None and cfg.prefix == "generated"
    assert cfg.url_expiry_s == 3600 and cfg.timeout_s == 10.0
    with pytest.raises(pydantic.ValidationError, match="needs a bucket"):
        StorageConfig(backend="s3")
    with pytest.raises(pydantic.ValidationError, match="together"):
        StorageConfig(backend="s3", bucket="b", access_key_id="AKID")
    with pytest.raises(pydantic.ValidationError):
        StorageConfig(backend="gcs", bucket="b")
    with pytest.raises(pydantic.ValidationError):
        StorageConfig(url_expiry_s=0)
    # no keys: boto3's default credential chain
    assert StorageConfig(backend="s3", bucket="b").access_key_id is None


def test_storage_secrets_stay_out_of_repr():
    cfg = StorageConfig(backend="s3", bucket="b", access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY)
    gateway = GatewayConfig(storage=cfg)
    for text in (repr(cfg), str(cfg), repr(gateway), str(gateway), cfg.model_dump_json()):
        assert SECRET_KEY not in text and ACCESS_KEY not in text
    assert cfg.secret_access_key.get_secret_value() == SECRET_KEY


def test_storage_from_the_environment(monkeypatch):
    monkeypatch.setenv("HCX_GATEWAY__STORAGE__BACKEND", "s3")
    monkeypatch.setenv("HCX_GATEWAY__STORAGE__BUCKET", "hcx-media")
    monkeypatch.setenv("HCX_GATEWAY__STORAGE__SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("HCX_GATEWAY__STORAGE__ACCESS_KEY_ID", ACCESS_KEY)
    deployment = load_deployment(["a"], profile="embedded", overrides={"gateway": {"storage": {"url_expiry_s": 60}}})
    cfg = deployment.gateway.storage
    assert cfg.backend == "s3" and cfg.bucket == "hcx-media" and cfg.url_expiry_s == 60
    assert cfg.secret_access_key.get_secret_value() == SECRET_KEY
