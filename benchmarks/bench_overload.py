"""Overload and soak benchmark of the served track A bento (embedded defaults), in one run.

1. Capacity: the gateway admits `--concurrent` chat requests with `--queued` more waiting (set through the
   environment, as a deployment would). Baseline: `capacity` (= concurrent + queued) requests at once, each
   generating 16 tokens; their latencies.
2. Burst: 10 x capacity requests at once. Those beyond capacity must be refused at once (429 with `Retry-After`,
   an OpenAI error object, within 100 ms); the admitted ones keep their latency (p50 ratio to the baseline). Sent
   twice: by httpx, opening its connections in the burst (the client's own work, one Python process on the same two
   cores, is in the figures), then as raw requests written at once on connections opened beforehand, each timed
   from its write (what the server takes). Shedding is also timed one request at a time while capacity stays full
   (what a client of a saturated gateway sees).
3. Soak: `--soak` requests (default 10,000) at 16 concurrent, a mix a busy gateway sees: 1-token completions,
   model lists and refused requests (a bad parameter); the RSS of the gateway worker and of the whole tree is
   sampled every 1,000 requests. BentoML's timeout middleware keeps every request's timer (and the context it
   captured, ~5 KB) until the service's traffic timeout passes, finished or not, so RSS climbs for one timeout
   window and is flat after it: the soak runs with `--timeout` (60 s) for the gateway and the LLM so that the
   window fills early in the run.

`--placement split` runs the gateway and the client on their own core(s), vLLM on another
(`benchmarks/placement.py`).

    .venv/bin/python benchmarks/bench_overload.py --out benchmarks/results/overload.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import placement  # noqa: E402
from benchmarks.bench_encoders import machine, publish  # noqa: E402
from hcxserve.tooling.testing import serve_bento  # noqa: E402

MODEL = "track_a_model"


def chat(tokens: int) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a short story about a lighthouse keeper."}],
        "max_tokens": tokens,
        "min_tokens": tokens,
        "ignore_eos": True,
        "temperature": 0.0,
    }


async def timed(client: httpx.AsyncClient, method: str, url: str, **kwargs) -> tuple[float, httpx.Response]:
    start = time.perf_counter()
    response = await client.request(method, url, **kwargs)
    return time.perf_counter() - start, response


def p(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def burst(client: httpx.AsyncClient, n: int) -> list[tuple[float, httpx.Response]]:
    return await asyncio.gather(*(timed(client, "POST", "/a/v1/chat/completions", json=chat(16)) for _ in range(n)))


async def burst_on_open_connections(url: str, headers: dict, n: int) -> list[tuple[float, int, dict, bytes]]:
    """`n` requests written at once on connections opened beforehand, each timed from its write to its whole
    response: what the server takes to answer, without the client's own cost of opening `n` connections (one
    Python process on the same two cores). Returns (seconds, status, headers, body) per request."""
    parts = urlsplit(url)
    body = json.dumps(chat(16)).encode()
    head = ["POST /a/v1/chat/completions HTTP/1.1", f"Host: {parts.netloc}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]  # fmt: skip
    request = ("\r\n".join(head) + "\r\n\r\n").encode() + body
    connections = [await asyncio.open_connection(parts.hostname, parts.port) for _ in range(n)]

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        writer.write(request)
        start = time.perf_counter()
        status_line, *lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        fields = dict(line.split(": ", 1) for line in lines if line)
        fields = {k.lower(): v for k, v in fields.items()}
        content = await reader.readexactly(int(fields["content-length"]))
        elapsed = time.perf_counter() - start
        writer.close()
        return elapsed, int(status_line.split()[1]), fields, content

    return await asyncio.gather(*(one(r, w) for r, w in connections))


def burst_rows(label: str, results: list[tuple[float, int, dict, bytes]], baseline_p50: float) -> list[str]:
    """Table rows for one burst: the admitted requests' p50 against the baseline's, the shed ones' latencies and
    whether each carried `Retry-After` and an OpenAI error object, anything else."""
    admitted = [t for t, status, _, _ in results if status == 200]
    shed = [(t, fields, content) for t, status, fields, content in results if status == 429]
    other = [status for _, status, _, _ in results if status not in (200, 429)]
    shed_times = [t for t, _, _ in shed]
    well_formed = all(
        fields.get("retry-after") == "2" and json.loads(content)["error"]["code"] == "server_busy"
        for _, fields, content in shed
    )
    return [
        f"| {label}: admitted | {len(admitted)} | p50 {statistics.median(admitted):.2f} s "
        f"(**{statistics.median(admitted) / baseline_p50:.2f}x** the baseline p50) |",
        f"| {label}: shed with 429 | {len(shed)} | p50 {1000 * statistics.median(shed_times):.1f} ms, "
        f"p99 {1000 * p(shed_times, 0.99):.1f} ms, max {1000 * max(shed_times):.1f} ms; Retry-After and OpenAI "
        f"error object on all: {well_formed} |",
        f"| {label}: anything else | {len(other)} | {other or 'none'} |",
    ]


def gateway_rss(root_pid: int) -> tuple[float, float]:
    """(gateway worker RSS, whole tree RSS) in MB."""
    root = psutil.Process(root_pid)
    tree = [root, *root.children(recursive=True)]
    gateway = sum(q.memory_info().rss for q in tree if "--service-name Gateway" in " ".join(q.cmdline()))
    return gateway / 2**20, sum(q.memory_info().rss for q in tree) / 2**20


async def shed_one_by_one(client: httpx.AsyncClient, capacity: int, n: int) -> tuple[list[float], list[int]]:
    """Fill capacity with long requests, then time `n` more sent one after another."""
    long = [asyncio.create_task(client.post("/a/v1/chat/completions", json=chat(64))) for _ in range(capacity)]
    await asyncio.sleep(1.0)  # every slot and queue place taken
    times, statuses = [], []
    for _ in range(n):
        elapsed, response = await timed(client, "POST", "/a/v1/chat/completions", json=chat(16))
        times.append(elapsed)
        statuses.append(response.status_code)
    await asyncio.gather(*long)
    return times, statuses


async def soak(client: httpx.AsyncClient, total: int, root_pid: int) -> tuple[list[tuple[int, float, float]], dict]:
    kinds = [("POST", "/a/v1/chat/completions", {"json": chat(1)})] * 7 + [
        ("GET", "/v1/models", {}),
        ("GET", "/a/v1/models", {}),
        ("POST", "/a/v1/chat/completions", {"json": {**chat(1), "temperature": 7}}),
    ]
    samples, statuses, done = [], {}, 0
    queue = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(kinds[i % len(kinds)])

    async def worker():
        nonlocal done
        while not queue.empty():
            method, url, kwargs = queue.get_nowait()
            _, response = await timed(client, method, url, **kwargs)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            done += 1
            if done % 1000 == 0:
                samples.append((done, time.monotonic() - started, *gateway_rss(root_pid)))

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(16)))
    return samples, statuses


async def run(args) -> list[str]:
    key = secrets.token_hex(8)
    overrides = {
        "gateway.max_concurrent_requests": args.concurrent,
        "gateway.max_queued_requests": args.queued,
        "gateway.retry_after_s": 2,
        "gateway.timeout_s": args.timeout,
        "a.llm.timeout_s": args.timeout,
        **placement.overrides(args.placement, "a"),
    }
    bento = serve_bento("bentos.track_a:Gateway", Path(args.log), tracks=["a"], overrides=overrides, api_key=key)
    try:
        bento.wait_ready(f"{bento.url}/readyz", 900)
        where = placement.apply(args.placement, bento.proc.pid)
        limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)

        def client() -> httpx.AsyncClient:
            # one per phase: a keep-alive connection left idle by the previous phase may be closed by the server
            # just as it is reused, and a POST is not retried
            return httpx.AsyncClient(base_url=bento.url, headers=bento.headers, timeout=600, limits=limits)

        capacity = args.concurrent + args.queued
        async with client() as warm:
            await burst(warm, 4)  # warm-up
            baseline = await burst(warm, capacity)
        assert all(r.status_code == 200 for _, r in baseline), [r.text for _, r in baseline if r.status_code != 200]
        async with client() as fresh:
            storm = [(t, r.status_code, r.headers, r.content) for t, r in await burst(fresh, 10 * capacity)]
        opened = await burst_on_open_connections(bento.url, bento.headers, 10 * capacity)
        async with client() as fresh:
            single_shed, single_statuses = await shed_one_by_one(fresh, capacity, 50)
        async with client() as fresh:
            samples, statuses = await soak(fresh, args.soak, bento.proc.pid) if args.soak else ([], {})
    finally:
        bento.stop()
    base = [t for t, _ in baseline]
    lines = [
        f"Overload and soak benchmark ({time.strftime('%Y-%m-%d')}, track A bento, embedded default models).",
        "",
        f"Machine: {machine()}. Gateway capacity: {args.concurrent} running + {args.queued} queued = {capacity}.",
        f"Placement: {where}.",
        "",
        "| phase | requests | result |",
        "|---|---:|---|",
        f"| baseline (at capacity, 16 tokens each) | {capacity} | p50 {statistics.median(base):.2f} s, "
        f"max {max(base):.2f} s |",
        *burst_rows("10x burst, connections opened in the burst", storm, statistics.median(base)),
        *burst_rows("10x burst on open connections", opened, statistics.median(base)),
        f"| at capacity, one at a time | {len(single_shed)} | statuses {sorted(set(single_statuses))}; p50 "
        f"{1000 * statistics.median(single_shed):.1f} ms, max {1000 * max(single_shed):.1f} ms |",
    ]
    if not samples:
        return lines
    return lines + [
        f"| soak (16 concurrent) | {args.soak} | {samples[-1][1]:.0f} s, statuses {dict(sorted(statuses.items()))} |",
        "",
        f"Soak RSS (MB) every 1,000 requests (traffic timeout {args.timeout:g} s): gateway worker / whole tree",
        "",
        "| requests | s | gateway | tree |",
        "|---:|---:|---:|---:|",
        *[f"| {n} | {t:.0f} | {g:.0f} | {tree:.0f} |" for n, t, g, tree in samples],
        "",
        *window_summary(samples, args.timeout),
    ]


def window_summary(samples: list[tuple[int, float, float, float]], timeout: float) -> list[str]:
    """RSS change over the samples taken once one timeout window (plus slack) has passed."""
    settled = [s for s in samples if s[1] >= 1.5 * timeout]
    if len(settled) < 2:
        return [f"The soak ended before {1.5 * timeout:g} s: no settled window to report."]
    first, last = settled[0], settled[-1]
    return [
        f"From {first[0]} requests ({first[1]:.0f} s) to {last[0]} ({last[1]:.0f} s), after the first timeout window: "
        f"gateway RSS {last[2] - first[2]:+.1f} MB, whole tree {last[3] - first[3]:+.1f} MB."
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--queued", type=int, default=8)
    parser.add_argument("--soak", type=int, default=10_000, help="0: no soak")
    parser.add_argument("--placement", choices=placement.PLACEMENTS, default="shared")
    parser.add_argument("--timeout", type=float, default=60.0, help="traffic timeout of the gateway and the LLM")
    parser.add_argument("--log", default="/tmp/bench_overload.log")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    publish(asyncio.run(run(args)), args.out)


if __name__ == "__main__":
    main()
