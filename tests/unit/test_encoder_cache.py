"""The encoder cache on its own: keys, byte bound and LRU order, sharing one call between concurrent requests,
and what happens when that call fails or its first caller goes away."""

from __future__ import annotations

import asyncio
import os

import pytest

from hcxserve.config import load_track
from hcxserve.gateway.encoder_cache import (
    EncoderCache,
    checkpoint_fingerprint,
    encoding_size,
    track_caches,
)
from hcxserve.protocol.payloads import ImageInput, VideoInput, VisionEmbedding, VisionEncoding

pytestmark = pytest.mark.anyio  # the async tests run on asyncio (anyio's pytest plugin)

EMBEDS = "E" * 1000  # each encoding holds 1000 base64 characters


def encoding(tag: str, times: int = 1) -> VisionEncoding:
    """An encoding that starts with `tag` and holds `times` the usual base64 characters."""
    embeds = (tag + EMBEDS * times)[: len(EMBEDS) * times]
    return VisionEncoding(embedding=VisionEmbedding(embeds_b64=embeds, rows=1, dim=8, dtype="f", grid_thw=(1, 2, 2)))


SIZE = encoding_size(encoding("x"))


class Encoder:
    """Encodes each item as its bytes (an item named b"big..." to `len(name) - 2` times the usual size); records
    each call; `gate`, when set, holds calls until it opens."""

    def __init__(self) -> None:
        self.calls: list[list] = []
        self.gate: asyncio.Event | None = None
        self.failure: Exception | None = None

    async def __call__(self, method: str, items: list) -> list[VisionEncoding]:
        self.calls.append(items)
        if self.gate is not None:
            await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        return [
            VisionEncoding(error="refused") if item.data == b"bad" else encoding(*sized(item.data)) for item in items
        ]


def sized(name: bytes) -> tuple[str, int]:
    return name.decode(), len(name) - 2 if name.startswith(b"big") else 1


def keep(result: VisionEncoding) -> bool:
    return result.error is None


def cache(max_entries: float = 10, fingerprint: str = "ckpt") -> EncoderCache:
    return EncoderCache("TrackA-VisionEncoder", max_bytes=int(max_entries * SIZE), fingerprint=fingerprint)


def images(*names: bytes) -> list[ImageInput]:
    return [ImageInput(data=name) for name in names]


async def test_a_hit_is_the_result_of_the_miss_and_skips_the_encoder():
    store, encoder = cache(), Encoder()
    first = await store.encode("encode", images(b"a", b"b"), encoder, keep)
    again = await store.encode("encode", images(b"b", b"a", b"c"), encoder, keep)
    assert again[0] is first[1] and again[1] is first[0]  # the very objects: byte-identical embeddings
    assert [[item.data for item in call] for call in encoder.calls] == [[b"a", b"b"], [b"c"]]
    assert (store.hits, store.misses, len(store)) == (2, 3, 3)


async def test_the_same_item_twice_in_one_call_is_encoded_once():
    store, encoder = cache(), Encoder()
    results = await store.encode("encode", images(b"a", b"a", b"b", b"a"), encoder, keep)
    assert [[item.data for item in call] for call in encoder.calls] == [[b"a", b"b"]]
    assert results[0] is results[1] is results[3] and results[2].embedding.embeds_b64.startswith("b")


async def test_refusals_are_not_kept():
    store, encoder = cache(), Encoder()
    for _ in range(2):
        results = await store.encode("encode", images(b"bad"), encoder, keep)
        assert results[0].error == "refused"
    assert len(encoder.calls) == 2 and len(store) == 0


