"""Media URLs resent every turn are downloaded once, as far as their server's caching headers allow: kept bytes are
used while fresh, revalidated after (304: no body), and never kept where the headers forbid it."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from hcxserve.config import MediaConfig
from hcxserve.gateway.fetch import MediaFetcher
from hcxserve.gateway.url_cache import URLCache
from hcxserve.protocol.errors import PayloadTooLargeError
from tests.api.harness import FakeWeb

URL = "http://media.test/a.png"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------------------------------------- the cache alone
@pytest.mark.parametrize(
    "headers, fresh_for",
    [
        ({"cache-control": "max-age=60"}, 60),
        ({"cache-control": "max-age=1"}, 1),
        ({"cache-control": "public, max-age=60", "age": "20"}, 40),  # already 20 s old when it left its cache
        ({"cache-control": "max-age=60, s-maxage=10"}, 10),  # a shared cache takes s-maxage
        ({"cache-control": 'max-age="60"'}, 60),
        ({"cache-control": "max-age=60, no-cache", "etag": '"v1"'}, 0),  # kept, but asked about every time
        ({"etag": '"v1"'}, 0),
        ({"last-modified": "Tue, 01 Dec 2026 00:00:00 GMT"}, 0),
    ],
)
def test_what_is_kept_and_for_how_long_without_asking(headers, fresh_for):
    clock = Clock()
    cache = URLCache(1000, clock=clock)
    cache.store(URL, httpx.Headers(headers), b"png")
    assert len(cache) == 1
    if fresh_for:
        clock.now += fresh_for - 1
        assert cache.fresh(URL) == b"png"
        clock.now += 1
    assert cache.fresh(URL) is None
    assert cache.conditional(URL) == (
        {
            **({"If-None-Match": headers["etag"]} if "etag" in headers else {}),
            **({"If-Modified-Since": headers["last-modified"]} if "last-modified" in headers else {}),
        },
        b"png",
    )


@pytest.mark.parametrize(
    "headers",
    [
        {},  # nothing to revalidate with, no lifetime
        {"cache-control": "no-store", "etag": '"v1"'},
        {"cache-control": "private, max-age=60", "etag": '"v1"'},  # for one client: this cache serves them all
        {"cache-control": "max-age=60", "vary": "*"},
        {"cache-control": "max-age=0"},
    ],
)
def test_what_is_not_kept(headers):
    cache = URLCache(1000)
    cache.store(URL, httpx.Headers({"etag": '"old"'}), b"old")
    cache.store(URL, httpx.Headers(headers), b"new")  # a new answer that may not be kept drops the old one too
    assert (len(cache), cache.bytes, cache.conditional(URL)) == (0, 0, ({}, None))


def test_a_304_renews_the_lifetime_and_the_validator():
    clock = Clock()
    cache = URLCache(1000, clock=clock)
    cache.store(URL, httpx.Headers({"etag": '"v1"'}), b"png")
    renewed = httpx.Headers(
        {"etag": '"v2"', "last-modified": "Tue, 01 Dec 2026 00:00:00 GMT", "cache-control": "max-age=5"}
    )
    cache.not_modified(URL, renewed)
    assert cache.fresh(URL) == b"png"
    assert cache.conditional(URL)[0] == {
        "If-None-Match": '"v2"',
        "If-Modified-Since": "Tue, 01 Dec 2026 00:00:00 GMT",
    }
    clock.now += 5
    assert cache.fresh(URL) is None
    cache.not_modified(URL, httpx.Headers())  # a 304 that names no validator keeps those held
    assert cache.conditional(URL)[0] == {
        "If-None-Match": '"v2"',
        "If-Modified-Since": "Tue, 01 Dec 2026 00:00:00 GMT",
    }
    cache.not_modified("http://media.test/other.png", httpx.Headers())  # gone meanwhile: nothing to renew
    assert len(cache) == 1 and cache.revalidated == 3


def test_bounded_in_bytes_least_recently_used_out_first():
    cache = URLCache(10)
    etag = httpx.Headers({"etag": '"x"'})
    cache.store("http://a.test/1", etag, b"1111")
    cache.store("http://a.test/2", etag, b"2222")
    cache.not_modified("http://a.test/1", etag)  # used: the second is now the oldest
    cache.store("http://a.test/3", etag, b"3333")
    assert cache.conditional("http://a.test/2") == ({}, None) and cache.conditional("http://a.test/1")[1] == b"1111"
    assert (len(cache), cache.bytes) == (2, 8)
    cache.store("http://a.test/big", etag, b"x" * 11)  # larger than the whole cache: not kept, nothing evicted
    assert (len(cache), cache.bytes) == (2, 8)
    cache.store("http://a.test/1", etag, b"11")  # replaced: its old size is given back
    assert (len(cache), cache.bytes) == (2, 6)
    cache.store("http://a.test/4", etag, b"4444")  # full to the byte: nothing evicted
    assert (len(cache), cache.bytes) == (3, 10)
    exact = URLCache(4)
    exact.store(URL, etag, b"1234")  # exactly the bound: kept
    assert len(exact) == 1


def test_a_fresh_hit_counts_as_a_use_and_asking_about_an_entry_does_not():
    clock = Clock()
    cache = URLCache(8, clock=clock)
    cache.store("http://a.test/1", httpx.Headers({"cache-control": "max-age=60"}), b"1111")
    cache.store("http://a.test/2", httpx.Headers({"etag": '"x"'}), b"2222")
    assert cache.fresh("http://a.test/1") == b"1111"  # used: the second is now the oldest
    cache.conditional("http://a.test/2")  # only asked about: still the oldest
    cache.store("http://a.test/3", httpx.Headers({"etag": '"x"'}), b"3333")
    assert cache.fresh("http://a.test/1") == b"1111" and cache.conditional("http://a.test/2") == ({}, None)


class RecordingMetrics:
    def __init__(self) -> None:
        self.totals = {"hits": 0, "misses": 0, "evictions": 0, "bytes_delta": 0}
        self.names: set[str] = set()

    def record(self, component: str, **counts: int) -> None:
        self.names.add(component)
        for name, count in counts.items():
            self.totals[name] += count


def test_what_the_cache_reports_adds_up_to_what_it_holds():
    """Hits are fetches answered without a body (fresh or 304), misses those that downloaded one."""
    clock, metrics = Clock(), RecordingMetrics()
    cache = URLCache(10, name="TrackB", metrics=metrics, clock=clock)
    etag = httpx.Headers({"etag": '"x"'})
    cache.store("http://a.test/1", httpx.Headers({"cache-control": "max-age=60"}), b"1111")
    cache.store("http://a.test/2", etag, b"2222")
    cache.fresh("http://a.test/1")
    cache.not_modified("http://a.test/2", etag)
    cache.store("http://a.test/3", etag, b"3333")  # evicts the first
    cache.store("http://a.test/4", httpx.Headers({"cache-control": "no-store"}), b"44")  # downloaded, not kept
    cache.store("http://a.test/2", etag, b"22")  # downloaded again, smaller
    assert metrics.names == {"TrackB"}
    assert metrics.totals == {"hits": 2, "misses": 5, "evictions": 1, "bytes_delta": cache.bytes}
    assert cache.bytes == 6


# ---------------------------------------------------------------------------------------------- through the fetcher
def fetches(web: FakeWeb, *refs: str, options: dict | None = None, **config) -> list[bytes | Exception]:
    """Each ref fetched in turn by one fetcher (one gateway worker), as turns of a conversation would be; `options`:
    the fetcher's own (`name`, `cache_metrics`), `config`: its MediaConfig."""

    async def run():
        fetcher = web.fetcher(MediaConfig(**config), **(options or {}))
        out = []
        try:
            for ref in refs:
                try:
                    out.append(await fetcher.fetch(ref, param="p"))
                except Exception as exc:  # noqa: BLE001 - returned for the test to look at
                    out.append(exc)
        finally:
            await fetcher.aclose()
        return out

    return asyncio.run(run())


