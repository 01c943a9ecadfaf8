"""Track B's decoders with and without BentoML adaptive batching, and the latency of streamed speech, in one run.

1. Audio decoder (`--parts audio`), 2. vision decoder (`vision`): as benchmarks/bench_encoders.py does for the
   encoders, two real multi-process servers of the REAL decoder service are started side by side with
   `bentoml serve benchmarks.encoder_bento:<Svc>Bench` (`HCX_BENCH_TRACK=b`):

   - "batching": the track config as is (adaptive batching, `max_batch_size` from the config);
   - "batch size 1": `HCX_TRACKS__B__COMPONENTS__<SECTION>__MAX_BATCH_SIZE=1`, the same method with batching off.

   Each server is a thin JSON entry in front of the real decoder as a BentoML dependency, called the way the
   gateway calls it (own worker process, pickle wire format, one `decode([request])` / `generate([request])` per
   request). Closed-loop clients (httpx) send one request per call, `c` in flight, a fixed number per measurement;
   rounds alternate between the two servers; items/s is the median over rounds, latency the p50 over all requests
   of a level; failed requests (an error status or a refused item) are counted and left out of items/s.
   Audio: 5 s of speech per request (125 random units of the 6561, `format: wav`, the default voice); every
   request has the same number of units, because the decoder batches only requests of equal length. Vision: ratio
   1:1, 729 random codes in [0, codebook) with fixed seeds, `--vision-steps` denoising steps; then, on the
   batching server at c=1, the latency of one image per step count (`--step-counts`).
   The request bodies are a small pool made once from a fixed seed (different units / codes / seeds each).
3. Streamed speech (`stream`): the track B bento (`bentos.track_b:Gateway`, the embedded defaults, an API key of
   its own) answers the same spoken request (`modalities: ["text", "audio"]`, `audio.format: pcm16`, greedy,
   `seed: 0`, `max_tokens` = `min_tokens` = `--max-tokens`, so that it speaks its whole unit budget) streamed and
   not streamed, alternately: p50 over `--stream-reps` of the time to the first SSE chunk, the first text, the first
   audio part (`choices[0].delta.audio.data`) and the last chunk (`[DONE]`), and of the whole answer not streamed;
   the ratio first audio / whole is the one the issue targets (<= 0.30).

The decoder servers listen on 127.0.0.1 only; every request goes to 127.0.0.1. Every server started is stopped at
the end, also on errors, Ctrl-C and SIGTERM. The report counts the ERROR / traceback lines of each server's log,
apart for those written while it shut down.

    .venv/bin/python benchmarks/bench_decoders.py --out benchmarks/results/decoders.md
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import json
import os
import secrets
import shlex
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_encoders import (  # noqa: E402
    JSON,
    ComponentServer,
    batching_table,
    closed_loop,
    interleaved_rounds,
    machine,
    publish,
)
from hcxserve.config import load_track  # noqa: E402
from hcxserve.tooling.testing import ServedProcess, serve_bento, serve_env  # noqa: E402

MODEL = "track_b_model"
UNITS_PER_SECOND = 25  # CosyVoice units
PROMPT = "Tell me about the sea, the wind and the boats in the harbour."
STARTED: list[ServedProcess] = []  # every server this run started, stopped at the end whatever happens
SERVED_BYTES: dict[Path, int] = {}  # per log: its size when the server was asked to stop (the rest is shutdown)


@dataclass
class Decoder:
    key: str  # audio, vision
    service: str  # class in benchmarks.encoder_bento
    section: str  # config section of track B
    folder: str  # component folder
    items: int  # requests per measurement

    @property
    def label(self) -> str:
        return f"{self.key.capitalize()} decoder, track B"


DECODERS = {
    "audio": Decoder("audio", "AudioDecoderBench", "audio_decoder", "ad", 48),
    "vision": Decoder("vision", "VisionDecoderBench", "vision_decoder", "vd", 8),
}


def vocabularies() -> tuple[int, int]:
    """The audio decoder's unit vocabulary (`ad/finetuned/config.json` num_units) and the vision decoder's codebook
    (`vd/token_embedder/config.json` vocab_size), as the embedded models have them."""
    config = load_track("b")
    ad = config.component_dir(config.components.audio_decoder.folder) / "finetuned" / "config.json"
    vd = config.component_dir(config.components.vision_decoder.folder) / "token_embedder" / "config.json"
    return int(json.loads(ad.read_text())["num_units"]), int(json.loads(vd.read_text())["vocab_size"])


def request_pool(decoder: Decoder, args: argparse.Namespace, n: int = 8) -> list[bytes]:
    """`n` JSON bodies, made once from a fixed seed (the client's own CPU time stays out of the figures)."""
    rng = np.random.default_rng(0)
    bodies = []
    for i in range(n):
        if decoder.key == "audio":
            units = rng.integers(0, args.units, args.audio_units).tolist()
            request = {"units": units, "format": "wav"}
        else:
            codes = rng.integers(0, args.codebook, 729).tolist()
            request = {"ratio": "1:1", "codes": codes, "steps": args.vision_steps, "seed": i}
        bodies.append(json.dumps({"request": request}).encode())
    return bodies


def with_steps(body: bytes, steps: int) -> bytes:
    data = json.loads(body)
    data["request"]["steps"] = steps
    return json.dumps(data).encode()


def decoded(response: httpx.Response) -> dict | None:
    """The decoder's answer; None when it failed: an error status or a refused item."""
    if response.status_code != 200:
        return None
    result = response.json()
    return None if "error" in result else result


def answered(response: httpx.Response) -> bool:
    return decoded(response) is not None


async def bench_decoder(decoder: Decoder, args: argparse.Namespace, env: dict[str, str], log_dir: Path) -> dict:
    bodies = request_pool(decoder, args)
    servers = [
        ComponentServer(
            decoder.service, "b", decoder.section, "decode", mode, env, log_dir / f"{decoder.key}-{mode}.log"
        )
        for mode in ("bs1", "batching")
    ]
    STARTED.extend(server.proc for server in servers)
    try:
        for server in servers:
            server.wait_ready()
        output = ""
        warm = 12 if decoder.key == "audio" else 2
        for server in servers:
            async with httpx.AsyncClient(timeout=900) as client:
                result = decoded(await client.post(server.url, content=bodies[0], headers=JSON))
            if result is None:
                raise RuntimeError(f"{decoder.key} decoder ({server.mode}) refused the benchmark's request")
            if decoder.key == "audio":
                output = f"{result['samples']} samples at {result['sample_rate']} Hz, a {result['bytes']}-byte WAV"
            else:
                output = f"a {result['width']}x{result['height']} PNG of ~{result['bytes'] / 1e6:.1f} MB"
            # warm-up: the dispatcher learns its latency model on its first calls, then every level once
            await closed_loop(server.url, bodies, 1, warm)
            for c in args.concurrency:
                await closed_loop(server.url, bodies, c, c if decoder.key == "vision" else max(2 * c, 8))
        results, load = await interleaved_rounds(servers, bodies, args, decoder.items, decoder.key, answered=answered)
        steps = {}
        if decoder.key == "vision":
            batching = servers[1]
            for n in args.step_counts:
                timed = [with_steps(body, n) for body in bodies]
                await closed_loop(batching.url, timed, 1, 1)
                _, latencies, failed = await closed_loop(batching.url, timed, 1, args.step_reps, answered=answered)
                steps[n] = (latencies, failed)
                load.append(os.getloadavg()[0])
            print("  vision: step counts done", file=sys.stderr, flush=True)
        return {
            "decoder": decoder,
            "results": results,
            "steps": steps,
            "component": {s.mode: s.component for s in servers},
            "output": output,
            "ready_s": {s.mode: s.proc.ready_after_s for s in servers},
            "logs": [s.log for s in servers],
            "load": load,
        }
    finally:
        for server in servers:
            stop(server.proc)


# ------------------------------------------------------------------------------------------ streamed speech
def chat_body(args: argparse.Namespace, stream: bool) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "modalities": ["text", "audio"],
            "audio": {"voice": "fkms", "format": "pcm16"}, "max_tokens": args.max_tokens, "temperature": 0.0,
            "min_tokens": args.max_tokens, "seed": 0, "stream": stream}  # fmt: skip


