import asyncio
import base64
import http.server
import io
import ipaddress
import socket
import threading
import time

import httpx
import pytest

from hcxserve.config import MediaConfig
from hcxserve.gateway.fetch import MediaFetcher
from hcxserve.media.images import decode_image, probe_image
from hcxserve.protocol.errors import MediaError, PayloadTooLargeError
from tests.api.harness import FakeWeb
from tests.conftest import data_url, make_png


def fetch(ref, **config):
    async def run():
        fetcher = MediaFetcher(MediaConfig(**config))
        try:
            return await fetcher.fetch(ref, param="messages[0].content[0]")
        finally:
            await fetcher.aclose()

    return asyncio.run(run())


def test_data_url_and_bare_base64():
    png = make_png()
    assert fetch(data_url(png)) == png
    assert fetch(base64.b64encode(png).decode()) == png


def test_http_url_from_a_local_server(media_server):
    base, root = media_server
    assert fetch(f"{base}/red.png", allow_private_networks=True) == (root / "red.png").read_bytes()


def test_private_addresses_are_refused_by_default(media_server):
    base, _ = media_server
    with pytest.raises(MediaError) as info:
        fetch(f"{base}/red.png")
    assert info.value.code == "forbidden_url"
    assert info.value.param == "messages[0].content[0]"


def test_missing_url_is_a_client_error(media_server):
    base, _ = media_server
    with pytest.raises(MediaError) as info:
        fetch(f"{base}/nope.png", allow_private_networks=True)
    assert "404" in info.value.message and info.value.status_code == 400


def test_unreachable_url():
    with pytest.raises(MediaError) as info:
        fetch("http://127.0.0.1:9/x.png", allow_private_networks=True, fetch_timeout_s=2)
    assert info.value.code == "unreachable_url"


@pytest.mark.parametrize("ref", ["file:///etc/passwd", "s3://bucket/key.pt", "ftp://host/x.png"])
def test_other_schemes_are_refused(ref):
    with pytest.raises(MediaError, match="scheme"):
        fetch(ref)


def test_size_limits(media_server):
    base, _ = media_server
    with pytest.raises(PayloadTooLargeError):
        fetch(data_url(make_png()), max_image_bytes=100)
    with pytest.raises(PayloadTooLargeError):
        fetch(f"{base}/red.png", allow_private_networks=True, max_image_bytes=100)


def test_garbage_is_refused():
    with pytest.raises(MediaError):
        fetch("not a url and not base64!")
    with pytest.raises(MediaError):
        fetch("data:image/png;base64,")


def test_probe_and_decode():
    config = MediaConfig()
    assert probe_image(make_png(40, 30), config, param="p") == (40, 30)
    with pytest.raises(MediaError, match="not a decodable image"):
        probe_image(b"hello", config, param="p")
    with pytest.raises(PayloadTooLargeError):
        probe_image(make_png(100, 100), MediaConfig(max_image_pixels=5000), param="p")
    with pytest.raises(MediaError, match="smaller"):
        probe_image(make_png(2, 2), config, param="p")
    truncated = make_png(64, 64)[:-40]
    with pytest.raises(MediaError):
        decode_image(truncated, config)


def test_transparent_images_are_composited_on_white():
    image = decode_image(make_png(8, 8, (255, 0, 0), mode="RGBA"), MediaConfig())
    assert image.mode == "RGB"
    red, green, blue = image.getpixel((7, 7))
    assert red == 255 and green > 100 and blue > 100  # half-transparent red over white


# ---------------------------------------------------------------------------------------------- the SSRF guard
# The guard is on in every test below. Hosts resolve through a faked resolver and URLs are served in-process
# (tests.api.harness.FakeWeb), so no test sends traffic to any address.


def guarded(web, ref, **config):
    async def run():
        fetcher = web.fetcher(MediaConfig(**config))
        try:
            return await fetcher.fetch(ref, param="messages[0].content[0]")
        finally:
            await fetcher.aclose()

    return asyncio.run(run())


