import asyncio
import base64
import socket

import httpx
import pytest

from hcxserve.config import MediaConfig
from hcxserve.media import MediaFetcher, decode_image, probe_image
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
    assert fetch(data_url(png)).data == png
    assert fetch(base64.b64encode(png).decode()).data == png


def test_http_url_from_a_local_server(media_server):
    base, root = media_server
    assert fetch(f"{base}/red.png", allow_private_networks=True).data == (root / "red.png").read_bytes()


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
    assert guarded(web, "https://media.test/a.png").data == b"png bytes"
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
    assert guarded(web, "http://a.test/start").data == b"final"
    assert web.resolved == ["a.test", "a.test", "b.test"]


@pytest.mark.parametrize("limit", [0, 1, 3])
def test_redirect_limit(limit):
    def chain_of(n):
        web = FakeWeb()
        for k in range(n):
            web.redirect(f"http://r{k}.test/", f"http://r{k + 1}.test/")
        web.pages[f"http://r{n}.test/"] = b"end"
        return web

    assert guarded(chain_of(limit), "http://r0.test/", max_redirects=limit).data == b"end"
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
    assert len(guarded(web, "http://a.test/exact.png", max_image_bytes=100).data) == 100
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
    assert guarded(web, "http://internal.test/a.png", allow_private_networks=True).data == b"ok"
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
