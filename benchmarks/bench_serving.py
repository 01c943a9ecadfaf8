"""Track A serving benchmark: the served bento vs the bare vLLM engine, in one run, on the same model.

Phases (each a fresh process tree, nothing else running):
1. `bentoml serve` of track A (gateway -> VisionEncoder + LLM). Measured: time to ready, RSS of the whole tree.
   Text requests are sent alternately through the gateway and straight to the LLM's own vLLM server (the same
   engine, so the ratio is the bento's overhead alone); image requests through the gateway.
2. Bare vLLM serving the *unified* checkpoint as a whole VLM (its own vision tower, images as pixels, same
   engine settings): image requests, the baseline for the bento's image path.

Every request is greedy with a fixed output length (`min_tokens` = `max_tokens`, `ignore_eos`) so both sides
generate the same number of tokens. Prints a markdown table; `--out` also writes it to a file.

    .venv/bin/python benchmarks/bench_serving.py --out benchmarks/results/serving.md
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hcxserve.config import load_track_config  # noqa: E402
from hcxserve.testing import ServedProcess, free_port  # noqa: E402
from hcxserve.vllm_args import vllm_server_command  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
IMAGE_PROMPT = "Describe this image in detail."


def test_image_data_url(width: int = 448, height: int = 336) -> str:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (90, 140, 200))
    draw = ImageDraw.Draw(image)
    for i in range(0, width, 32):
        draw.rectangle([i, height // 3, i + 16, 2 * height // 3], fill=(230, 200, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def body(model: str, content, tokens: int) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": tokens,
        "min_tokens": tokens,
        "ignore_eos": True,
        "temperature": 0.0,
    }


async def timed_post(client: httpx.AsyncClient, url: str, payload: dict) -> float:
    start = time.perf_counter()
    response = await client.post(url, json=payload)
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    assert response.json()["usage"]["completion_tokens"] == payload["max_tokens"]
    return elapsed


async def latencies(url: str, payload: dict, n: int) -> list[float]:
    async with httpx.AsyncClient(timeout=600) as client:
        await timed_post(client, url, payload)  # warm-up (also fills the prefix cache both sides share)
        return [await timed_post(client, url, payload) for _ in range(n)]


async def throughput(url: str, payload: dict, concurrency: int, total: int) -> float:
    """Requests per second with `concurrency` requests in flight."""
    async with httpx.AsyncClient(timeout=600) as client:
        queue = list(range(total))

        async def worker() -> None:
            while queue:
                queue.pop()
                await timed_post(client, url, payload)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return total / (time.perf_counter() - start)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


async def run(args: argparse.Namespace) -> list[str]:
    config = load_track_config("a")
    model = config.llm.served_model_name
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "1", "BENTOML_DISABLE_GPU_ALLOCATION": "1", "HF_HUB_OFFLINE": "1"}
    image = test_image_data_url()
    text_payload = body(model, PROMPT, args.tokens)
    image_payload = body(
        model,
        [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": IMAGE_PROMPT}],
        args.tokens,
    )
    logs = Path(args.log_dir)
    logs.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, float]] = {}

    # ---- phase 1: the bento, and its own vLLM engine directly
    port, llm_port = free_port(), free_port()
    bento = ServedProcess(
        [str(ROOT / ".venv/bin/bentoml"), "serve", "bentos.track_a:TrackAGateway", "--port", str(port)],
        {**env, "HCX_OVERRIDES": f"llm.port={llm_port}"},
        logs / "bento.log",
    )
    try:
        ready = bento.wait_ready(f"http://127.0.0.1:{port}/readyz", timeout=600)
        await asyncio.sleep(5)
        rss = bento.rss_by_process()
        gateway = f"http://127.0.0.1:{port}/v1/chat/completions"
        direct = f"http://127.0.0.1:{llm_port}/v1/chat/completions"
        bento_text, vllm_text = [], []
        for _ in range(args.rounds):  # alternate so drift on a shared machine hits both sides alike
            bento_text += await latencies(gateway, text_payload, args.n)
            vllm_text += await latencies(direct, text_payload, args.n)
        rows["text, bento"] = {"p50": pct(bento_text, 50), "p95": pct(bento_text, 95)}
        rows["text, bare vLLM (same engine)"] = {"p50": pct(vllm_text, 50), "p95": pct(vllm_text, 95)}
        rows["text, bento"]["rps"] = await throughput(gateway, text_payload, args.concurrency, args.total)
        rows["text, bare vLLM (same engine)"]["rps"] = await throughput(
            direct, text_payload, args.concurrency, args.total
        )
        bento_image = await latencies(gateway, image_payload, args.n * args.rounds)
        rows["image, bento"] = {"p50": pct(bento_image, 50), "p95": pct(bento_image, 95)}
        rows["image, bento"]["rps"] = await throughput(gateway, image_payload, args.concurrency, args.total)
    finally:
        bento.stop()

    # ---- phase 2: bare vLLM running the whole VLM (its own vision tower) from the unified checkpoint
    vllm_port = free_port()
    cmd = vllm_server_command(config, model=str(ROOT / args.unified), port=vllm_port, embeds_only=False)
    bare = ServedProcess(cmd, {**env, **config.llm.env}, logs / "vllm_full.log")
    try:
        bare_ready = bare.wait_ready(f"http://127.0.0.1:{vllm_port}/health", timeout=600)
        await asyncio.sleep(5)
        bare_rss = sum(bare.rss_by_process().values())
        url = f"http://127.0.0.1:{vllm_port}/v1/chat/completions"
        vllm_image = await latencies(url, image_payload, args.n * args.rounds)
        rows["image, bare vLLM (whole VLM, pixels)"] = {"p50": pct(vllm_image, 50), "p95": pct(vllm_image, 95)}
        rows["image, bare vLLM (whole VLM, pixels)"]["rps"] = await throughput(
            url, image_payload, args.concurrency, args.total
        )
    finally:
        bare.stop()

    return report(args, rows, ready, rss, bare_ready, bare_rss)


def report(args, rows, ready, rss, bare_ready, bare_rss) -> list[str]:
    text_b, text_v = rows["text, bento"], rows["text, bare vLLM (same engine)"]
    img_b, img_v = rows["image, bento"], rows["image, bare vLLM (whole VLM, pixels)"]
    lines = [
        f"Track A serving benchmark ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, embedded default model,",
        f"{args.tokens} output tokens per request, {args.n * args.rounds} sequential requests for latency, "
        f"{args.total} requests at concurrency {args.concurrency} for throughput).",
        "",
        "| path | p50 latency (s) | p95 latency (s) | throughput (req/s) |",
        "|---|---:|---:|---:|",
        *[f"| {name} | {r['p50']:.3f} | {r['p95']:.3f} | {r['rps']:.3f} |" for name, r in rows.items()],
        "",
        "| ratio | value | target |",
        "|---|---:|---|",
        f"| text p50 latency, bento / bare vLLM | {text_b['p50'] / text_v['p50']:.3f} | <= 1.05 |",
        f"| text throughput at concurrency {args.concurrency}, bento / bare vLLM "
        f"| {text_b['rps'] / text_v['rps']:.3f} | >= 0.95 |",
        f"| image p50 latency, bento / whole-VLM vLLM | {img_b['p50'] / img_v['p50']:.3f} | <= 1.15 |",
        f"| image throughput at concurrency {args.concurrency}, bento / whole-VLM vLLM "
        f"| {img_b['rps'] / img_v['rps']:.3f} | (none) |",
        "",
        f"Bento ready after {ready:.1f} s (target <= 90 s); RSS of the whole bento {sum(rss.values()) / 1024:.2f} GB "
        "(target <= 6 GB):",
        "",
        "| process | RSS (MB) |",
        "|---|---:|",
        *[f"| {name} | {mb:.0f} |" for name, mb in sorted(rss.items(), key=lambda kv: -kv[1])],
        "",
        f"Bare vLLM (whole VLM) ready after {bare_ready:.1f} s, RSS {bare_rss / 1024:.2f} GB.",
        "",
        "Command: `.venv/bin/python benchmarks/bench_serving.py " + " ".join(sys.argv[1:]) + "`",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--n", type=int, default=5, help="sequential requests per round and path")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--total", type=int, default=24)
    parser.add_argument("--unified", default="models/embedded/unified/track_a")
    parser.add_argument("--log-dir", default="benchmarks/.data/logs")
    parser.add_argument("--out")
    args = parser.parse_args()
    lines = asyncio.run(run(args))
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
