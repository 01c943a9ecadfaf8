"""Serving benchmark: the served bento vs the bare vLLM engine, in one run, on the same model.

Track A (`--track a`, the default). Phases (each a fresh process tree, nothing else running):
1. `bentoml serve` of track A (gateway -> VisionEncoder + LLM). Measured: time to ready, RSS of the whole tree.
   Text requests are sent alternately through the gateway and straight to the LLM's own vLLM server (the same
   engine, so the ratio is the bento's overhead alone); image requests through the gateway.
2. Bare vLLM serving the *unified* checkpoint as a whole VLM (its own vision tower, images as pixels, same
   engine settings): image requests, the baseline for the bento's image path.

Track B (`--track b`): one `bentoml serve` of track B (gateway -> VisionEncoder + AudioEncoder + LLM), time to
ready and RSS of the whole tree. Text, audio (a 3-s WAV) and image (a 224x224 PNG) requests are sent alternately
through the gateway and straight to the LLM's own vLLM server. The direct audio and image requests carry the very
`audio_embeds` / `image_embeds` parts the gateway would send, computed once before the bento starts by the real
encoder service classes (in this process), so the media ratios are the cost of decoding + encoding + the gateway.
Reasoning is off on both sides (`skip_reasoning`; straight to vLLM also `thinking: false`, as the gateway sends it).

Every request is greedy with a fixed output length (`min_tokens` = `max_tokens`, `ignore_eos`) so both sides
generate the same number of tokens. Prints a markdown table; `--out` also writes it to a file.

    .venv/bin/python benchmarks/bench_serving.py --out benchmarks/results/serving.md
    .venv/bin/python benchmarks/bench_serving.py --track b --out benchmarks/results/serving_track_b.md
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_encoders import machine, publish, test_png, test_wav  # noqa: E402
from hcxserve.config import TrackConfig, load_track  # noqa: E402
from hcxserve.llm.args import vllm_server_command  # noqa: E402
from hcxserve.tooling.testing import ServedProcess, free_port, serve_bento, serve_env  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
IMAGE_PROMPT = "Describe this image in detail."
AUDIO_PROMPT = "What do you hear in this recording?"


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def with_question(part: dict, question: str) -> list[dict]:
    return [part, {"type": "text", "text": question}]


def body(model: str, content, tokens: int, **extra) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": tokens,
        "min_tokens": tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        **extra,
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


async def prompt_tokens(url: str, payload: dict) -> int:
    async with httpx.AsyncClient(timeout=600) as client:
        response = await client.post(url, json=payload)
        response.raise_for_status()
        return response.json()["usage"]["prompt_tokens"]


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def spread(values: list[float]) -> dict[str, float]:
    return {"p50": pct(values, 50), "p95": pct(values, 95)}


async def paired(
    bento: tuple[str, dict], vllm: tuple[str, dict], args: argparse.Namespace
) -> tuple[dict[str, float], dict[str, float]]:
    """Latency of two (url, payload) paths, sequential requests in alternating rounds (so drift on a shared machine
    hits both sides alike), then each one's throughput at `args.concurrency`."""
    bento_times, vllm_times = [], []
    for _ in range(args.rounds):
        bento_times += await latencies(*bento, args.n)
        vllm_times += await latencies(*vllm, args.n)
    bento_row, vllm_row = spread(bento_times), spread(vllm_times)
    bento_row["rps"] = await throughput(*bento, args.concurrency, args.total)
    vllm_row["rps"] = await throughput(*vllm, args.concurrency, args.total)
    return bento_row, vllm_row


@contextlib.contextmanager
def served_bento(target: str, track: str, log_path: Path):
    """`bentoml serve` of `target`, ready and settled; yields it (`url`: the gateway) and the base URL of the
    track's LLM component's own vLLM server. Stopped, whole tree, on the way out."""
    bento = serve_bento(target, log_path, tracks=[track])
    try:
        bento.wait_ready(f"{bento.url}/readyz", timeout=600)
        time.sleep(5)
        yield bento, bento.llm_urls[track]
    finally:
        bento.stop()