NON_PUBLIC = [
    "127.0.0.1", "127.255.255.254", "10.0.0.1", "172.16.0.1", "172.31.255.255", "192.168.1.1",
    "169.254.169.254",  # cloud metadata
    "100.64.0.1",  # carrier-grade NAT
    "0.0.0.0", "255.255.255.255", "192.0.2.1", "198.18.0.1", "240.0.0.1",
    "224.0.0.1", "239.255.255.250",  # multicast
    "::1", "::", "fe80::1", "fc00::1", "fd12:3456::1", "fec0::1", "2001:db8::1",
    "ff02::1", "ff0e::1",  # multicast
    "::ffff:127.0.0.1", "::ffff:10.0.0.1",  # IPv4-mapped
    "::127.0.0.1", "::169.254.169.254",  # IPv4-compatible
    "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b:1::1",  # NAT64 to loopback / metadata, local-use NAT64
    "2002:7f00:1::1", "2002:a9fe:a9fe::1", "2002:c0a8:101::1",  # 6to4 of loopback, metadata, 192.168.1.1
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
]  # fmt: skip


@pytest.mark.parametrize("address", NON_PUBLIC)
def test_every_non_public_address_is_refused(address):
    web = FakeWeb()
    web.dns["media.test"] = [address]
    web.pages["http://media.test/a.png"] = b"secret"
    with pytest.raises(MediaError) as info:
        guarded(web, "http://media.test/a.png")
    assert info.value.code == "forbidden_url" and info.value.param == "messages[0].content[0]"
    assert web.fetched == []  # refused before any connection


@pytest.mark.parametrize("address", ["127.0.0.1", "[::1]", "[::ffff:7f00:1]", "169.254.169.254", "[fe80::1]"])
def test_literal_addresses_are_checked_without_a_lookup(address):
    web = FakeWeb()
    with pytest.raises(MediaError) as info:
        guarded(web, f"http://{address}/a.png")
    assert info.value.code == "forbidden_url" and web.fetched == [] and web.resolved == []


@pytest.mark.parametrize(
    "address", ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "64:ff9b::5db8:d822", "2002:5db8:d822::1"]
)
def test_public_addresses_are_fetched(address):
    web = FakeWeb()
    web.dns["media.test"] = [address]
    web.pages["https://media.test/a.png"] = b"png bytes"
    assert guarded(web, "https://media.test/a.png") == b"png bytes"
    assert web.resolved == ["media.test"]


def test_one_non_public_address_among_several_is_enough_to_refuse():
    web = FakeWeb()
    web.dns["media.test"] = ["93.184.216.34", "10.1.2.3"]
    web.pages["http://media.test/a.png"] = b"x"
    with pytest.raises(MediaError, match="non-public"):
        guarded(web, "http://media.test/a.png")


@pytest.mark.parametrize("answer", [[], socket.gaierror("no such host")])
def test_unresolvable_hosts(answer):
    web = FakeWeb()

    async def resolver(host):
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def run():
        fetcher = MediaFetcher(
            MediaConfig(), client=httpx.AsyncClient(transport=httpx.MockTransport(web)), resolver=resolver
        )
        return await fetcher.fetch("http://nowhere.test/a.png", param="p")

    with pytest.raises(MediaError) as info:
        asyncio.run(run())
    assert info.value.code == "unreachable_url" and web.fetched == []


@pytest.mark.parametrize("url", ["http:///a.png", "http://[::1/a.png", "http://exa mple.test/a.png"])
def test_malformed_urls_are_client_errors(url):
    with pytest.raises(MediaError):
        guarded(FakeWeb(), url)