async def streamed(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """Times (s from sending) of the first chunk, first text, first audio part and the end; the pcm16 parts."""
    start = time.perf_counter()
    first = first_text = first_audio = None
    parts: list[bytes] = []
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            now = time.perf_counter() - start
            data = line[5:].strip()
            if data == "[DONE]":
                break
            first = first if first is not None else now
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"the stream failed: {chunk['error']}")
            for choice in chunk.get("choices", []):
                delta = choice.get("delta") or {}
                if delta.get("content") and first_text is None:
                    first_text = now
                if (audio := delta.get("audio")) and audio.get("data"):
                    first_audio = first_audio if first_audio is not None else now
                    parts.append(base64.b64decode(audio["data"]))
    end = time.perf_counter() - start
    if first_audio is None:
        raise RuntimeError("the streamed answer held no audio")
    return {"first": first, "text": first_text, "audio": first_audio, "end": end, "pcm": b"".join(parts),
            "parts": len(parts)}  # fmt: skip


async def whole(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, bytes, int]:
    start = time.perf_counter()
    response = await client.post(url, json=body)
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    answer = response.json()
    audio = answer["choices"][0]["message"].get("audio") or {}
    if not audio.get("data"):
        raise RuntimeError(f"the answer held no audio: {str(answer)[:300]}")
    return elapsed, base64.b64decode(audio["data"]), answer["usage"]["completion_tokens"]