async def run(args: argparse.Namespace) -> list[str]:
    config = load_track("a")
    model = config.llm.served_model_name
    image = {"type": "image_url", "image_url": {"url": data_url(test_png(448, 336))}}
    text_payload = body(model, PROMPT, args.tokens)
    image_payload = body(model, with_question(image, IMAGE_PROMPT), args.tokens)
    logs = Path(args.log_dir)
    logs.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, float]] = {}

    # ---- phase 1: the bento, and its own vLLM engine directly
    with served_bento("bentos.track_a:Gateway", "a", logs / "bento.log") as (bento, llm_url):
        rss = bento.rss_by_process()
        gateway = f"{bento.url}/v1/chat/completions"
        direct = f"{llm_url}/v1/chat/completions"
        rows["text, bento"], rows["text, bare vLLM (same engine)"] = await paired(
            (gateway, text_payload), (direct, text_payload), args
        )
        bento_image = await latencies(gateway, image_payload, args.n * args.rounds)
        rows["image, bento"] = spread(bento_image)
        rows["image, bento"]["rps"] = await throughput(gateway, image_payload, args.concurrency, args.total)
    ready = bento.ready_after_s

    # ---- phase 2: bare vLLM running the whole VLM (its own vision tower) from the unified checkpoint
    vllm_port = free_port()
    cmd = vllm_server_command(config, model=str(ROOT / args.unified), port=vllm_port, embeds_only=False)
    bare = ServedProcess(cmd, serve_env(**config.llm.env), logs / "vllm_full.log")
    try:
        bare_ready = bare.wait_ready(f"http://127.0.0.1:{vllm_port}/health", timeout=600)
        await asyncio.sleep(5)
        bare_rss = sum(bare.rss_by_process().values())
        url = f"http://127.0.0.1:{vllm_port}/v1/chat/completions"
        vllm_image = await latencies(url, image_payload, args.n * args.rounds)
        rows["image, bare vLLM (whole VLM, pixels)"] = spread(vllm_image)
        rows["image, bare vLLM (whole VLM, pixels)"]["rps"] = await throughput(
            url, image_payload, args.concurrency, args.total
        )
    finally:
        bare.stop()

    return report(args, rows, ready, rss, bare_ready, bare_rss)


def latency_table(rows: dict[str, dict[str, float]]) -> list[str]:
    return [
        "| path | p50 latency (s) | p95 latency (s) | throughput (req/s) |",
        "|---|---:|---:|---:|",
        *[f"| {name} | {r['p50']:.3f} | {r['p95']:.3f} | {r['rps']:.3f} |" for name, r in rows.items()],
    ]


def rss_table(rss: dict[str, float]) -> list[str]:
    return [
        "| process | RSS (MB) |",
        "|---|---:|",
        *[f"| {name} | {mb:.0f} |" for name, mb in sorted(rss.items(), key=lambda kv: -kv[1])],
    ]


def command_line(script: str = "bench_serving.py") -> str:
    return f"Command: `.venv/bin/python benchmarks/{script} " + " ".join(sys.argv[1:]) + "`"


def report(args, rows, ready, rss, bare_ready, bare_rss) -> list[str]:
    text_b, text_v = rows["text, bento"], rows["text, bare vLLM (same engine)"]
    img_b, img_v = rows["image, bento"], rows["image, bare vLLM (whole VLM, pixels)"]
    lines = [
        f"Track A serving benchmark ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, embedded default model,",
        f"{args.tokens} output tokens per request, {args.n * args.rounds} sequential requests for latency, "
        f"{args.total} requests at concurrency {args.concurrency} for throughput).",
        "",
        *latency_table(rows),
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
        *rss_table(rss),
        "",
        f"Bare vLLM (whole VLM) ready after {bare_ready:.1f} s, RSS {bare_rss / 1024:.2f} GB.",
        "",
        command_line(),
    ]
    return lines


# ---------------------------------------------------------------------------------------------- track B
def precomputed_parts(config: TrackConfig, png: bytes, wav: bytes) -> tuple[dict, dict]:
    """The upstream `image_embeds` and `audio_embeds` content parts the gateway sends vLLM for these files, made
    here by the real encoder pipelines (in this process, the one `encode([item])` call the gateway makes) and the
    gateway's own part builders."""
    from hcxserve.encoders.audio import AudioEncoderPipeline
    from hcxserve.encoders.vision import VisionEncoderPipeline
    from hcxserve.gateway.modalities import Audio, Images
    from hcxserve.protocol.payloads import AudioInput, ImageInput

    components = config.components
    vision = VisionEncoderPipeline.from_pretrained(
        config.component_dir(components.vision_encoder.folder), components.vision_encoder, config.media
    )
    audio = AudioEncoderPipeline.from_pretrained(
        config.component_dir(components.audio_encoder.folder), components.audio_encoder
    )
    (image,) = vision.encode([ImageInput(data=png)])
    (clip,) = audio.encode([AudioInput(data=wav, max_seconds=config.media.max_audio_seconds)])
    if image.embedding is None or clip.embedding is None:
        raise RuntimeError(f"encoders refused the test media: {image.error or clip.error}")
    return Images.upstream_part(image.embedding), Audio.upstream_part(clip.embedding)