@pytest.mark.parametrize("hop", [1, 2, 3])
def test_every_redirect_hop_is_checked(hop):
    web = FakeWeb()
    web.dns["internal.test"] = ["10.0.0.7"]
    chain = [f"http://hop{k}.test/a.png" for k in range(hop)] + ["http://internal.test/a.png"]
    for here, there in zip(chain, chain[1:]):
        web.redirect(here, there)
    web.pages["http://internal.test/a.png"] = b"secret"
    with pytest.raises(MediaError) as info:
        guarded(web, chain[0])
    assert info.value.code == "forbidden_url"
    assert web.fetched == chain[:-1]  # the internal host was never contacted


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirects_are_followed_relative_and_absolute(status):
    web = FakeWeb()
    web.redirect("http://a.test/start", "/moved/a.png", status)
    web.redirect("http://a.test/moved/a.png", "https://b.test/final.png", status)
    web.pages["https://b.test/final.png"] = b"final"
    assert guarded(web, "http://a.test/start") == b"final"
    assert web.resolved == ["a.test", "a.test", "b.test"]


@pytest.mark.parametrize("limit", [0, 1, 3])
def test_redirect_limit(limit):
    def chain_of(n):
        web = FakeWeb()
        for k in range(n):
            web.redirect(f"http://r{k}.test/", f"http://r{k + 1}.test/")
        web.pages[f"http://r{n}.test/"] = b"end"
        return web

    assert guarded(chain_of(limit), "http://r0.test/", max_redirects=limit) == b"end"
    web = chain_of(limit + 1)
    with pytest.raises(MediaError, match="too many redirects") as info:
        guarded(web, "http://r0.test/", max_redirects=limit)
    assert info.value.code == "unreachable_url"
    assert len(web.fetched) == limit + 1  # the last redirect is not followed


@pytest.mark.parametrize(
    "target", ["file:///etc/passwd", "ftp://a.test/x.png", "data:image/png;base64,AAAA", "gopher://a.test/"]
)
def test_redirect_to_another_scheme_is_refused(target):
    web = FakeWeb()
    web.redirect("http://a.test/x.png", target)
    with pytest.raises(MediaError) as info:
        guarded(web, "http://a.test/x.png")
    # refused as a redirect to another scheme (httpx itself already refuses to parse some such locations)
    assert "non-http" in info.value.message or "malformed" in info.value.message
    assert web.fetched == ["http://a.test/x.png"]


def test_a_redirect_without_location_is_an_error_status():
    web = FakeWeb()
    web.pages["http://a.test/x.png"] = httpx.Response(302)
    with pytest.raises(MediaError, match="HTTP 302"):
        guarded(web, "http://a.test/x.png")


def test_the_byte_limit_holds_for_declared_and_streamed_sizes():
    web = FakeWeb()
    web.pages["http://a.test/declared.png"] = httpx.Response(
        200, headers={"content-length": "5000"}, content=b"x" * 5000
    )
    web.pages["http://a.test/exact.png"] = b"x" * 100
    web.pages["http://a.test/over.png"] = b"x" * 101
    assert len(guarded(web, "http://a.test/exact.png", max_image_bytes=100)) == 100
    for name in ("declared", "over"):
        with pytest.raises(PayloadTooLargeError):
            guarded(web, f"http://a.test/{name}.png", max_image_bytes=100)


@pytest.mark.parametrize(
    ("page", "match"),
    [
        (httpx.Response(200), "no data"),
        (httpx.ReadTimeout("slow"), "timed out"),
        (httpx.ConnectError("x"), "could not"),
    ],
)
def test_fetch_failures_are_client_errors(page, match):
    web = FakeWeb()
    web.pages["http://a.test/x.png"] = page
    with pytest.raises(MediaError, match=match):
        guarded(web, "http://a.test/x.png")


def test_with_the_guard_off_private_hosts_are_fetched():
    web = FakeWeb()
    web.dns["internal.test"] = ["10.0.0.7"]
    web.pages["http://internal.test/a.png"] = b"ok"
    assert guarded(web, "http://internal.test/a.png", allow_private_networks=True) == b"ok"
    assert web.resolved == []