async def test_eviction_by_bytes_least_recently_used_first():
    store, encoder = cache(max_entries=2.5), Encoder()
    await store.encode("encode", images(b"a", b"b"), encoder, keep)
    await store.encode("encode", images(b"a"), encoder, keep)  # a is now the most recently used
    await store.encode("encode", images(b"c"), encoder, keep)  # over the bound: b goes
    assert (len(store), store.bytes, store.evictions) == (2, 2 * SIZE, 1)
    encoder.calls.clear()
    await store.encode("encode", images(b"a", b"c"), encoder, keep)
    assert encoder.calls == []
    await store.encode("encode", images(b"b"), encoder, keep)
    assert [[item.data for item in call] for call in encoder.calls] == [[b"b"]]


async def test_an_entry_larger_than_the_cache_is_not_kept():
    store, encoder = cache(max_entries=0.5), Encoder()
    await store.encode("encode", images(b"a"), encoder, keep)
    assert (len(store), store.bytes) == (0, 0)


@pytest.mark.parametrize(
    "first, second",
    [
        (VideoInput(data=b"v", fps=2.0, max_pixels=100), VideoInput(data=b"v", fps=1.0, max_pixels=100)),
        (VideoInput(data=b"v", fps=2.0, max_pixels=100), VideoInput(data=b"v", fps=2.0, max_pixels=50)),
        (VideoInput(frames=[b"a", b"b"], fps=2.0, max_pixels=100), VideoInput(frames=[b"ab"], fps=2.0, max_pixels=100)),
        (
            VideoInput(frames=[b"a", b"b"], fps=2.0, max_pixels=100),
            VideoInput(frames=[b"b", b"a"], fps=2.0, max_pixels=100),
        ),
        (VideoInput(data=b"v", fps=2.0, max_pixels=100), VideoInput(frames=[b"v"], fps=2.0, max_pixels=100)),
    ],
)
async def test_a_changed_option_or_content_misses(first, second):
    store = cache()
    assert (await store.keys("encode_videos", [first])) != (await store.keys("encode_videos", [second]))
    assert (await store.keys("encode_videos", [first])) == (await store.keys("encode_videos", [first.model_copy()]))


@pytest.mark.parametrize("size", [1, 2 << 20], ids=["small", "hashed-in-a-thread"])
async def test_the_method_and_the_checkpoint_are_part_of_the_key(size):
    item = images(b"a" * size)
    assert await cache().keys("encode", item) != await cache().keys("encode_videos", item)
    assert await cache(fingerprint="one").keys("encode", item) != await cache(fingerprint="two").keys("encode", item)


async def test_large_items_are_hashed_off_the_event_loop(monkeypatch):
    threads = []
    real = asyncio.to_thread

    async def to_thread(fn, *args):
        threads.append(fn)
        return await real(fn, *args)

    monkeypatch.setattr(asyncio, "to_thread", to_thread)
    store = cache()
    small = await store.keys("encode", images(b"a" * 1000))
    large = await store.keys("encode", images(b"a" * (2 << 20)))
    assert len(threads) == 1 and small != large
    await store.keys("encode", images(b"a" * ((1 << 20) - 1)))  # a byte short of 1 MiB
    assert len(threads) == 1
    await store.keys("encode", images(b"a" * (1 << 20)))  # 1 MiB exactly
    assert len(threads) == 2
    frames = VideoInput(frames=[b"f" * (600 << 10)] * 2, fps=2.0, max_pixels=100)  # over 1 MiB together
    await store.keys("encode_videos", [frames])
    assert len(threads) == 3


def test_the_fingerprint_follows_the_checkpoint_files_and_the_settings(tmp_path):
    track = load_track("a", profile="embedded")
    settings = (track.components.vision_encoder, track.media)
    (tmp_path / "config.json").write_text("{}")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"1234")
    before = checkpoint_fingerprint(tmp_path, *settings)
    assert checkpoint_fingerprint(tmp_path, *settings) == before
    os.utime(weights, ns=(1, 1))  # the same size, rewritten
    assert checkpoint_fingerprint(tmp_path, *settings) != before
    changed = track.media.model_copy(update={"video_max_frames": 3})
    assert checkpoint_fingerprint(tmp_path, track.components.vision_encoder, changed) != checkpoint_fingerprint(
        tmp_path, *settings
    )