async def bench_stream(args: argparse.Namespace, log_dir: Path) -> dict:
    log = log_dir / "bento-track-b.log"
    bento = serve_bento("bentos.track_b:Gateway", log, tracks=["b"], api_key=secrets.token_urlsafe(24))
    STARTED.append(bento)
    try:
        ready = bento.wait_ready(f"{bento.url}/readyz", timeout=900)
        await asyncio.sleep(5)
        url = f"{bento.url}/b/v1/chat/completions"
        async with httpx.AsyncClient(timeout=900, headers=bento.headers) as client:
            await whole(client, url, chat_body(args, False))  # warm-up: both paths once
            await streamed(client, url, chat_body(args, True))
            runs, wholes, tokens, load = [], [], 0, []
            for rep in range(args.stream_reps):
                for stream in (False, True) if rep % 2 == 0 else (True, False):
                    if stream:
                        runs.append(await streamed(client, url, chat_body(args, True)))
                    else:
                        elapsed, pcm, tokens = await whole(client, url, chat_body(args, False))
                        wholes.append((elapsed, pcm))
                    load.append(os.getloadavg()[0])
            print("  stream: done", file=sys.stderr, flush=True)
    finally:
        stop(bento)
    return {"runs": runs, "wholes": wholes, "tokens": tokens, "ready_s": ready, "logs": [log], "load": load}


# ------------------------------------------------------------------------------------------ report
def p50(values: list[float]) -> float:
    return statistics.median(values)


def model_line(decoder: Decoder, component) -> str:
    config = load_track("b")
    folder = config.component_dir(decoder.folder)
    info = json.loads((config.model_dir / "manifest.json").read_text()).get("components", {}).get(decoder.folder, {})
    size = f", {info['bytes'] / 2**20:.1f} MiB of weights" if info.get("bytes") else ""
    shown = folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder
    return f"`{shown}` ({component.dtype}, {component.device}{size})"