def test_base64_wrapped_references_meet_the_same_guard():
    """OmniServe's clients send base64 of a URL as audio data; the wrapped URL gets no pass (track B, HTTP API)."""
    from tests.api.harness import gateway

    wrapped = base64.b64encode(b"http://internal.test/a.wav").decode()
    with gateway("b") as gw:
        gw.web.dns["internal.test"] = ["169.254.169.254"]
        gw.web.pages["http://internal.test/a.wav"] = b"RIFF"
        response = gw.chat(
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": wrapped}}]}]}
        )
        assert response.status_code == 400
        error = response.json()["error"]
        assert (error["code"], error["param"]) == ("forbidden_url", "messages[0].content[0]")
        assert gw.web.fetched == [] and gw.audio.calls == 0


def test_image_urls_meet_the_guard_through_the_api():
    from tests.api.harness import gateway

    with gateway("a") as gw:
        gw.web.dns["internal.test"] = ["192.168.0.10"]
        gw.web.redirect("https://cdn.test/a.png", "http://internal.test/a.png")
        body = {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://cdn.test/a.png"}}]}
            ]
        }
        response = gw.chat(body)
        assert response.status_code == 400 and response.json()["error"]["code"] == "forbidden_url"
        assert gw.web.fetched == ["https://cdn.test/a.png"]


# ---------------------------------------------------------------------------------------------- inline data
def fetch_error(ref, **config):
    with pytest.raises(MediaError) as info:
        fetch(ref, **config)
    assert info.value.param == "messages[0].content[0]"
    return info.value


@pytest.mark.parametrize(
    ("url", "data"),
    [
        ("data:,hello", b"hello"),  # no media type at all
        ("data:text/plain,a%2Cb%20c", b"a,b c"),  # percent-encoded
        ("data:image/svg+xml,<svg a=1,b=2/>", b"<svg a=1,b=2/>"),  # commas in the payload
        ("data:image/png;base64," + base64.b64encode(b"\x89PNG").decode(), b"\x89PNG"),
        ("data:image/png;base64, " + base64.b64encode(b"\x89PNG").decode() + " ", b"\x89PNG"),
        ("DATA:image/png;base64," + base64.b64encode(b"\x89PNG").decode(), b"\x89PNG"),  # schemes are case-blind
        ("data:;base64,QUJD", b"ABC"),  # padded: decoded as it is
        ("data:;base64,QUI", b"AB"),  # unpadded
        ("data:;base64,QUI===", b"AB"),  # over-padded
        ("data:;base64," + base64.b64encode(bytes(range(256)) * 4096).decode(), bytes(range(256)) * 4096),  # 1 MiB
    ],
)
def test_data_url_forms(url, data):
    assert fetch(url) == data


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("data:image/png;base64", "messages[0].content[0]: malformed data: URL (no comma)"),
        ("data:image/png;" + "x" * 1100 + ";base64,QUJD", "messages[0].content[0]: malformed data: URL (no comma)"),
        ("data:text/plain,", "messages[0].content[0]: empty media"),
        ("data:image/png;base64,", "messages[0].content[0]: empty media"),
        ("====", "messages[0].content[0]: empty media"),
        ("not a url and not base64!", "messages[0].content[0]: not a URL, data: URL or base64 data"),
        ("ftp://host/x.png", "messages[0].content[0]: unsupported URL scheme 'ftp'; use http(s) or a data: URL"),
        ("http://[::1/x.png", "messages[0].content[0]: malformed URL"),
    ],
)
def test_inline_refusals_name_the_part(ref, message):
    assert fetch_error(ref).message == message


@pytest.mark.parametrize("size", [99, 100, 101])
def test_inline_size_limit_is_exact(size):
    payload = b"x" * size
    for ref in (data_url(payload), base64.b64encode(payload).decode(), "data:text/plain," + "x" * size):
        if size <= 100:
            assert fetch(ref, max_image_bytes=100) == payload
        else:
            with pytest.raises(PayloadTooLargeError) as info:
                fetch(ref, max_image_bytes=100)
            assert info.value.param == "messages[0].content[0]"
            assert info.value.message == f"messages[0].content[0]: media is {size} bytes, over the limit of 100"