async def run_track_b(args: argparse.Namespace) -> list[str]:
    config = load_track("b")
    model = config.llm.served_model_name
    png, wav = test_png(224, 224), test_wav(3.0)
    image_embeds, audio_embeds = precomputed_parts(config, png, wav)  # before the bento: nothing else running
    image = {"type": "image_url", "image_url": {"url": data_url(png)}}
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}
    # (through the gateway, straight to vLLM): the same prompt once rendered, the same output length
    contents = {
        "text": (PROMPT, PROMPT),
        "audio": (with_question(audio, AUDIO_PROMPT), with_question(audio_embeds, AUDIO_PROMPT)),
        "image": (with_question(image, IMAGE_PROMPT), with_question(image_embeds, IMAGE_PROMPT)),
    }
    to_gateway = {"chat_template_kwargs": {"skip_reasoning": True}}
    to_vllm = {"chat_template_kwargs": {"thinking": False, "skip_reasoning": True}}
    logs = Path(args.log_dir)
    logs.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, float]] = {}
    prompts: dict[str, int] = {}
    with served_bento("bentos.track_b:Gateway", "b", logs / "bento_track_b.log") as (bento, llm_url):
        rss = bento.rss_by_process()
        for kind, (via_gateway, direct) in contents.items():
            gateway = (f"{bento.url}/b/v1/chat/completions", body(model, via_gateway, args.tokens, **to_gateway))
            vllm = (f"{llm_url}/v1/chat/completions", body(model, direct, args.tokens, **to_vllm))
            prompts[kind], direct_prompt = await prompt_tokens(*gateway), await prompt_tokens(*vllm)
            if prompts[kind] != direct_prompt:  # both sides must render the very same prompt
                raise RuntimeError(f"{kind}: {prompts[kind]} prompt tokens via the gateway, {direct_prompt} straight")
            print(f"track B: {kind}, {prompts[kind]} prompt tokens", file=sys.stderr, flush=True)
            rows[f"{kind}, bento"], rows[vllm_label(kind)] = await paired(gateway, vllm, args)
    return report_track_b(args, rows, prompts, bento.ready_after_s, rss)


def vllm_label(kind: str) -> str:
    return f"{kind}, bare vLLM (same engine{'' if kind == 'text' else ', precomputed embeddings'})"


def report_track_b(args, rows, prompts, ready, rss) -> list[str]:
    pairs = [(kind, rows[f"{kind}, bento"], rows[vllm_label(kind)]) for kind in prompts]
    return [
        f"Track B serving benchmark ({time.strftime('%Y-%m-%d')}, embedded default model `models/embedded/track_b`, "
        f"{args.tokens} output tokens per request, {args.n * args.rounds} sequential requests for latency, "
        f"{args.total} requests at concurrency {args.concurrency} for throughput; reasoning off).",
        "",
        f"Machine: {machine()}.",
        "",
        "Inputs: text only; a 3-s 16-kHz mono WAV (`input_audio`) + a question; a 224x224 PNG (data URL) + a "
        "question. Straight to vLLM, the media go as the `audio_embeds` / `image_embeds` parts the gateway would "
        "send, computed once beforehand, so a media ratio is the cost of decoding + encoding + the gateway.",
        "",
        *latency_table(rows),
        "",
        "| input | prompt tokens (both sides) | p50, bento / bare vLLM | p50, bento - bare vLLM (ms) "
        f"| p95, bento / bare vLLM | throughput at concurrency {args.concurrency}, bento / bare vLLM |",
        "|---|---:|---:|---:|---:|---:|",
        *[
            f"| {kind} | {prompts[kind]} | {b['p50'] / v['p50']:.3f} | {(b['p50'] - v['p50']) * 1000:.0f} "
            f"| {b['p95'] / v['p95']:.3f} | {b['rps'] / v['rps']:.3f} |"
            for kind, b, v in pairs
        ],
        "",
        f"Bento ready after {ready:.1f} s; RSS of the whole bento {sum(rss.values()) / 1024:.2f} GB:",
        "",
        *rss_table(rss),
        "",
        command_line(),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--track", choices=("a", "b"), default="a")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--n", type=int, default=5, help="sequential requests per round and path")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--total", type=int, default=24)
    parser.add_argument("--unified", default="models/embedded/unified/track_a", help="track A's whole-VLM baseline")
    parser.add_argument("--log-dir", default="benchmarks/.data/logs")
    parser.add_argument("--out")
    args = parser.parse_args()
    lines = asyncio.run(run(args) if args.track == "a" else run_track_b(args))
    publish(lines, args.out)


if __name__ == "__main__":
    main()
