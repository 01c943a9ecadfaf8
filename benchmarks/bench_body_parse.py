"""What a gateway worker spends on one large upload's body before any encoder work, in-process: parsing and
validating a chat request with a `--mb` inline image, then decoding the image from it (what `MediaFetcher.fetch`
does), and the longest time another thread of the process waited for the GIL meanwhile (a thread ticking every
0.2 ms with a 0.2-ms switch interval: the event loop is such a thread).

Baseline, measured in the same run: the whole body parsed as it was before large media was cut out of it
(`hcxserve/gateway/inline_media.py`), i.e. msgspec building a Python str of the data: URL, which the fetcher then
decodes.

    .venv/bin/python benchmarks/bench_body_parse.py --out benchmarks/results/body_parse.md
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_encoders import machine, publish  # noqa: E402
from hcxserve.config import MediaConfig  # noqa: E402
from hcxserve.gateway import body  # noqa: E402
from hcxserve.gateway.fetch import MediaFetcher  # noqa: E402
from hcxserve.protocol.openai import ChatCompletionRequest  # noqa: E402


def whole_body(raw: bytes) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(body._parse_whole(raw))


def media_cut_out(raw: bytes) -> ChatCompletionRequest:
    return body.parse_request(raw, max_depth=64)


class GILWatch:
    """The longest gap between the ticks of a thread that sleeps 0.2 ms between them."""

    def __init__(self) -> None:
        self.longest, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True)

    def _tick(self) -> None:
        last = time.perf_counter()
        while not self._stop.is_set():
            now = time.perf_counter()
            self.longest = max(self.longest, now - last)
            last = now
            time.sleep(0.0002)

    def __enter__(self) -> GILWatch:
        self._thread.start()
        time.sleep(0.02)
        self.longest = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


async def measure(parse, raw: bytes, image: bytes, fetcher: MediaFetcher, runs: int) -> dict[str, float]:
    parse_s, total_s, waits = [], [], []
    for _ in range(runs):
        with GILWatch() as watch:
            start = time.perf_counter()
            request = parse(raw)
            parsed = time.perf_counter()
            data = await fetcher.fetch(request.messages[0].content[0].image_url.url, param="p")
            done = time.perf_counter()
        assert data == image
        parse_s.append(parsed - start)
        total_s.append(done - start)
        waits.append(watch.longest)
    return {"parse": statistics.median(parse_s), "total": statistics.median(total_s),
            "gil": statistics.median(waits)}  # fmt: skip


async def compare(raw: bytes, image: bytes, runs: int) -> tuple[dict[str, float], dict[str, float]]:
    """Both paths, interleaved (so that a slower stretch of a shared machine falls on both), in one event loop."""
    fetcher = MediaFetcher(MediaConfig(max_image_bytes=len(image)))
    results = {whole_body: [], media_cut_out: []}
    for _ in range(3):
        for parse, rounds in results.items():
            rounds.append(await measure(parse, raw, image, fetcher, runs))
    await fetcher.aclose()
    return tuple({key: statistics.median(r[key] for r in rounds) for key in ("parse", "total", "gil")}
                 for rounds in results.values())  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=20.0, help="size of the inline image")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--out", help="write the report here (markdown)")
    args = parser.parse_args()
    sys.setswitchinterval(0.0002)
    image = os.urandom(int(args.mb * (1 << 20)))  # the fetcher does not look inside: any bytes will do
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]
    raw = json.dumps({"messages": [{"role": "user", "content": parts}], "max_tokens": 1}).encode()
    before, after = asyncio.run(compare(raw, image, args.runs))
    rows = [("parse and validate", "parse"), ("parse, validate, decode the image", "total"),
            ("longest GIL wait of another thread", "gil")]  # fmt: skip
    publish([
        "# A large upload's body in the gateway (in-process)",
        "",
        f"Machine: {machine()}. Body: {len(raw) / 1e6:.1f} MB (a {args.mb:g} MiB inline image); p50 of "
        f"3 x {args.runs} runs each, interleaved.",
        f"Command: `.venv/bin/python benchmarks/bench_body_parse.py --mb {args.mb:g} --runs {args.runs}`",
        "",
        "| ms | whole body parsed (before) | media left in the body's bytes | ratio |",
        "|---|---:|---:|---:|",
        *[f"| {label} | {1e3 * before[key]:.1f} | {1e3 * after[key]:.1f} | {after[key] / before[key]:.2f}x |"
          for label, key in rows],  # fmt: skip
    ], args.out)


if __name__ == "__main__":
    main()