# ---------------------------------------------------------------------------------------------- URL errors
def test_url_refusals_name_the_part():
    web = FakeWeb()
    web.dns["nowhere.test"] = []
    cases = {
        "http:///a.png": ("messages[0].content[0]: URL has no host", "invalid_media"),
        "http://nowhere.test/a.png": ("messages[0].content[0]: cannot resolve host 'nowhere.test'", "unreachable_url"),
        "http://a.test/missing.png": ("messages[0].content[0]: fetching the URL returned HTTP 404", "unreachable_url"),
    }
    for url, (message, code) in cases.items():
        with pytest.raises(MediaError) as info:
            guarded(web, url)
        assert (info.value.message, info.value.code, info.value.param) == (message, code, "messages[0].content[0]")


@pytest.mark.parametrize(
    ("page", "message", "code"),
    [
        (httpx.Response(200), "the URL returned no data", "invalid_media"),
        (httpx.ReadTimeout("slow"), "timed out fetching the URL", "unreachable_url"),
        (httpx.ConnectError("x"), "could not fetch the URL (ConnectError)", "unreachable_url"),
        (httpx.InvalidURL("bad"), "malformed URL", "invalid_media"),
    ],
)
def test_fetch_failure_messages(page, message, code):
    web = FakeWeb()
    web.pages["http://a.test/x.png"] = page
    with pytest.raises(MediaError) as info:
        guarded(web, "http://a.test/x.png")
    assert (info.value.message, info.value.code) == (f"messages[0].content[0]: {message}", code)
    assert info.value.param == "messages[0].content[0]"


def test_redirect_errors_name_the_part():
    web = FakeWeb()
    web.redirect("http://a.test/x.png", "ftp://a.test/x.png")
    web.redirect("http://loop.test/", "http://loop.test/")
    for url, message in [
        ("http://a.test/x.png", "messages[0].content[0]: redirect to a non-http URL"),
        ("http://loop.test/", "messages[0].content[0]: too many redirects"),
    ]:
        with pytest.raises(MediaError) as info:
            guarded(web, url)
        assert (info.value.message, info.value.param) == (message, "messages[0].content[0]")


@pytest.mark.parametrize(
    ("headers", "limit", "chunks_read"),
    [
        ({"content-length": "1000"}, 500, 0),  # a declared size over the limit: refused before the body is read
        ({}, 250, 3),  # no declared size: the stream is cut off at the limit
    ],
)
def test_the_body_is_read_no_further_than_the_limit(headers, limit, chunks_read):
    produced = []

    async def body():
        for _ in range(10):
            produced.append(1)
            yield b"x" * 100

    web = FakeWeb()
    web.pages["http://a.test/big.png"] = lambda: httpx.Response(200, headers=headers, content=body())
    with pytest.raises(PayloadTooLargeError) as info:
        guarded(web, "http://a.test/big.png", max_image_bytes=limit)
    assert info.value.param == "messages[0].content[0]" and len(produced) == chunks_read


@pytest.mark.parametrize("length", ["abc", "-5", ""])
def test_a_meaningless_content_length_is_ignored(length):
    web = FakeWeb()
    web.pages["http://a.test/x.png"] = lambda: httpx.Response(200, headers={"content-length": length}, content=b"ok")
    assert guarded(web, "http://a.test/x.png") == b"ok"


# ---------------------------------------------------------------------------------------------- real sockets
class _SlowHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        time.sleep(3)

    def log_message(self, *args):
        pass


def test_the_default_client_times_out_on_a_server_that_never_answers():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        started = time.monotonic()
        error = fetch_error(
            f"http://127.0.0.1:{server.server_address[1]}/x.png", allow_private_networks=True, fetch_timeout_s=0.5
        )
        assert error.message == "messages[0].content[0]: timed out fetching the URL"
        assert time.monotonic() - started < 2.5
    finally:
        server.shutdown()


def test_the_default_client_ignores_proxy_settings(media_server, monkeypatch):
    """A proxy from the environment would see (and could redirect) every client URL; media go direct."""
    base, root = media_server
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    assert fetch(f"{base}/red.png", allow_private_networks=True) == (root / "red.png").read_bytes()


