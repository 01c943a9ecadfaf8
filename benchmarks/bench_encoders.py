"""Encoder throughput with and without BentoML adaptive batching, at several client concurrencies, in one run.

For each encoder (track A's vision encoder; track B's vision and audio encoders where `models/embedded/track_b`
holds them) two real multi-process servers of the REAL service class are started side by side with
`bentoml serve benchmarks.encoder_bento:<Svc>`:

- "batching": the track config as is (adaptive batching, `max_batch_size` from the config);
- "batch size 1": `HCX_TRACKS__<T>__COMPONENTS__<SECTION>__MAX_BATCH_SIZE=1`, which serves the same `encode` with
  batching off: one call per request, the baseline.

Each server is a thin entry (`VisionBench` / `AudioBench`, JSON in) in front of the real encoder as a BentoML
dependency, called the way the gateway calls it (own worker process, pickle wire format, `encode([item])`).
Clients (httpx) call the entry's `POST /encode`, one item per request, `c` requests in flight, closed loop, a
fixed number of items per measurement; requests that fail are counted and left out of items/s. Rounds alternate
between the two servers so drift on a shared machine hits both alike; items/s is the median over rounds, latency
the p50 over all requests of a level. Items: a 224x224 PNG (256 patches, inside the embedded models' pixel limits;
`--image-size`), a 3-s 16-kHz mono WAV.

Ratios: batching at c=8 over batch size 1 at c=8 (the target: >= 2.5x) and over batch size 1 at c=1.
Prints a markdown table; `--out` also writes it, with the machine, date, command and models.

    .venv/bin/python benchmarks/bench_encoders.py --out benchmarks/results/encoders.md

`--sizes real` serves the encoders at the released models' sizes, with random weights (`benchmarks/real_sizes.py`),
on the `gpu` profile (bf16, one GPU per service): the figure a GPU deployment's batching gives, without the
checkpoints.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import io
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.real_sizes import write_real_size_folder  # noqa: E402
from hcxserve.config import dotted_overrides, load_track  # noqa: E402
from hcxserve.models import resolve_device  # noqa: E402
from hcxserve.tooling.testing import ServedProcess, config_env, free_port, serve_env  # noqa: E402


def test_png(width: int = 224, height: int = 224) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (90, 140, 200))
    draw = ImageDraw.Draw(image)
    for i in range(0, width, 32):
        draw.rectangle([i, height // 3, i + 16, 2 * height // 3], fill=(230, 200, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_wav(seconds: float = 3.0, rate: int = 16000) -> bytes:
    import numpy as np
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(0)
    samples = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)
    buffer = io.BytesIO()
    sf.write(buffer, samples.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


@dataclass
class Encoder:
    key: str  # vision-a, vision-b, audio-b
    track: str
    service: str  # class name in benchmarks.encoder_bento
    section: str  # config section
    items: int  # items per measurement
    image_size: int = 224

    @property
    def label(self) -> str:
        kind = "vision" if self.service == "VisionEncoder" else "audio"
        return f"{kind} encoder, track {self.track.upper()}"

    def component(self) -> str:
        return "ve" if self.service == "VisionEncoder" else "ae"

    def request_body(self) -> bytes:
        """One request of one item, serialized once (the client's own CPU time stays out of the figures)."""
        data = test_png(self.image_size, self.image_size) if self.service == "VisionEncoder" else test_wav()
        return json.dumps({"data_b64": base64.b64encode(data).decode("ascii")}).encode()


ENCODERS = {
    "vision-a": Encoder("vision-a", "a", "VisionEncoder", "vision_encoder", 96),
    "vision-b": Encoder("vision-b", "b", "VisionEncoder", "vision_encoder", 96),
    "audio-b": Encoder("audio-b", "b", "AudioEncoder", "audio_encoder", 48),
}


@dataclass
class Level:
    rates: list[float] = field(default_factory=list)  # items/s, one per round
    latencies: list[float] = field(default_factory=list)  # seconds, every request of every round
    failed: int = 0  # requests answered with an error (not counted in items/s)

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies) * 1000