def conditional_page(etag_of, body_of, **extra: str):
    def page(request: httpx.Request) -> httpx.Response:
        etag = etag_of()
        if request.headers.get("if-none-match") == etag:
            return httpx.Response(304, headers={"etag": etag, **extra})
        return httpx.Response(200, headers={"etag": etag, **extra}, content=body_of())

    page.wants_request = True
    return page


def test_a_resent_url_is_revalidated_and_its_body_not_downloaded_again():
    web = FakeWeb()
    version = {"etag": '"v1"', "body": b"first"}
    web.pages[URL] = conditional_page(lambda: version["etag"], lambda: version["body"])
    results = fetches(web, URL, URL)
    assert results == [b"first", b"first"]
    assert [r.headers.get("if-none-match") for r in web.requests] == [None, '"v1"']


def test_changed_content_behind_the_url_is_downloaded_again():
    web = FakeWeb()
    version = {"etag": '"v1"', "body": b"first"}
    web.pages[URL] = conditional_page(lambda: version["etag"], lambda: version["body"])

    async def run():
        fetcher = web.fetcher(MediaConfig())
        try:
            first = await fetcher.fetch(URL, param="p")
            version.update(etag='"v2"', body=b"second")
            return first, await fetcher.fetch(URL, param="p"), await fetcher.fetch(URL, param="p")
        finally:
            await fetcher.aclose()

    assert asyncio.run(run()) == (b"first", b"second", b"second")
    assert [r.headers.get("if-none-match") for r in web.requests] == [None, '"v1"', '"v2"']


def test_a_fresh_url_is_not_asked_for_again_not_even_resolved():
    web = FakeWeb()
    web.pages[URL] = conditional_page(lambda: '"v1"', lambda: b"png", **{"cache-control": "max-age=300"})
    assert fetches(web, URL, URL, URL) == [b"png"] * 3
    assert len(web.requests) == 1 and web.resolved == ["media.test"]


