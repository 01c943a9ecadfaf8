"""Fetching client media: http(s) URLs, `data:` URLs and bare base64, under the limits of `MediaConfig`.

This is the only place that touches client URLs. It refuses non-http schemes (no `file://`, no `s3://` with the
server's credentials), and by default any address that is not public (loopback, private, link-local, multicast,
and IPv6 forms that embed such an IPv4 address), re-checking every redirect hop, so a client cannot make the
server probe its own network. A host is resolved once per hop and the connection goes to the address that was
checked (the URL's host stays in `Host` and in TLS's SNI and certificate check), so a DNS answer that changes
between check and connect (rebinding) cannot redirect it. Operators may narrow what is fetched (`allowed_hosts`),
open their own networks (`allowed_networks`) or turn remote media off; every fetch has a total deadline, and so
has the whole of one request's fetching, with a bounded number of downloads in flight.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import io
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes, urljoin, urlsplit

import httpx
import msgspec
import pybase64

from hcxserve.config import MediaConfig
from hcxserve.gateway.cache_metrics import CacheMetrics
from hcxserve.gateway.url_cache import URLCache
from hcxserve.protocol.errors import InvalidRequestError, MediaError, PayloadTooLargeError
from hcxserve.protocol.openai import InlineMedia

_REDIRECT_CODES = {301, 302, 303, 307, 308}
_DECODE_INLINE_CHARS = 256 << 10  # larger inline media is decoded off the event loop
MAX_DATA_URL_HEADER = 1024  # where a data: URL's comma must be (its media type and parameters come before it)


# `is_global` is True for these, yet none of them is a public unicast host a client may point us at
_NOT_PUBLIC_V6 = (
    ipaddress.IPv6Network("fec0::/10"),  # site-local (deprecated, still routed inside some networks)
    ipaddress.IPv6Network("64:ff9b:1::/48"),  # local-use NAT64 (RFC 8215)
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")

Resolver = Callable[[str], Awaitable[list[str]]]


async def resolve_host(host: str) -> list[str]:
    """Every address `host` resolves to (the system resolver, off the event loop)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses a global IPv6 address carries (mapped, compatible, 6to4, NAT64): traffic to it can end up at
    them. (Teredo's 2001::/32 is not global to begin with.)"""
    out = [a for a in (address.ipv4_mapped, address.sixtofour) if a is not None]
    if address in _NAT64 or address in _IPV4_COMPATIBLE:
        out.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return out


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_public_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A global unicast address that embeds no non-public IPv4 address."""
    if not address.is_global or address.is_multicast:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        if any(address in network for network in _NOT_PUBLIC_V6):
            return False
        return all(is_public_address(v4) for v4 in _embedded_ipv4(address))
    return True


def host_allowed(host: str, allowed: list[str]) -> bool:
    """`host` is one of `allowed` (`example.com`), or under a wildcard entry (`*.example.com`)."""
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if host == entry or (entry.startswith("*.") and host.endswith(entry[1:])):
            return True
    return False


@dataclass
class _RequestBudget:
    slots: asyncio.Semaphore
    deadline: float  # time.monotonic()


_budget: ContextVar[_RequestBudget | None] = ContextVar("media_fetch_budget", default=None)


@contextlib.contextmanager
def request_budget(config: MediaConfig) -> Iterator[None]:
    """Every fetch made inside (and in tasks started inside) shares one request's download slots and deadline."""
    token = _budget.set(_RequestBudget(asyncio.Semaphore(config.max_concurrent_fetches),
                                       time.monotonic() + config.media_deadline_s))  # fmt: skip
    try:
        yield
    finally:
        _budget.reset(token)


def _padding_and_size(encoded: str | memoryview) -> tuple[int, int]:
    """The `=` padding that ends base64 text (among its last three characters), and the size it decodes to."""
    tail = encoded[-3:]
    if isinstance(tail, memoryview):
        tail = tail.tobytes().decode("latin-1")
    padding = len(tail) - len(tail.rstrip("="))
    return padding, (len(encoded) - padding) * 3 // 4


class MediaFetcher:
    """`client` and `resolver` are for tests: an in-process transport and a faked DNS. `name` and `cache_metrics`:
    what the URL cache reports as, and where."""

    def __init__(
        self,
        config: MediaConfig,
        client: httpx.AsyncClient | None = None,
        resolver: Resolver = resolve_host,
        *,
        name: str = "",
        cache_metrics: CacheMetrics | None = None,
    ) -> None:
        self.config = config
        self._resolve = resolver
        self._operator_networks = [ipaddress.ip_network(cidr, strict=False) for cidr in config.allowed_networks]
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(config.fetch_timeout_s), follow_redirects=False, trust_env=False
        )
        self.url_cache = (
            URLCache(config.url_cache_bytes, name=name, metrics=cache_metrics) if config.url_cache_bytes else None
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def fetch(self, ref: str, *, param: str, max_bytes: int | None = None) -> bytes:
        """The media's bytes; `max_bytes` defaults to the image limit."""
        limit = max_bytes or self.config.max_image_bytes
        if isinstance(ref, InlineMedia):
            return await self._off_loop(self._decode_inline, ref, param, limit, size=ref.end - ref.start)
        ref = ref.strip()
        try:
            # a data: URL is told by its prefix: urlsplit would scan (and copy) megabytes of it
            scheme = "data" if ref[:5].lower() == "data:" else urlsplit(ref).scheme.lower() if ":" in ref[:16] else ""
        except ValueError:  # e.g. an unclosed IPv6 bracket
            raise MediaError(f"{param}: malformed URL", param=param) from None
        if scheme == "data":
            return await self._off_loop(self._decode_data_url, ref, param, limit)
        if scheme in ("http", "https"):
            if not self.config.allow_remote_media:
                raise MediaError(
                    f"{param}: this server does not fetch media URLs; send the data inline (data: URL or base64)",
                    param=param,
                    code="remote_media_disabled",
                )
            return await self._download_within_budget(ref, param, limit)
        if scheme:
            raise MediaError(f"{param}: unsupported URL scheme {scheme!r}; use http(s) or a data: URL", param=param)
        return await self._off_loop(self._decode_base64, ref, param, limit)

    @staticmethod
    async def _off_loop(decode, text: str, param: str, limit: int, *, size: int | None = None) -> bytes:
        """Inline media decoded in a thread when it is large: megabytes of base64 would stall the event loop."""
        if (len(text) if size is None else size) > _DECODE_INLINE_CHARS:
            return await asyncio.to_thread(decode, text, param, limit)
        return decode(text, param, limit)

    # ------------------------------------------------------------------------------------------ inline data
    @staticmethod
    def _check_size(size: int, param: str, limit: int) -> None:
        if size > limit:
            raise PayloadTooLargeError(f"{param}: media is {size} bytes, over the limit of {limit}", param=param)

    def _decode_base64(self, text: str, param: str, limit: int) -> bytes:
        padding, size = _padding_and_size(text)
        self._check_size(size, param, limit)  # known before decoding
        if len(text) % 4 or padding > 2 or padding == len(text):
            # unpadded or over-padded base64 is accepted too; well-padded input is decoded as it is, without a copy
            text = text.rstrip("=")
            text += "=" * (-len(text) % 4)
        try:
            # pybase64 (SIMD, a vLLM dependency): ~40x faster than binascii, which would hold the GIL ~60 ms for 27 MB
            data = pybase64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise MediaError(f"{param}: not a URL, data: URL or base64 data", param=param) from None
        if not data:
            raise MediaError(f"{param}: empty media", param=param)
        return data

    def _decode_inline(self, media: InlineMedia, param: str, limit: int) -> bytes:
        """Plain, padded base64 is decoded straight from the body's bytes; anything else (JSON escapes such as
        `\\/`, whitespace, missing padding) is read as the JSON string the client wrote and decoded as any other."""
        payload = media.payload
        if _padding_and_size(payload)[1] <= limit:
            with contextlib.suppress(binascii.Error, ValueError):
                if data := pybase64.b64decode(payload, validate=True):
                    return data
        # not plain base64, or over the limit by its length (which escapes lengthen): the exact checks decide
        try:
            text = media.header + msgspec.json.decode(b'"' + payload.tobytes() + b'"')
        except (msgspec.DecodeError, ValueError):  # a control character, bad UTF-8: as parsing the whole body would
            raise InvalidRequestError("the request body is not valid JSON", code="invalid_json") from None
        text = text.strip()
        return self._decode_data_url(text, param, limit) if media.header else self._decode_base64(text, param, limit)

    def _decode_data_url(self, url: str, param: str, limit: int) -> bytes:
        comma = url.find(",", 5, MAX_DATA_URL_HEADER)
        if comma < 0:
            raise MediaError(f"{param}: malformed data: URL (no comma)", param=param)
        header, payload = url[5:comma], url[comma + 1 :]
        if header.lower().endswith(";base64"):
            return self._decode_base64(payload.strip(), param, limit)
        self._check_size(len(payload), param, limit)
        data = unquote_to_bytes(payload)
        if not data:
            raise MediaError(f"{param}: empty media", param=param)
        return data

    # ------------------------------------------------------------------------------------------ URLs
    async def _checked_address(self, url: str, param: str) -> str | None:
        """The address to connect to for `url`'s host, once it passed every check (None: the guard is off and
        the client resolves as usual)."""
        host = urlsplit(url).hostname
        if not host:
            raise MediaError(f"{param}: URL has no host", param=param)
        if self.config.allowed_hosts and not host_allowed(host, self.config.allowed_hosts):
            raise MediaError(f"{param}: this server does not fetch from {host!r}", param=param, code="forbidden_url")
        if self.config.allow_private_networks:
            return None
        try:
            addresses = [host] if _is_ip_literal(host) else await self._resolve(host)
        except (socket.gaierror, UnicodeError):
            raise MediaError(f"{param}: cannot resolve host {host!r}", param=param, code="unreachable_url") from None
        if not addresses:
            raise MediaError(f"{param}: cannot resolve host {host!r}", param=param, code="unreachable_url")
        for text in addresses:
            address = ipaddress.ip_address(text.split("%")[0])
            if not is_public_address(address) and not any(address in net for net in self._operator_networks):
                raise MediaError(
                    f"{param}: URL host {host!r} resolves to a non-public address, which this server does not fetch",
                    param=param,
                    code="forbidden_url",
                )
        return addresses[0].split("%")[0]

    async def _download_within_budget(self, url: str, param: str, limit: int) -> bytes:
        if self.url_cache is not None and (data := self.url_cache.fresh(url)) is not None:
            self._check_size(len(data), param, limit)
            return data
        budget = _budget.get()
        deadline = time.monotonic() + self.config.fetch_deadline_s
        if budget is not None:
            deadline = min(deadline, budget.deadline)
        slots = budget.slots if budget is not None else contextlib.nullcontext()
        try:
            async with slots, asyncio.timeout(deadline - time.monotonic()):
                return await self._download(url, param, limit)
        except TimeoutError:
            raise MediaError(f"{param}: timed out fetching the URL", param=param, code="unreachable_url") from None

    async def _download(self, url: str, param: str, limit: int) -> bytes:
        cache = self.url_cache
        for _ in range(self.config.max_redirects + 1):
            try:
                address = await self._checked_address(url, param)
                target, headers, extensions = httpx.URL(url), {"Accept": "image/*,*/*;q=0.5"}, {}
                validators, kept = cache.conditional(url) if cache is not None else ({}, None)
                headers.update(validators)
                if address is not None:
                    headers["Host"] = target.netloc.decode("ascii")
                    if target.scheme == "https":
                        extensions["sni_hostname"] = target.host  # SNI and the certificate check use the URL's host
                    target = target.copy_with(host=address)
                async with self._client.stream("GET", target, headers=headers, extensions=extensions) as response:
                    if response.status_code in _REDIRECT_CODES and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        if urlsplit(url).scheme not in ("http", "https"):
                            raise MediaError(f"{param}: redirect to a non-http URL", param=param)
                        continue
                    if response.status_code == 304 and validators:
                        cache.not_modified(url, response.headers)
                        self._check_size(len(kept), param, limit)
                        return kept
                    if response.status_code != 200:
                        raise MediaError(
                            f"{param}: fetching the URL returned HTTP {response.status_code}",
                            param=param,
                            code="unreachable_url",
                        )
                    declared = response.headers.get("content-length", "")
                    self._check_size(int(declared) if declared.isdigit() else 0, param, limit)
                    buffer = io.BytesIO()
                    async for chunk in response.aiter_bytes():
                        buffer.write(chunk)
                        self._check_size(buffer.tell(), param, limit)
            except (httpx.InvalidURL, ValueError):
                raise MediaError(f"{param}: malformed URL", param=param) from None
            except httpx.TimeoutException:
                raise MediaError(f"{param}: timed out fetching the URL", param=param, code="unreachable_url") from None
            except httpx.HTTPError as exc:
                raise MediaError(
                    f"{param}: could not fetch the URL ({type(exc).__name__})", param=param, code="unreachable_url"
                ) from None
            data = buffer.getvalue()
            if not data:
                raise MediaError(f"{param}: the URL returned no data", param=param)
            if cache is not None:
                cache.store(url, response.headers, data)
            return data
        raise MediaError(f"{param}: too many redirects", param=param, code="unreachable_url")