JSON = {"Content-Type": "application/json"}


class ComponentServer:
    """`bentoml serve benchmarks.encoder_bento:<service>` (on loopback) for one component of `track`: "batching" as
    configured, "bs1" with `max_batch_size: 1`, which serves the same method with batching off."""

    def __init__(
        self, service: str, track: str, section: str, endpoint: str, mode: str, env: dict[str, str], log: Path
    ) -> None:
        self.mode = mode
        self.port = free_port()
        overrides = {} if mode == "batching" else {f"{track}.components.{section}.max_batch_size": 1}
        self.component = getattr(load_track(track, overrides=dotted_overrides([track], overrides)).components, section)
        cmd = [sys.executable, "-m", "bentoml", "serve", f"benchmarks.encoder_bento:{service}",
               "--host", "127.0.0.1", "--port", str(self.port)]  # fmt: skip
        self.log = log
        self.proc = ServedProcess(cmd, {**env, "HCX_BENCH_TRACK": track, **config_env(overrides)}, log)
        self.url = f"http://127.0.0.1:{self.port}/{endpoint}"

    def wait_ready(self) -> None:
        self.proc.wait_ready(f"http://127.0.0.1:{self.port}/readyz", timeout=600)


def status_ok(response: httpx.Response) -> bool:
    return response.status_code == 200