def test_track_caches_follow_the_configuration():
    track = load_track("b", profile="embedded")
    assert set(track_caches(track)) == {"vision_encoder", "audio_encoder"}
    off = load_track(
        "b", profile="embedded", overrides={"tracks": {"b": {"components": {"audio_encoder": {"cache_bytes": 0}}}}}
    )
    caches = track_caches(off)
    assert set(caches) == {"vision_encoder"}
    assert caches["vision_encoder"].max_bytes == off.components.vision_encoder.cache_bytes


@pytest.mark.parametrize(
    "override",
    [
        {"components": {"vision_encoder": {"dtype": "float16"}}},  # the component's settings
        {"media": {"max_image_pixels": 1 << 16}},  # the track's media settings
    ],
    ids=["component setting", "media setting"],
)
async def test_track_caches_key_by_component_and_settings_and_report_to_the_metrics(override):
    track = load_track("b", profile="embedded")
    metrics = RecordingMetrics()
    caches = track_caches(track, metrics)
    vision = caches["vision_encoder"]
    assert vision.component == track.service_name("vision_encoder") == "TrackB-VisionEncoder"
    key = await vision.keys("encode", images(b"a"))
    assert key != await caches["audio_encoder"].keys("encode", images(b"a"))
    changed = track_caches(load_track("b", profile="embedded", overrides={"tracks": {"b": override}}))
    assert await changed["vision_encoder"].keys("encode", images(b"a")) != key
    await vision.encode("encode", images(b"a"), Encoder(), keep)
    assert metrics.records and {component for component, _ in metrics.records} == {"TrackB-VisionEncoder"}


# ---------------------------------------------------------------------------------------------- concurrency
async def test_concurrent_requests_for_the_same_item_share_one_call():
    store, encoder = cache(), Encoder()
    encoder.gate = asyncio.Event()
    requests = [asyncio.ensure_future(store.encode("encode", images(b"a", b"x"), encoder, keep))]
    await asyncio.sleep(0)
    requests += [asyncio.ensure_future(store.encode("encode", images(b"a"), encoder, keep)) for _ in range(3)]
    requests.append(asyncio.ensure_future(store.encode("encode", images(b"a", b"x"), encoder, keep)))
    await asyncio.sleep(0.01)
    encoder.gate.set()
    results = await asyncio.gather(*requests)
    assert [[item.data for item in call] for call in encoder.calls] == [[b"a", b"x"]]
    assert all(r[0] is results[0][0] for r in results)
    assert results[-1][1] is results[0][1]
    assert (store.hits, store.misses) == (5, 2)  # each item waited for counts as a hit


async def test_the_shared_call_goes_on_when_its_first_caller_is_cancelled():
    store, encoder = cache(), Encoder()
    encoder.gate = asyncio.Event()
    first = asyncio.ensure_future(store.encode("encode", images(b"a"), encoder, keep))
    await asyncio.sleep(0.01)
    second = asyncio.ensure_future(store.encode("encode", images(b"a"), encoder, keep))
    await asyncio.sleep(0.01)
    first.cancel()
    await asyncio.sleep(0.01)
    encoder.gate.set()
    assert (await second)[0].embedding.embeds_b64.startswith("a")
    assert first.cancelled() and len(encoder.calls) == 1 and len(store) == 1


async def test_a_failed_call_fails_its_waiters_and_keeps_nothing():
    store, encoder = cache(), Encoder()
    encoder.gate, encoder.failure = asyncio.Event(), ConnectionError("encoder gone")
    requests = [asyncio.ensure_future(store.encode("encode", images(b"a"), encoder, keep)) for _ in range(2)]
    await asyncio.sleep(0.01)
    encoder.gate.set()
    outcomes = await asyncio.gather(*requests, return_exceptions=True)
    assert all(isinstance(o, ConnectionError) for o in outcomes) and len(store) == 0
    encoder.failure, encoder.gate = None, None
    assert (await store.encode("encode", images(b"a"), encoder, keep))[0].error is None  # tried again
    assert len(encoder.calls) == 2


