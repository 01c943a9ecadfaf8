"""Media URLs resent every turn: what fetching them costs the gateway with the URL cache (`media.url_cache_bytes`)
and without it, in-process, in one run.

A loopback file server (Python's, which sends `Last-Modified` and answers `If-Modified-Since` with a 304, as static
file servers do) serves `--images` PNGs of `--mb` each; a `MediaFetcher` (the gateway's) fetches all of them once
per turn for `--turns` turns, as a conversation that resends its pictures does, `--repetitions` times with a fresh
fetcher (a fresh cache) each time. Per turn: p50 time to fetch the turn's images, and the body bytes the server
sent. Two networks: loopback as it is, and a remote origin stood in for by the same server throttled to `--mbps`
with `--rtt-ms` added to each request (a modelled network, stated as such in the report).

    .venv/bin/python benchmarks/bench_url_cache.py --out benchmarks/results/url_cache.md
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import http.server
import io
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_encoders import machine, publish  # noqa: E402
from hcxserve.config import MediaConfig  # noqa: E402
from hcxserve.gateway.fetch import MediaFetcher  # noqa: E402


def noise_png(megabytes: float, seed: int) -> bytes:
    """A PNG of about `megabytes` (noise does not compress)."""
    from PIL import Image

    side = int((megabytes * 1e6 / 3) ** 0.5)
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class OriginHandler(http.server.SimpleHTTPRequestHandler):
    """Python's file server, counting body bytes, optionally throttled: `rtt_s` before each answer, `bytes_per_s`
    while sending a body."""

    rtt_s = 0.0
    bytes_per_s = 0.0
    sent = 0
    statuses: list[int] = []

    def send_head(self):
        if self.rtt_s:
            time.sleep(self.rtt_s)
        return super().send_head()

    def copyfile(self, source, outputfile) -> None:
        chunk = 64 << 10
        while data := source.read(chunk):
            outputfile.write(data)
            OriginHandler.sent += len(data)
            if self.bytes_per_s:
                time.sleep(len(data) / self.bytes_per_s)

    def log_request(self, code="-", size="-") -> None:
        OriginHandler.statuses.append(int(code))

    def log_message(self, *args) -> None:
        pass


async def conversation(urls: list[str], turns: int, cache_bytes: int) -> list[tuple[float, int]]:
    """(seconds, body bytes sent) per turn, each turn fetching every URL side by side as the gateway does."""
    fetcher = MediaFetcher(MediaConfig(allow_private_networks=True, url_cache_bytes=cache_bytes))
    out = []
    try:
        for _ in range(turns):
            sent = OriginHandler.sent
            start = time.perf_counter()
            await asyncio.gather(*(fetcher.fetch(url, param="p", max_bytes=64 << 20) for url in urls))
            out.append((time.perf_counter() - start, OriginHandler.sent - sent))
    finally:
        await fetcher.aclose()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--mb", type=float, default=4.0, help="size of each image")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument("--mbps", type=float, default=100.0, help="the modelled remote origin's bandwidth")
    parser.add_argument("--rtt-ms", type=float, default=30.0, help="the modelled remote origin's round trip")
    parser.add_argument("--out", help="write the report here (markdown)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="hcx-bench-url-cache-"))
    for i in range(args.images):
        (root / f"image{i}.png").write_bytes(noise_png(args.mb, seed=i))
    size = sum(p.stat().st_size for p in root.iterdir())
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(OriginHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    urls = [f"http://127.0.0.1:{server.server_address[1]}/image{i}.png" for i in range(args.images)]

    networks = {"loopback": (0.0, 0.0), "modelled remote origin": (args.rtt_ms / 1e3, args.mbps * 1e6 / 8)}
    lines = [
        "# URL cache benchmark (gateway fetcher, in-process)",
        "",
        f"Machine: {machine()}.",
        f"Command: `.venv/bin/python benchmarks/bench_url_cache.py --images {args.images} --mb {args.mb} "
        f"--turns {args.turns} --repetitions {args.repetitions} --mbps {args.mbps} --rtt-ms {args.rtt_ms}`",
        "",
        f"{args.images} PNGs, {size / 1e6:.2f} MB together, fetched side by side every turn from Python's file "
        f"server on loopback. The modelled remote origin is the same server adding {args.rtt_ms:g} ms before each "
        f"answer and sending bodies at {args.mbps:g} Mbit/s: a model of a network, not a measured one.",
        "",
        "| network | URL cache | turn | p50 (ms) | body bytes sent per turn | ratio to no cache |",
        "|---|---|---:|---:|---:|---:|",
    ]
    summary = []
    for network, (rtt_s, bytes_per_s) in networks.items():
        OriginHandler.rtt_s, OriginHandler.bytes_per_s = rtt_s, bytes_per_s
        runs = {True: [], False: []}
        for _ in range(args.repetitions):
            for cached in (False, True):  # alternating, so that drift hits both alike
                runs[cached].append(asyncio.run(conversation(urls, args.turns, (256 << 20) if cached else 0)))
        p50 = {
            cached: [statistics.median(run[t][0] for run in runs[cached]) for t in range(args.turns)] for cached in runs
        }
        sent = {cached: [runs[cached][-1][t][1] for t in range(args.turns)] for cached in runs}
        for cached in (False, True):
            for t in range(args.turns):
                ratio = p50[True][t] / p50[False][t]
                lines.append(
                    f"| {network} | {'on' if cached else 'off'} | {t + 1} | {p50[cached][t] * 1e3:.1f} | "
                    f"{sent[cached][t]:,} | {f'{ratio:.3f}x' if cached else ''} |"
                )
        later = slice(1, args.turns)
        summary.append(
            f"- {network}: turns 2-{args.turns}, sum of p50s with the cache over without: "
            f"**{sum(p50[True][later]) / sum(p50[False][later]):.3f}x** "
            f"({sum(p50[True][later]) * 1e3:.1f} vs {sum(p50[False][later]) * 1e3:.1f} ms); body bytes "
            f"{sum(sent[True][later]):,} vs {sum(sent[False][later]):,}"
        )
    server.shutdown()
    statuses = {code: OriginHandler.statuses.count(code) for code in sorted(set(OriginHandler.statuses))}
    lines += ["", *summary, "", f"Server answers over the whole run: {statuses}."]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