async def closed_loop(
    url: str,
    bodies: list[bytes],
    concurrency: int,
    total: int,
    *,
    answered: Callable[[httpx.Response], bool] = status_ok,
) -> tuple[float, list[float], int]:
    """`total` requests, `concurrency` in flight, cycling through `bodies`: items/s (answered ones), the latency of
    each answered one, and how many failed (`answered` says which did not)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=900, limits=limits) as client:
        sent, latencies, failed = [0], [], [0]

        async def worker() -> None:
            while sent[0] < total:
                body = bodies[sent[0] % len(bodies)]
                sent[0] += 1
                start = time.perf_counter()
                response = await client.post(url, content=body, headers=JSON)
                elapsed = time.perf_counter() - start
                if answered(response):
                    latencies.append(elapsed)
                else:
                    failed[0] += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(latencies) / (time.perf_counter() - start), latencies, failed[0]


async def interleaved_rounds(
    servers: list[ComponentServer], bodies: list[bytes], args: argparse.Namespace, items: int, label: str, **loop
) -> tuple[dict[str, dict[int, Level]], list[float]]:
    """Every concurrency level `args.rounds` times on each server, alternating which goes first so that drift on a
    shared machine hits both alike; also the 1-min load average after each measurement."""
    results = {s.mode: {c: Level() for c in args.concurrency} for s in servers}
    load = []
    for r in range(args.rounds):
        for c in args.concurrency:
            for server in servers if r % 2 == 0 else servers[::-1]:
                rate, latencies, failed = await closed_loop(server.url, bodies, c, items, **loop)
                level = results[server.mode][c]
                level.rates.append(rate)
                level.latencies += latencies
                level.failed += failed
                load.append(os.getloadavg()[0])
        print(f"  {label}: round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    return results, load


def check_response(response: httpx.Response) -> str:
    """Decode one answer and say what it holds (so a server answering errors is not benchmarked)."""
    result = response.json()
    if "rows" not in result:
        raise RuntimeError(f"encoder answered {result}")
    return f"{result['rows']}x{result['dim']} {result['dtype']}"


async def bench_encoder(encoder: Encoder, args: argparse.Namespace, env: dict[str, str], log_dir: Path) -> dict:
    body = encoder.request_body()
    service = encoder.service.replace("Encoder", "Bench")
    # both servers run side by side (an idle one costs no CPU) so their rounds can be interleaved
    servers = [
        ComponentServer(
            service, encoder.track, encoder.section, "encode", mode, env, log_dir / f"{encoder.key}-{mode}.log"
        )
        for mode in ("bs1", "batching")
    ]
    try:
        for server in servers:
            server.wait_ready()
        shape = ""
        for server in servers:
            async with httpx.AsyncClient(timeout=600) as client:
                response = await client.post(server.url, content=body, headers=JSON)
                response.raise_for_status()
                shape = check_response(response)
            # warm-up: the dispatcher trains its latency model on its first ~12 calls, then both servers see
            # every concurrency level once before anything is timed
            await closed_loop(server.url, [body], 1, 16)
            for c in args.concurrency:
                await closed_loop(server.url, [body], c, max(2 * c, 8))
        results, _ = await interleaved_rounds(servers, [body], args, encoder.items, encoder.key)
        return {
            "encoder": encoder,
            "results": results,
            "max_batch_size": {s.mode: s.component.max_batch_size for s in servers},
            "threads": servers[0].component.threads,
            "shape": shape,
            "ready_s": {s.mode: s.proc.ready_after_s for s in servers},
        }
    finally:
        for server in servers:
            server.proc.stop()


def batching_table(res: dict, concurrency: list[int], *, rate: str = ".1f", ms: str = ".1f") -> list[str]:
    """The markdown table of a component served with and without batching: items/s, p50 and failures per level."""
    lines = [
        "| concurrency | batch size 1: items/s | batch size 1: p50 ms | batching: items/s | batching: p50 ms "
        "| batching / batch size 1 | failed requests (bs1 / batching) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in concurrency:
        bs1, bat = res["bs1"][c], res["batching"][c]
        lines.append(
            f"| {c} | {bs1.rate:{rate}} | {bs1.p50_ms:{ms}} | {bat.rate:{rate}} | {bat.p50_ms:{ms}} "
            f"| {bat.rate / bs1.rate:.2f}x | {bs1.failed} / {bat.failed} |"
        )
    return lines


def publish(lines: list[str], out: str | Path | None, *, partial: bool = False) -> None:
    """A benchmark's markdown report: printed, and written to `out` when given (benchmarks/results/...). A partial
    report is only written, so that a run stopped by a time limit keeps what it measured."""
    text = "\n".join(lines) + "\n"
    if not partial:
        print(text)
    if out:
        Path(out).write_text(text)


def machine() -> str:
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = "no GPU"
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    mem = psutil.virtual_memory().total / 2**30
    return (
        f"{cpu}, {os.cpu_count()} CPU cores, {mem:.0f} GiB RAM, {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} intra-op threads by default)"
    )


def model_line(encoder: Encoder) -> str:
    config = load_track(encoder.track)
    folder = config.component_dir(encoder.component())
    manifest = config.model_dir / "manifest.json"
    size = ""
    if manifest.exists():
        info = json.loads(manifest.read_text()).get("components", {}).get(encoder.component(), {})
        if info.get("bytes"):
            size = f", {info['bytes'] / 2**20:.1f} MiB of weights"
    cfg = getattr(config.components, encoder.section)
    return f"`{folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder}` ({cfg.dtype}, {cfg.device}{size})"


def render(runs: list[dict], args: argparse.Namespace, env: dict[str, str], command: str) -> str:
    import bentoml

    lines = [
        "# Encoder throughput: adaptive batching vs batch size 1",
        "",
        f"- Date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {machine()}",
        f"- BentoML {bentoml.__version__}; `bentoml serve benchmarks.encoder_bento:<Svc>` (the real service classes, "
        "one worker each); the two configurations run side by side and their rounds alternate",
        f"- Command: `{command}`",
        "- Path: client -> JSON entry service -> the encoder as a BentoML dependency (pickle, one `encode([item])` "
        "call per request, as the gateway makes)",
        f"- Load: closed loop, one item per request, "
        f"{args.rounds} rounds per level; items/s = median over rounds, p50 = over every request of the level",
        f"- Items: a {args.image_size}x{args.image_size} PNG (image), a 3-s 16-kHz mono WAV (audio)",
        "- Models: "
        + (
            "the released models' sizes with random weights (`benchmarks/real_sizes.py`), `gpu` profile"
            if args.sizes == "real"
            else "the embedded defaults"
        ),
        "",
    ]
    for run in runs:
        encoder: Encoder = run["encoder"]
        res = run["results"]
        mbs = run["max_batch_size"]
        lines += [
            f"## {encoder.label}",
            "",
            f"- Model: {model_line(encoder)}; output per item: {run['shape']}",
            f"- Batching: adaptive, `max_batch_size={mbs['batching']}` (config default); batch size 1: the same "
            f"`encode` with `{encoder.section}.max_batch_size=1` (batching off); "
            f"`{encoder.section}.threads={run['threads']}`; "
            f"{encoder.items} items per measurement",
            "",
        ]
        lines += batching_table(res, args.concurrency)
        top, low = max(args.concurrency), min(args.concurrency)
        vs_top = res["batching"][top].rate / res["bs1"][top].rate
        vs_low = res["batching"][top].rate / res["bs1"][low].rate
        verdict = "met" if vs_top >= args.target else "NOT met"
        lines += [
            "",
            f"- batching c={top} / batch size 1 c={top}: **{vs_top:.2f}x** (target >= {args.target}x: {verdict})",
            f"- batching c={top} / batch size 1 c={low}: **{vs_low:.2f}x**",
            f"- batching c={top} / batching c={low}: {res['batching'][top].rate / res['batching'][low].rate:.2f}x",
            "",
        ]
    return "\n".join(lines)


def available(keys: list[str]) -> list[Encoder]:
    out = []
    for key in keys:
        encoder = ENCODERS[key]
        folder = load_track(encoder.track).component_dir(encoder.component())
        if (folder / "config.json").exists():
            out.append(encoder)
        else:
            print(f"skipping {key}: {folder} not built (make model)", file=sys.stderr)
    return out


def use_real_sizes(encoders: list[Encoder], model_root: Path) -> None:
    """Point this process and the servers it starts (through the environment) at real-size folders under
    `model_root`, on the `gpu` profile."""
    folders = {encoder.key: load_track(encoder.track).component_dir(encoder.component()) for encoder in encoders}
    for encoder in encoders:
        out = model_root / f"track_{encoder.track}" / encoder.component()
        print(f"{encoder.key}: writing a real-size folder to {out}", file=sys.stderr, flush=True)
        write_real_size_folder(folders[encoder.key], out, encoder.section, device=resolve_device("auto"))
    os.environ["HCX_PROFILE"] = "gpu"
    for track in {encoder.track for encoder in encoders}:
        os.environ[f"HCX_TRACKS__{track.upper()}__MODEL_DIR"] = str(model_root / f"track_{track}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--encoders", default="vision-a,vision-b,audio-b", help="comma-separated: " + ", ".join(ENCODERS)
    )
    parser.add_argument("--concurrency", default="1,2,4,8", help="comma-separated client concurrencies")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vision-items", type=int, default=96, help="items per measurement, vision")
    parser.add_argument("--audio-items", type=int, default=48, help="items per measurement, audio")
    parser.add_argument("--image-size", type=int, default=224, help="side of the square test PNG")
    parser.add_argument("--target", type=float, default=2.5, help="required batching/batch-size-1 ratio at top c")
    parser.add_argument("--sizes", choices=["embedded", "real"], default="embedded", help="real: released sizes, gpu")
    parser.add_argument("--log-dir", default="/tmp/hcx_bench_encoders")
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    for encoder in ENCODERS.values():
        encoder.items = args.vision_items if encoder.service == "VisionEncoder" else args.audio_items
        encoder.image_size = args.image_size
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    command = shlex.join([".venv/bin/python", "benchmarks/bench_encoders.py", *sys.argv[1:]])
    encoders = available(args.encoders.split(","))
    with tempfile.TemporaryDirectory(prefix="hcx-real-sizes-") as tmp:
        if args.sizes == "real":
            use_real_sizes(encoders, Path(tmp))
        env = serve_env(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        runs = []
        for encoder in encoders:
            print(f"{encoder.key}: starting servers", file=sys.stderr, flush=True)
            runs.append(asyncio.run(bench_encoder(encoder, args, env, log_dir)))
            publish([render(runs, args, env, command)], args.out, partial=True)
        publish([render(runs, args, env, command)], args.out)


if __name__ == "__main__":
    main()