def log_errors(logs: list[Path]) -> list[str]:
    """Per log: the lines saying ERROR while it served and while it shut down (vLLM's engine, stopped first, makes
    its API server log EngineDeadError then), and the first few of the serving ones."""
    lines = []
    for log in logs:
        data = log.read_bytes() if log.exists() else b""
        cut = SERVED_BYTES.get(log, len(data))
        served, shutdown = (part.decode(errors="replace").splitlines() for part in (data[:cut], data[cut:]))
        errors = [line for line in served if "ERROR" in line or line.startswith("Traceback")]
        late = sum("ERROR" in line for line in shutdown)
        lines.append(f"- `{log}`: {len(errors)} ERROR / traceback lines while serving, {late} while shutting down")
        lines += [f"  - `{line.strip()[:200]}`" for line in errors[:3]]
    return lines


def load_line(load: list[float]) -> str:
    return (f"- 1-min load average during the measurements: median {p50(load):.1f}, max {max(load):.1f} "
            f"({os.cpu_count()} cores: above that, other work shared the machine)")  # fmt: skip


def decoder_section(run: dict, args: argparse.Namespace) -> list[str]:
    decoder: Decoder = run["decoder"]
    res, comp = run["results"], run["component"]
    if decoder.key == "audio":
        item = (f"{args.audio_units} random units in [0, {args.units}) (the embedded vocabulary), "
                f"{args.audio_units / UNITS_PER_SECOND:g} s of speech, `format: wav`, the default voice; every "
                "request has the same number of units (the decoder batches only requests of equal length: padding "
                "would change the last samples)")  # fmt: skip
    else:
        item = (f"ratio 1:1, 729 random codes in [0, {args.codebook}) (the embedded codebook), seeds 0-7, "
                f"{args.vision_steps} steps, guidance {comp['batching'].guidance_scale} (config)")  # fmt: skip
    lines = [
        f"## {decoder.label}",
        "",
        f"- Model: {model_line(decoder, comp['batching'])}; output per request: {run['output']}",
        f"- Request: {item}; a pool of 8 such bodies, cycled",
        f"- Batching: adaptive, `max_batch_size={comp['batching'].max_batch_size}`, `max_latency_ms="
        f"{comp['batching'].max_latency_ms}` (config); batch size 1: `{decoder.section}.max_batch_size=1` "
        f"(batching off); {decoder.items} requests per measurement; ready after "
        f"{run['ready_s']['bs1']:.0f} s / {run['ready_s']['batching']:.0f} s",
        "- Failed requests: answered with an error, e.g. the 503 BentoML's dispatcher gives a call it expects not to "
        "finish within `max_latency_ms` (the entry passes it on as a 500)",
        load_line(run["load"]),
        "",
    ]
    lines += batching_table(res, args.concurrency, rate=".2f", ms=".0f")
    top, low = max(args.concurrency), min(args.concurrency)
    lines += [
        "",
        f"- batching c={top} / batch size 1 c={top}: **{res['batching'][top].rate / res['bs1'][top].rate:.2f}x**",
        f"- batching c={top} / batch size 1 c={low}: **{res['batching'][top].rate / res['bs1'][low].rate:.2f}x**",
        f"- batching c={top} / batching c={low}: {res['batching'][top].rate / res['batching'][low].rate:.2f}x",
    ]
    if decoder.key == "audio":
        speech = args.audio_units / UNITS_PER_SECOND
        best = max(max(level.rate for level in mode.values()) for mode in res.values())
        lines.append(f"- Real-time factor at the best rate: {best * speech:.1f} s of speech per second")
    if run["steps"]:
        lines += [
            "",
            f"Latency of one image at c=1 (the batching server, {args.step_reps} requests per step count):",
            "",
            "| steps | p50 ms | min ms | failed |",
            "| ---: | ---: | ---: | ---: |",
        ]
        for n, (latencies, failed) in run["steps"].items():
            lines.append(f"| {n} | {p50(latencies) * 1000:.0f} | {min(latencies) * 1000:.0f} | {failed} |")
        lo, hi = min(run["steps"]), max(run["steps"])
        if hi > lo:
            slope = (p50(run["steps"][hi][0]) - p50(run["steps"][lo][0])) / (hi - lo)
            fixed = p50(run["steps"][lo][0]) - lo * slope
            lines += ["", f"- Per step: ~{slope * 1000:.0f} ms; the rest (codes in, VAE decode, PNG, serving): "
                      f"~{fixed * 1000:.0f} ms (from the p50s at {lo} and {hi} steps)"]  # fmt: skip
    return lines + [""]