def test_the_default_client_follows_no_redirect_by_itself(media_server):
    """Each hop is checked by the fetcher; a client that followed redirects on its own would skip those checks. Python's
    file server redirects a folder named without its trailing slash."""
    base, root = media_server
    (root / "album").mkdir(exist_ok=True)
    error = fetch_error(f"{base}/album", allow_private_networks=True, max_redirects=0)
    assert error.message == "messages[0].content[0]: too many redirects"
    assert fetch(f"{base}/album", allow_private_networks=True, max_redirects=1).startswith(b"<!DOCTYPE")


def test_the_default_resolver_answers_with_addresses():
    from hcxserve.gateway.fetch import resolve_host

    addresses = asyncio.run(resolve_host("localhost"))
    assert addresses and all(ipaddress.ip_address(a).is_loopback for a in addresses)


# ---------------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_every_transparent_mode_is_composited_on_white(mode):
    from PIL import Image

    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    decoded = decode_image(buffer.getvalue(), MediaConfig())
    assert decoded.mode == "RGB" and decoded.getpixel((0, 0)) == (255, 255, 255)


def test_palette_images_with_and_without_transparency():
    from PIL import Image

    opaque = Image.new("P", (8, 8), 3)
    opaque.putpalette([0, 0, 0] * 3 + [10, 20, 30] + [0, 0, 0] * 252)
    transparent = opaque.copy()
    buffer_a, buffer_b = io.BytesIO(), io.BytesIO()
    opaque.save(buffer_a, format="PNG")
    transparent.save(buffer_b, format="PNG", transparency=3)
    assert decode_image(buffer_a.getvalue(), MediaConfig()).getpixel((0, 0)) == (10, 20, 30)
    assert decode_image(buffer_b.getvalue(), MediaConfig()).getpixel((0, 0)) == (255, 255, 255)


def test_a_corrupt_image_body_is_named():
    with pytest.raises(MediaError) as info:
        decode_image(make_png(64, 64)[:-40], MediaConfig(), param="frame")
    assert (info.value.message, info.value.param) == ("frame: the image data is truncated or corrupt", "frame")
    with pytest.raises(MediaError) as info:
        decode_image(make_png(64, 64)[:-40], MediaConfig())
    assert info.value.param == "image"


@pytest.mark.parametrize("mode", ["L", "CMYK", "I;16", "RGB"])
def test_every_mode_decodes_to_rgb(mode):
    from PIL import Image

    image = Image.new(mode, (8, 8))
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF" if mode in ("CMYK", "I;16") else "PNG")
    decoded = decode_image(buffer.getvalue(), MediaConfig())
    assert decoded.mode == "RGB" and decoded.size == (8, 8)


def test_an_undecodable_frame_is_named():
    with pytest.raises(MediaError) as info:
        decode_image(b"not an image", MediaConfig(), param="frame")
    assert (info.value.param, info.value.message) == ("frame", "frame: the data is not a decodable image")


def _saved(fmt: str, size=(16, 16), mode="RGB") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, size, 128).save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_the_accepted_image_formats(fmt):
    assert probe_image(_saved(fmt), MediaConfig(), param="p") == (16, 16)
    assert decode_image(_saved(fmt), MediaConfig()).size == (16, 16)


@pytest.mark.parametrize(("fmt", "mode"), [("DDS", "RGB"), ("SPIDER", "F"), ("BLP", "P"), ("ICO", "RGB"),
                                           ("TGA", "RGB"), ("PCX", "RGB"), ("PPM", "RGB"), ("EPS", "RGB")])  # fmt: skip
def test_pillow_formats_outside_the_list_are_refused_before_parsing(fmt, mode):
    from PIL import Image

    data = _saved(fmt, mode=mode)
    assert Image.open(io.BytesIO(data)).size == (16, 16)  # Pillow itself would open it
    with pytest.raises(MediaError, match="not a decodable image"):
        probe_image(data, MediaConfig(), param="p")