def test_a_304_through_the_fetcher_renews_the_kept_bodys_lifetime():
    web = FakeWeb()
    web.pages[URL] = conditional_page(lambda: '"v1"', lambda: b"png", **{"cache-control": "max-age=300"})

    async def run():
        fetcher = web.fetcher(MediaConfig())
        try:
            await fetcher.fetch(URL, param="p")
            fetcher.url_cache._entries.peek(URL).fresh_until = 0  # stale: the next fetch is answered 304
            return [await fetcher.fetch(URL, param="p") for _ in range(3)]
        finally:
            await fetcher.aclose()

    assert asyncio.run(run()) == [b"png"] * 3
    assert [r.headers.get("if-none-match") for r in web.requests] == [None, '"v1"']  # fresh again after the 304


def test_the_fetcher_reports_its_url_cache_under_its_name():
    web, metrics = FakeWeb(), RecordingMetrics()
    web.pages[URL] = conditional_page(lambda: '"v1"', lambda: b"png")
    assert fetches(web, URL, URL, options={"name": "TrackB", "cache_metrics": metrics}) == [b"png"] * 2
    assert metrics.names == {"TrackB"} and metrics.totals["hits"] == 1 and metrics.totals["misses"] == 1


def test_a_kept_body_still_meets_the_requests_size_limit():
    web = FakeWeb()
    web.pages[URL] = conditional_page(lambda: '"v1"', lambda: b"x" * 100, **{"cache-control": "max-age=300"})

    async def run():
        fetcher = web.fetcher(MediaConfig())
        try:
            await fetcher.fetch(URL, param="p", max_bytes=1000)
            with pytest.raises(PayloadTooLargeError) as fresh:
                await fetcher.fetch(URL, param="p", max_bytes=50)  # fresh: no request
            fetcher.url_cache._entries.peek(URL).fresh_until = 0  # now revalidated: a 304
            with pytest.raises(PayloadTooLargeError) as revalidated:
                await fetcher.fetch(URL, param="p", max_bytes=50)
            assert (fresh.value.param, revalidated.value.param) == ("p", "p")
        finally:
            await fetcher.aclose()

    asyncio.run(run())
    assert len(web.requests) == 2


def test_a_304_vouches_for_the_bytes_held_when_asking_even_if_evicted_meanwhile():
    web = FakeWeb()
    web.pages[URL] = conditional_page(lambda: '"v1"', lambda: b"png")

    async def run():
        fetcher = web.fetcher(MediaConfig())
        try:
            await fetcher.fetch(URL, param="p")
            cache = fetcher.url_cache
            conditional = cache.conditional
            cache.conditional = lambda url: (conditional(url), cache._entries.pop(url))[0]  # evicted once asked
            return await fetcher.fetch(URL, param="p"), len(cache)
        finally:
            await fetcher.aclose()

    assert asyncio.run(run()) == (b"png", 0)
    assert [r.headers.get("if-none-match") for r in web.requests] == [None, '"v1"']


def test_a_redirected_url_keeps_its_final_hop_and_still_checks_every_hop():
    web = FakeWeb()
    web.redirect("http://short.test/x", URL)
    web.pages[URL] = conditional_page(lambda: '"v1"', lambda: b"png")
    assert fetches(web, "http://short.test/x", "http://short.test/x") == [b"png", b"png"]
    assert [r.headers.get("if-none-match") for r in web.requests] == [None, None, None, '"v1"']
    assert web.resolved == ["short.test", "media.test"] * 2


def test_a_304_to_an_unconditional_request_is_an_error_status():
    web = FakeWeb()
    web.pages[URL] = httpx.Response(304)
    (result,) = fetches(web, URL)
    assert "HTTP 304" in str(result) and len(web.requests) == 1


def test_off_when_the_bound_is_zero():
    web = FakeWeb()
    web.pages[URL] = conditional_page(lambda: '"v1"', lambda: b"png", **{"cache-control": "max-age=300"})
    assert fetches(web, URL, URL, url_cache_bytes=0) == [b"png", b"png"]
    assert [r.headers.get("if-none-match") for r in web.requests] == [None, None]


def test_a_real_http_server_answers_not_modified(media_server):
    """Python's file server sends Last-Modified and honours If-Modified-Since, as static file servers do."""
    base, root = media_server

    async def run():
        fetcher = MediaFetcher(MediaConfig(allow_private_networks=True))
        try:
            first = await fetcher.fetch(f"{base}/red.png", param="p")
            again = await fetcher.fetch(f"{base}/red.png", param="p")
            return first, again, fetcher.url_cache.revalidated
        finally:
            await fetcher.aclose()

    first, again, revalidated = asyncio.run(run())
    assert first == again == (root / "red.png").read_bytes() and revalidated == 1