def same_samples(a: bytes, b: bytes) -> bool:
    """The same pcm16 samples, to a rounding step (a part of a stream is quantised on its own)."""
    x, y = np.frombuffer(a, dtype="<i2").astype(int), np.frombuffer(b, dtype="<i2").astype(int)
    return x.shape == y.shape and (x.size == 0 or int(np.abs(x - y).max()) <= 1)


def stream_section(run: dict, args: argparse.Namespace) -> list[str]:
    runs, wholes = run["runs"], run["wholes"]
    whole_s = p50([w[0] for w in wholes])
    pcm = wholes[-1][1]
    same = all(same_samples(r["pcm"], pcm) for r in runs) and all(w[1] == pcm for w in wholes)
    seconds = len(pcm) / 2 / 24000
    ratio = p50([r["audio"] for r in runs]) / whole_s
    verdict = "met" if ratio <= args.stream_target else "NOT met"
    rows = [("first SSE chunk", "first"), ("first text delta", "text"), ("**first audio part**", "audio"),
            ("last chunk (`[DONE]`)", "end")]  # fmt: skip
    lines = [
        "## Streamed speech through the track B bento",
        "",
        f"- `bentos.track_b:Gateway` on the embedded defaults (ready after {run['ready_s']:.0f} s), an API key of its "
        "own; `POST /b/v1/chat/completions`",
        f'- Request: "{PROMPT}", `modalities: ["text", "audio"]`, `audio: {{voice: fkms, format: pcm16}}`, '
        f"`max_tokens` = `min_tokens` = {args.max_tokens} (the gateway gives a tenth to the transcript and the rest, "
        "`min_tokens` included, bounds the units: the answer speaks its whole budget), `temperature: 0`, `seed: 0`; "
        "streamed (`stream: true`, SSE) and not, "
        f"alternately, {args.stream_reps} each after one warm-up of each",
        f"- The answer: {run['tokens']} completion tokens, {seconds:.2f} s of speech ({len(pcm) // 2} samples at "
        f"24 kHz, ~{seconds * UNITS_PER_SECOND:.0f} units) in {p50([r['parts'] for r in runs]):.0f} streamed pcm16 "
        f"parts; the streamed samples are the non-streamed answer's (to a rounding step) in every repetition: "
        f"{'yes' if same else 'NO'}",
        load_line(run["load"]),
        "",
        "| measure | p50 (s) | min (s) | max (s) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, key in rows:
        values = [r[key] for r in runs]
        lines.append(f"| streamed: {label} | {p50(values):.3f} | {min(values):.3f} | {max(values):.3f} |")
    values = [w[0] for w in wholes]
    lines += [
        f"| not streamed: the whole answer | {whole_s:.3f} | {min(values):.3f} | {max(values):.3f} |",
        "",
        f"- First audio / whole answer (p50s): **{ratio:.3f}** (target <= {args.stream_target:.2f}: {verdict})",
        f"- Last streamed chunk / whole answer: {p50([r['end'] for r in runs]) / whole_s:.3f}",
        "",
    ]
    return lines


def render(runs: list[dict], stream: dict | None, args: argparse.Namespace, command: str, wall_s: float) -> str:
    import bentoml

    lines = [
        "# Track B decoders: adaptive batching vs batch size 1, and streamed speech",
        "",
        f"- Date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {machine()}",
        f"- BentoML {bentoml.__version__}; decoders: `bentoml serve benchmarks.encoder_bento:<Svc>Bench` (the real "
        "service classes, one worker each), the two configurations side by side, their rounds alternating",
        f"- Command: `{command}` (wall time {wall_s / 60:.1f} min)",
        f"- 1-min load average at the start / end of the run: {args.load[0]:.2f} / {os.getloadavg()[0]:.2f} "
        f"({os.cpu_count()} cores; above that, other work shared the machine)",
        "- Path: client -> JSON entry service -> the decoder as a BentoML dependency (pickle, one "
        "`decode([request])` / `generate([request])` call per request, as the gateway makes)",
        f"- Load: closed loop, one request per call, {args.rounds} rounds per level; items/s = median over rounds, "
        "p50 = over every request of the level",
        "",
    ]
    for run in runs:
        lines += decoder_section(run, args)
    if stream:
        lines += stream_section(stream, args)
    logs = [log for run in runs for log in run["logs"]] + (stream["logs"] if stream else [])
    lines += ["## Server logs", "", *log_errors(logs), ""]
    return "\n".join(lines)


def stop(server: ServedProcess) -> None:
    SERVED_BYTES[server.log_path] = server.log_path.stat().st_size if server.log_path.exists() else 0
    server.stop()


def stop_all() -> None:
    for server in STARTED:
        try:
            server.stop()
        except Exception as exc:  # noqa: BLE001 - stop the others whatever one does
            print(f"stopping a server: {exc}", file=sys.stderr)


async def run(args: argparse.Namespace, log_dir: Path) -> tuple[list[dict], dict | None]:
    env = serve_env(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    runs = []
    for key in ("audio", "vision"):
        if key in args.parts:
            print(f"{key}: starting servers", file=sys.stderr, flush=True)
            runs.append(await bench_decoder(DECODERS[key], args, env, log_dir))
    stream = None
    if "stream" in args.parts:
        print("stream: starting the track B bento", file=sys.stderr, flush=True)
        stream = await bench_stream(args, log_dir)
    return runs, stream


def interrupted(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="audio,vision,stream", help="comma-separated: audio, vision, stream")
    parser.add_argument("--concurrency", default="1,4,8", help="comma-separated client concurrencies")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--audio-items", type=int, default=48, help="requests per measurement, audio")
    parser.add_argument("--vision-items", type=int, default=8, help="requests per measurement, vision")
    parser.add_argument("--audio-units", type=int, default=125, help="units per speech request (25 per second)")
    parser.add_argument("--vision-steps", type=int, default=4, help="denoising steps of the throughput requests")
    parser.add_argument("--step-counts", default="1,2,4,8", help="step counts of the latency table")
    parser.add_argument("--step-reps", type=int, default=5, help="requests per step count")
    parser.add_argument("--max-tokens", type=int, default=200, help="of the spoken answer")
    parser.add_argument("--stream-reps", type=int, default=5, help="streamed and whole answers, each")
    parser.add_argument("--stream-target", type=float, default=0.30, help="first audio / whole answer, at most")
    parser.add_argument("--log-dir", default="/tmp/hcx_bench_decoders")
    parser.add_argument("--out", help="also write the markdown report here")
    args = parser.parse_args()
    args.parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = set(args.parts) - {"audio", "vision", "stream"}
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.step_counts = [int(n) for n in args.step_counts.split(",")]
    DECODERS["audio"].items, DECODERS["vision"].items = args.audio_items, args.vision_items
    args.units, args.codebook = vocabularies()
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    command = shlex.join([".venv/bin/python", "benchmarks/bench_decoders.py", *sys.argv[1:]])
    start, args.load = time.monotonic(), os.getloadavg()
    # Ctrl-C or a kill: KeyboardInterrupt wherever the run is (asyncio's own SIGINT handler only cancels the main
    # task, which a blocking wait or a swallowed cancellation can leave running), then every server is stopped
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    try:
        runs, stream = asyncio.run(run(args, log_dir))
    finally:
        stop_all()
    publish([render(runs, stream, args, command, time.monotonic() - start)], args.out)


if __name__ == "__main__":
    main()
