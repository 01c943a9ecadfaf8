"""Where generated media (images, speech) go before a client gets them: inline, or an S3-compatible store.

`InlineStore` answers a `data:` URL holding the bytes: nothing to run, but every answer carries its media (base64,
4/3 of its size). `S3Store` uploads them and answers a presigned GET URL that expires, so answers stay small and
clients fetch the media from the store, not the gateway. It talks to the store through boto3, the well-kept client
for S3 and the stores that speak its API (MinIO, Ceph, R2, ...): request signing, retries and presigning are its,
not ours. boto3 blocks, so each upload runs in a thread (`asyncio.to_thread`) and the event loop goes on serving;
presigning is computed locally, without a network call. A store that fails (down, slow, refusing the credentials,
a missing bucket) costs one warning line, and the media go back inline: the client still gets what it asked for.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import boto3
import pybase64
from botocore.config import Config

from hcxserve.config import StorageConfig

logger = logging.getLogger(__name__)

_ENCODE_INLINE_BYTES = 256 << 10  # larger media are base64-encoded off the event loop


@dataclass(frozen=True)
class StoredMedia:
    """Where a client finds stored media: a presigned http(s) URL (S3) or a `data:` URL (inline)."""

    url: str
    key: str | None  # the object's key in the bucket; None inline
    expires_at: int | None  # unix seconds when the URL stops working; None inline


class MediaStore(Protocol):
    async def put(self, data: bytes, *, content_type: str, suffix: str) -> StoredMedia:
        """Stores `data` and says where a client gets it. `suffix` ends the object's name (`.png`, `.wav`)."""
        ...


def data_url(data: bytes, content_type: str) -> str:
    # pybase64 (SIMD, a vLLM dependency): megabytes of audio are encoded in a few milliseconds
    return f"data:{content_type};base64,{pybase64.b64encode(data).decode('ascii')}"


class InlineStore:
    """The media in the answer itself, as a `data:` URL."""

    async def put(self, data: bytes, *, content_type: str, suffix: str) -> StoredMedia:
        if len(data) > _ENCODE_INLINE_BYTES:
            url = await asyncio.to_thread(data_url, data, content_type)
        else:
            url = data_url(data, content_type)
        return StoredMedia(url=url, key=None, expires_at=None)


class S3Store:
    """Uploads to a bucket of an S3-compatible store and answers presigned GET URLs; inline when the store fails."""

    def __init__(self, cfg: StorageConfig) -> None:
        if not cfg.bucket:
            raise ValueError("S3Store needs a bucket")
        self._cfg = cfg
        self._bucket = cfg.bucket
        self._prefix = cfg.prefix.strip("/")
        self._fallback = InlineStore()
        config = Config(
            connect_timeout=cfg.timeout_s,
            read_timeout=cfg.timeout_s,
            # two attempts in all (botocore's `max_attempts` would count retries, making three)
            retries={"total_max_attempts": 2, "mode": "standard"},
            signature_version="s3v4",
            # path-style URLs (endpoint/bucket/key): what S3-compatible stores serve without wildcard DNS
            s3={"addressing_style": "path"} if cfg.endpoint_url else None,
            # botocore >= 1.36 sends CRC checksums (and aws-chunked bodies) S3 does not require and several
            # S3-compatible stores refuse; send and check them only where an operation requires it
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # a session of our own: clients are thread-safe once made, boto3's shared default session is not
        session = boto3.session.Session(
            aws_access_key_id=cfg.access_key_id.get_secret_value() if cfg.access_key_id else None,
            aws_secret_access_key=cfg.secret_access_key.get_secret_value() if cfg.secret_access_key else None,
            region_name=cfg.region,
        )
        self._client = session.client("s3", endpoint_url=cfg.endpoint_url, config=config)
        # URLs signed for the address clients use: the host is part of the signature
        self._signer = (
            session.client("s3", endpoint_url=cfg.public_endpoint_url, config=config)
            if cfg.public_endpoint_url
            else self._client
        )

    def _key(self, suffix: str) -> str:
        day = datetime.now(UTC).strftime("%Y/%m/%d")
        return "/".join(part for part in (self._prefix, day, f"{uuid.uuid4().hex}{suffix}") if part)

    async def put(self, data: bytes, *, content_type: str, suffix: str) -> StoredMedia:
        key = self._key(suffix)
        expiry = self._cfg.url_expiry_s
        try:
            await asyncio.to_thread(
                self._client.put_object, Bucket=self._bucket, Key=key, Body=data, ContentType=content_type
            )
            now = int(time.time())
            url = self._signer.generate_presigned_url(
                "get_object", Params={"Bucket": self._bucket, "Key": key}, ExpiresIn=expiry
            )
        except Exception as exc:  # any failure of the store: the media go back inline instead
            logger.warning(
                "storing %d bytes of %s in bucket %r at %s failed (%s: %s); answering them inline",
                len(data),
                content_type,
                self._bucket,
                self._cfg.endpoint_url or "AWS S3",
                type(exc).__name__,
                exc,
            )
            return await self._fallback.put(data, content_type=content_type, suffix=suffix)
        return StoredMedia(url=url, key=key, expires_at=now + expiry)


def media_store(cfg: StorageConfig) -> MediaStore:
    """The store `cfg` names."""
    return S3Store(cfg) if cfg.backend == "s3" else InlineStore()