@pytest.mark.parametrize("size", [(4, 1000), (1000, 4), (3, 700)])
def test_extreme_aspect_ratios_are_refused(size):
    with pytest.raises(MediaError, match="elongated|smaller") as info:
        probe_image(make_png(*size), MediaConfig(min_image_side=3), param="p")
    assert info.value.status_code == 400
    assert probe_image(make_png(5, 1000), MediaConfig(), param="p") == (5, 1000)  # 200:1 is the bound


# ---------------------------------------------------------------------------------------------- pinning, allow-lists
def test_the_connection_goes_to_the_address_that_was_checked():
    """DNS rebinding: the host is resolved once per hop; a second answer (private) is never asked for."""
    web = FakeWeb()
    answers = iter([["93.184.216.34"], ["127.0.0.1"]])

    async def rebinding(host):
        web.resolved.append(host)
        return next(answers)

    web.pages["http://rebind.test/x.png"] = b"ok"

    async def run():
        fetcher = MediaFetcher(MediaConfig(), client=web.fetcher(MediaConfig())._client, resolver=rebinding)
        return await fetcher.fetch("http://rebind.test/x.png", param="p")

    assert asyncio.run(run()) == b"ok"
    assert web.resolved == ["rebind.test"]
    assert web.connections == [("93.184.216.34", None)]
    assert web.fetched == ["http://rebind.test/x.png"]  # the server still sees its own host


def test_https_keeps_the_host_name_for_sni_and_the_certificate():
    web = FakeWeb()
    web.dns["secure.test"] = ["2606:2800:220:1:248:1893:25c8:1946"]
    web.pages["https://secure.test:8443/x.png"] = b"ok"
    assert guarded(web, "https://secure.test:8443/x.png") == b"ok"
    assert web.connections == [("2606:2800:220:1:248:1893:25c8:1946", "secure.test")]


def test_each_redirect_hop_is_pinned_to_its_own_checked_address():
    web = FakeWeb()
    web.dns = {"a.test": ["93.184.216.34"], "b.test": ["93.184.216.35"]}
    web.redirect("http://a.test/x.png", "http://b.test/y.png")
    web.pages["http://b.test/y.png"] = b"ok"
    assert guarded(web, "http://a.test/x.png") == b"ok"
    assert [address for address, _ in web.connections] == ["93.184.216.34", "93.184.216.35"]


@pytest.mark.parametrize(
    ("host", "allowed"),
    [("cdn.example.com", True), ("example.com", True), ("a.b.example.com", True), ("evil.com", False),
     ("example.com.evil.com", False), ("notexample.com", False), ("CDN.Example.COM", True)],
)  # fmt: skip
def test_allowed_hosts(host, allowed):
    web = FakeWeb()
    web.pages[f"http://{host.lower().rstrip('.')}/x.png"] = b"ok"
    config = {"allowed_hosts": ["example.com", "*.example.com"]}
    if allowed:
        assert guarded(web, f"http://{host}/x.png", **config) == b"ok"
    else:
        with pytest.raises(MediaError) as info:
            guarded(web, f"http://{host}/x.png", **config)
        assert info.value.code == "forbidden_url" and web.resolved == []


def test_allowed_hosts_still_need_public_addresses():
    web = FakeWeb()
    web.dns["internal.example.com"] = ["10.0.0.7"]
    with pytest.raises(MediaError, match="non-public"):
        guarded(web, "http://internal.example.com/x.png", allowed_hosts=["*.example.com"])


def test_allowed_networks_open_an_operators_own_range_and_only_it():
    web = FakeWeb()
    web.dns = {"store.internal": ["10.1.2.3"], "other.internal": ["10.2.0.1"]}
    web.pages["http://store.internal/x.png"] = b"ok"
    assert guarded(web, "http://store.internal/x.png", allowed_networks=["10.1.0.0/16"]) == b"ok"
    assert web.connections == [("10.1.2.3", None)]
    with pytest.raises(MediaError, match="non-public"):
        guarded(web, "http://other.internal/x.png", allowed_networks=["10.1.0.0/16"])
    # a network written with host bits set names the network around them
    assert guarded(web, "http://store.internal/x.png", allowed_networks=["10.1.9.9/16"]) == b"ok"