async def test_a_call_cancelled_from_below_fails_its_waiters_instead_of_stranding_them():
    """The encoder call itself ends cancelled (its client was torn down): every request waiting on it gets the
    cancellation at once, none waits forever, and the next request calls again."""
    store, encoder = cache(), Encoder()
    encoder.gate, encoder.failure = asyncio.Event(), asyncio.CancelledError()
    requests = [asyncio.ensure_future(store.encode("encode", images(b"a"), encoder, keep)) for _ in range(2)]
    await asyncio.sleep(0.01)
    encoder.gate.set()
    outcomes = await asyncio.wait_for(asyncio.gather(*requests, return_exceptions=True), timeout=5)
    assert all(isinstance(o, asyncio.CancelledError) for o in outcomes) and len(store) == 0
    encoder.failure, encoder.gate = None, None
    assert (await store.encode("encode", images(b"a"), encoder, keep))[0].error is None
    assert len(encoder.calls) == 2


async def test_a_wrong_number_of_results_is_an_error_not_a_short_answer():
    store = cache()

    async def short(method, items):
        return []

    with pytest.raises(RuntimeError, match="0 results for 1 items"):
        await store.encode("encode", images(b"a"), short, keep)


class RecordingMetrics:
    def __init__(self) -> None:
        self.records: list[tuple[str, dict]] = []

    def record(self, component: str, **counts: int) -> None:
        self.records.append((component, counts))

    def total(self, name: str) -> int:
        return sum(counts[name] for _, counts in self.records)


async def test_what_the_cache_reports_adds_up_to_what_it_holds():
    metrics, encoder = RecordingMetrics(), Encoder()
    store = EncoderCache("TrackA-VisionEncoder", max_bytes=3 * SIZE, fingerprint="ckpt", metrics=metrics)
    await store.encode("encode", images(b"a", b"b", b"c"), encoder, keep)  # full to the byte: nothing evicted
    assert (len(store), store.bytes, store.evictions) == (3, 3 * SIZE, 0)
    await store.encode("encode", images(b"a", b"b"), encoder, keep)
    await store.encode("encode", images(b"bigg"), encoder, keep)  # twice the size: the two oldest go
    assert (len(store), store.evictions) == (2, 2)
    await store.encode("encode", images(b"b"), encoder, keep)
    assert (store.hits, store.misses, store.evictions) == (3, 4, 2)
    assert {component for component, _ in metrics.records} == {"TrackA-VisionEncoder"}
    assert (metrics.total("hits"), metrics.total("misses")) == (store.hits, store.misses)
    assert (metrics.total("evictions"), metrics.total("bytes_delta")) == (store.evictions, store.bytes)
    assert store.bytes == SIZE + encoding_size(encoding("bigg", 2))


async def test_an_entry_larger_than_the_cache_evicts_nothing():
    store, encoder = cache(max_entries=2), Encoder()
    await store.encode("encode", images(b"a", b"b"), encoder, keep)
    await store.encode("encode", images(b"biggg"), encoder, keep)  # 3 entries' worth: kept nowhere
    assert (len(store), store.bytes, store.evictions) == (2, 2 * SIZE, 0)
    single = cache(max_entries=1)
    await single.encode("encode", images(b"a"), encoder, keep)  # exactly the bound: kept
    assert len(single) == 1


def test_an_entrys_size_counts_its_codes():
    with_codes = encoding("x").model_copy(deep=True)
    with_codes.embedding.discrete_codes = list(range(100))
    assert encoding_size(with_codes) - encoding_size(encoding("x")) == 8 * 100
