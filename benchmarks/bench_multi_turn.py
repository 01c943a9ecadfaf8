"""Multi-turn speed of the served track B bento (embedded defaults), in one run on one bento.

1. Multi-turn: a 5-turn conversation whose first user turn holds 2 images and 1 audio clip; every turn resends the
   whole conversation, as chat clients do. Baseline: the same conversation with each medium replaced by text of the
   same number of prompt tokens (calibrated against the served model's own `usage`). Each repetition uses fresh
   media and fresh filler text, so turn 1 always misses both caches. Per turn: p50 latency of each, the ratio, the
   media items the encoder caches sent to an encoder (`hcx_encoder_cache_misses_total` on `/metrics`), and the
   prompt tokens vLLM's prefix cache served (`usage.prompt_tokens_details.cached_tokens`).
2. Event loop: p50 latency of small text requests alone, then while `--uploaders` clients keep posting requests
   with a `--upload-mb` inline image (one picture, encoded once: what is left is the gateway's own work on the body:
   reading, parsing, base64 decoding, hashing, then a 1-token completion). The uploaders run in processes of their
   own, so their sending does not slow the process that times the small requests. The same 1-token completion is
   also sent straight to vLLM, which splits a slowdown into vLLM's share and the gateway's. `--placement`: see
   `benchmarks/placement.py`.

    .venv/bin/python benchmarks/bench_multi_turn.py --out benchmarks/results/multi_turn.md
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import placement  # noqa: E402
from benchmarks.bench_encoders import machine, publish  # noqa: E402
from hcxserve.tooling.testing import serve_bento  # noqa: E402

MODEL = "track_b_model"
PLAIN = {"chat_template_kwargs": {"skip_reasoning": True}}
QUESTIONS = ["Describe the pictures and the sound.", "Which picture is brighter?", "What did you hear?",
             "Summarise what we discussed.", "Anything else?"]  # fmt: skip


def png(seed: int, width: int = 448, height: int = 336) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, 3)
    y, x = np.mgrid[0:height, 0:width]
    pixels = (base + np.stack([x * 60 / width, y * 60 / height, (x + y) * 30 / (width + height)], -1)) % 256
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def noise_png(megabytes: float, seed: int = 0) -> bytes:
    from PIL import Image

    side = int((megabytes * 1e6 / 3) ** 0.5)
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def wav(seed: int, seconds: float = 3.0, rate: int = 16000) -> bytes:
    import soundfile

    t = np.arange(int(seconds * rate)) / rate
    signal = 0.3 * np.sin(2 * np.pi * (300 + 10 * seed) * t) + np.random.default_rng(seed).normal(0, 0.02, t.shape)
    buffer = io.BytesIO()
    soundfile.write(buffer, signal.astype(np.float32), rate, format="WAV")
    return buffer.getvalue()


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def media_parts(seed: int) -> list[dict]:
    return [
        {"type": "image_url", "image_url": {"url": data_url(png(2 * seed), "image/png")}},
        {"type": "image_url", "image_url": {"url": data_url(png(2 * seed + 1), "image/png")}},
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav(seed)).decode(), "format": "wav"}},
    ]


FILLER_WORDS = ["the", "and", "for", "you", "with", "that", "this", "have", "from", "they"]


def filler(tokens: int, seed: int) -> dict:
    """Text of `tokens` prompt tokens (each word one token), another word for every seed so that no prefix is
    shared between repetitions."""
    return {"type": "text", "text": " ".join([FILLER_WORDS[seed % len(FILLER_WORDS)]] * tokens)}


def conversation(first: list[dict], turns: int) -> list[dict]:
    messages = [{"role": "user", "content": [*first, {"type": "text", "text": QUESTIONS[0]}]}]
    for turn in range(1, turns):
        messages += [
            {"role": "assistant", "content": f"Noted, turn {turn}."},
            {"role": "user", "content": QUESTIONS[turn]},
        ]
    return messages


def body(messages: list[dict], tokens: int) -> dict:
    return {"model": MODEL, "messages": messages, "max_tokens": tokens, "min_tokens": tokens, "ignore_eos": True,
            "temperature": 0.0, **PLAIN}  # fmt: skip


async def post(client: httpx.AsyncClient, url: str, payload: dict) -> tuple[float, dict]:
    start = time.perf_counter()
    response = await client.post(url, json=payload)
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    return elapsed, response.json()


async def encoder_misses(client: httpx.AsyncClient, base: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = (await client.get(f"{base}/metrics")).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "hcx_encoder_cache_misses_total"
    )


async def calibrate(client: httpx.AsyncClient, url: str, seed: int) -> int:
    """How many filler words stand for the media of `seed`: the same prompt length, to the token."""

    async def tokens(first: list[dict]) -> int:
        return (await post(client, url, body(conversation(first, 1), 1)))[1]["usage"]["prompt_tokens"]

    target, words = await tokens(media_parts(seed)), 0
    for _ in range(3):
        got = await tokens([filler(words, seed)])
        if got == target:
            return words
        words += target - got
    raise RuntimeError(f"filler calibration did not converge ({got} vs {target} tokens)")


async def multi_turn(client: httpx.AsyncClient, base: str, args: argparse.Namespace) -> list[dict]:
    url = f"{base}/v1/chat/completions"
    words = await calibrate(client, url, seed=len(FILLER_WORDS) - 1)
    rows = [{"media": [], "text": [], "misses": [], "cached_media": [], "cached_text": []} for _ in range(args.turns)]
    for rep in range(min(args.repetitions, len(FILLER_WORDS) - 1)):
        first_media, first_text = media_parts(rep), [filler(words, rep)]
        for turn in range(args.turns):
            before = await encoder_misses(client, base)
            media_s, media = await post(client, url, body(conversation(first_media, turn + 1), args.tokens))
            rows[turn]["misses"].append(await encoder_misses(client, base) - before)
            text_s, text = await post(client, url, body(conversation(first_text, turn + 1), args.tokens))
            assert media["usage"]["prompt_tokens"] == text["usage"]["prompt_tokens"], (media["usage"], text["usage"])
            rows[turn]["media"].append(media_s)
            rows[turn]["text"].append(text_s)
            rows[turn]["cached_media"].append(media["usage"]["prompt_tokens_details"]["cached_tokens"])
            rows[turn]["cached_text"].append(text["usage"]["prompt_tokens_details"]["cached_tokens"])
            rows[turn]["prompt"] = media["usage"]["prompt_tokens"]
    return rows


async def small_requests(client: httpx.AsyncClient, base: str, llm_url: str, n: int) -> dict[str, list[float]]:
    """Latencies of 1-token chat completions through the gateway and straight to vLLM, and of model lists (the
    gateway alone)."""
    chat, direct, models, hello = [], [], [], body([{"role": "user", "content": "Hi"}], 1)
    for _ in range(n):
        chat.append((await post(client, f"{base}/v1/chat/completions", hello))[0])
        direct.append((await post(client, f"{llm_url}/v1/chat/completions", hello))[0])
        start = time.perf_counter()
        (await client.get(f"{base}/v1/models")).raise_for_status()
        models.append(time.perf_counter() - start)
    return {"chat": chat, "direct": direct, "models": models}


def upload_loop(url: str, content: bytes, status: int, stop, times) -> None:
    """One uploader, in a process of its own (on this process's cores): sending 27 MB is CPU work that must not run
    on the event loop (or under the GIL) of the process timing the small requests."""

    async def upload() -> None:
        async with httpx.AsyncClient(timeout=600) as client:
            while not stop.is_set():
                start = time.perf_counter()
                response = await client.post(url, content=content, headers={"content-type": "application/json"})
                if response.status_code != status:
                    raise SystemExit(f"an upload got {response.status_code}, not {status}: {response.text[:300]}")
                times.append(time.perf_counter() - start)

    asyncio.run(upload())


# (label, generation bounds, expected status) of the uploads: answered with one token; or refused by vLLM's request
# validation (min_tokens above max_tokens) before any prefill, so that what is left is the gateway's own work
UPLOAD_MODES = (
    ("answered (1-token completion)", {"max_tokens": 1, "min_tokens": 1}, 200),
    ("refused by vLLM before any compute", {"max_tokens": 1, "min_tokens": 2}, 400),
)


async def event_loop(client: httpx.AsyncClient, base: str, llm_url: str, args: argparse.Namespace) -> dict:
    url = f"{base}/v1/chat/completions"
    image = data_url(noise_png(args.upload_mb), "image/png")
    parts = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "What is this?"}]
    await post(client, url, body([{"role": "user", "content": parts}], 1))  # encoded once: later uploads hit the cache
    alone = await small_requests(client, base, llm_url, args.n)
    modes = {}
    spawn = multiprocessing.get_context("spawn")
    for label, bounds, status in UPLOAD_MODES:
        upload = {**body([{"role": "user", "content": parts}], 1), **bounds}
        content = json.dumps(upload).encode()
        with spawn.Manager() as manager:
            stop, uploads = manager.Event(), manager.list()
            uploaders = [spawn.Process(target=upload_loop, args=(url, content, status, stop, uploads))
                         for _ in range(args.uploaders)]  # fmt: skip
            for process in uploaders:
                process.start()
            await asyncio.sleep(5.0)  # every uploader has started and has a request in flight
            loaded = await small_requests(client, base, llm_url, args.n)
            stop.set()
            for process in uploaders:
                process.join()
            modes[label] = {"loaded": loaded, "uploads": list(uploads)}
    return {"alone": alone, "modes": modes, "upload_bytes": len(content)}


def p50(values: list[float]) -> float:
    return statistics.median(values)


def report(
    rows: list[dict] | None, loop: dict | None, args: argparse.Namespace, ready_s: float, where: str
) -> list[str]:
    lines = [
        "# Multi-turn and event-loop benchmark (track B bento, embedded defaults)",
        "",
        f"Machine: {machine()}. Bento ready in {ready_s:.0f} s.",
        f"Command: `.venv/bin/python benchmarks/bench_multi_turn.py --part {args.part} --repetitions "
        f"{args.repetitions} --tokens {args.tokens} --n {args.n} --uploaders {args.uploaders} "
        f"--upload-mb {args.upload_mb:g} --placement {args.placement}`",
        f"Placement: {where}.",
    ]
    return lines + (turns_section(rows, args) if rows else []) + (loop_section(loop, args) if loop else [])


def turns_section(rows: list[dict], args: argparse.Namespace) -> list[str]:
    lines = [
        "",
        f"## A {args.turns}-turn conversation resending 2 images and 1 audio clip (first user turn)",
        "",
        f"p50 over {args.repetitions} repetitions (fresh media each), {args.tokens} generated tokens per turn. "
        "Baseline: the same conversation with the media replaced by text of the same prompt length.",
        "",
        "| turn | prompt tokens | media p50 (s) | text p50 (s) | media / text | encoder misses | cached tokens "
        "(media) | cached tokens (text) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for turn, row in enumerate(rows, 1):
        lines.append(
            f"| {turn} | {row['prompt']} | {p50(row['media']):.3f} | {p50(row['text']):.3f} | "
            f"{p50(row['media']) / p50(row['text']):.2f}x | {sum(row['misses']) / len(row['misses']):.1f} | "
            f"{p50(row['cached_media']):.0f} | {p50(row['cached_text']):.0f} |"
        )
    later_media = sum(p50(r["media"]) for r in rows[1:])
    later_text = sum(p50(r["text"]) for r in rows[1:])
    misses_later = sum(sum(r["misses"]) for r in rows[1:])
    return lines + [
        "",
        f"Turns 2-{args.turns}: media / text = **{later_media / later_text:.2f}x** (sum of p50s; target <= 1.15x); "
        f"encoder calls after turn 1: **{misses_later:.0f}** (target 0).",
    ]


def loop_section(loop: dict, args: argparse.Namespace) -> list[str]:
    alone = loop["alone"]
    lines = [
        "",
        f"## Small requests while {args.uploaders} clients post {loop['upload_bytes'] / 1e6:.1f} MB requests "
        "(an inline image)",
        "",
        "| uploads | small requests | alone p50 (s) | during the uploads p50 (s) | p95 (s) | ratio of p50s |",
        "|---|---|---|---|---|---|",
    ]
    kinds = (
        ("chat", "1-token chat completion (gateway + vLLM)"),
        ("direct", "the same, straight to vLLM"),
        ("models", "GET /v1/models (the gateway alone)"),
    )
    for mode, result in loop["modes"].items():
        loaded = result["loaded"]
        for kind, label in kinds:
            lines.append(
                f"| {mode} | {label} | {p50(alone[kind]):.4f} | {p50(loaded[kind]):.4f} | "
                f"{np.percentile(loaded[kind], 95):.4f} | **{p50(loaded[kind]) / p50(alone[kind]):.2f}x** |"
            )
    added = {mode: p50(r["loaded"]["chat"]) - p50(r["loaded"]["direct"]) for mode, r in loop["modes"].items()}
    lines += [
        "",
        "What the gateway adds to the chat completion (p50 through it minus p50 straight to vLLM): "
        f"alone {1e3 * (p50(alone['chat']) - p50(alone['direct'])):.1f} ms; "
        + "; ".join(f"{mode} {1e3 * value:.1f} ms" for mode, value in added.items())
        + ".",
        "",
        "Target: <= 1.2x. Uploads completed meanwhile:",
    ]
    for mode, result in loop["modes"].items():
        lines.append(f"- {mode}: {len(result['uploads'])}, p50 {p50(result['uploads']):.2f} s each")
    return lines


async def run(args: argparse.Namespace) -> list[str]:
    logs = Path(args.log_dir)
    logs.mkdir(parents=True, exist_ok=True)
    overrides = {"b.media.max_image_bytes": int(args.upload_mb * 1.2e6) + (1 << 20)}
    overrides |= placement.overrides(args.placement, "b")
    bento = serve_bento("bentos.track_b:Gateway", logs / "bento.log", tracks=["b"], overrides=overrides)
    try:
        ready = bento.wait_ready(f"{bento.url}/readyz", timeout=900)
        await asyncio.sleep(5)
        where = placement.apply(args.placement, bento.proc.pid)
        async with httpx.AsyncClient(timeout=600) as client:
            rows = await multi_turn(client, bento.url, args) if args.part in ("all", "turns") else None
            loop = (
                await event_loop(client, bento.url, bento.llm_urls["b"], args) if args.part in ("all", "loop") else None
            )
    finally:
        bento.stop()
    return report(rows, loop, args, ready, where)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=8, help="generated tokens per turn")
    parser.add_argument("--n", type=int, default=30, help="small text requests per phase")
    parser.add_argument("--uploaders", type=int, default=4)
    parser.add_argument("--upload-mb", type=float, default=20.0)
    parser.add_argument("--part", choices=["all", "turns", "loop"], default="all")
    parser.add_argument("--placement", choices=placement.PLACEMENTS, default="shared")
    parser.add_argument("--log-dir", default="/tmp/hcx-bench-multi-turn")
    parser.add_argument("--out", help="write the report here (markdown)")
    args = parser.parse_args()
    publish(asyncio.run(run(args)), args.out)


if __name__ == "__main__":
    main()