def test_a_bad_network_in_the_configuration_is_named():
    with pytest.raises(ValueError, match="10.0.0.0/33"):
        MediaConfig(allowed_networks=["10.0.0.0/8", "10.0.0.0/33"])
    assert MediaConfig(allowed_networks="10.0.0.0/8, 192.168.0.0/16").allowed_networks == [
        "10.0.0.0/8",
        "192.168.0.0/16",
    ]


@pytest.mark.parametrize("ref", ["http://a.test/x.png", "https://a.test/x.png"])
def test_remote_media_can_be_turned_off(ref):
    web = FakeWeb()
    with pytest.raises(MediaError) as info:
        guarded(web, ref, allow_remote_media=False)
    assert info.value.code == "remote_media_disabled" and web.resolved == [] and web.fetched == []
    assert guarded(web, data_url(b"inline"), allow_remote_media=False) == b"inline"


def _slow_pages(web, n, seconds, log):
    async def body():
        log.append(("start", time.monotonic()))
        await asyncio.sleep(seconds)
        yield b"ok"
        log.append(("end", time.monotonic()))

    for i in range(n):
        web.pages[f"http://slow.test/{i}.png"] = lambda: httpx.Response(200, content=body())


def test_a_slow_drip_fetch_meets_its_total_deadline():
    web, log = FakeWeb(), []
    _slow_pages(web, 1, 5.0, log)
    started = time.monotonic()
    with pytest.raises(MediaError) as info:
        guarded(web, "http://slow.test/0.png", fetch_deadline_s=0.3)
    assert info.value.message == "messages[0].content[0]: timed out fetching the URL"
    assert (info.value.param, info.value.code) == ("messages[0].content[0]", "unreachable_url")
    assert time.monotonic() - started < 1.5


def test_a_requests_fetches_share_one_deadline_and_a_bounded_number_of_slots():
    from hcxserve.gateway.fetch import request_budget

    web, log = FakeWeb(), []
    _slow_pages(web, 6, 0.2, log)
    config = MediaConfig(max_concurrent_fetches=2, media_deadline_s=0.5)

    async def run():
        fetcher = web.fetcher(config)
        with request_budget(config):
            return await asyncio.gather(
                *(fetcher.fetch(f"http://slow.test/{i}.png", param=f"p{i}") for i in range(6)),
                return_exceptions=True,
            )

    started = time.monotonic()
    results = asyncio.run(run())
    assert time.monotonic() - started < 1.2
    # two at a time, 0.2 s each: four finish within 0.5 s, the last two are cut by the request's deadline
    assert results[:4] == [b"ok"] * 4
    assert all(isinstance(r, MediaError) and "timed out" in r.message for r in results[4:])
    in_flight = max(sum(1 for kind, t in log if kind == "start" and t <= moment) -
                    sum(1 for kind, t in log if kind == "end" and t <= moment) for _, moment in log)  # fmt: skip
    assert in_flight == 2


def test_pinned_fetch_over_a_real_socket_sends_the_hosts_name(media_server):
    """With the guard on, an operator network opened for loopback, and a faked name: the connection goes to the
    checked address, and the server reads the URL's host in `Host`."""
    base, root = media_server
    port = base.rsplit(":", 1)[1]
    seen = []

    async def resolver(host):
        seen.append(host)
        return ["127.0.0.1"]

    async def run():
        fetcher = MediaFetcher(MediaConfig(allowed_networks=["127.0.0.0/8"]), resolver=resolver)
        try:
            return await fetcher.fetch(f"http://media.test:{port}/red.png", param="p")
        finally:
            await fetcher.aclose()

    assert asyncio.run(run()) == (root / "red.png").read_bytes()
    assert seen == ["media.test"]
