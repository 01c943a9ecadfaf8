"""The encoders' own work, in-process, on an accelerator or the CPU: the pipelines the encoder services run
(`hcxserve.encoders`: decode, preprocess, forward, serialise), without BentoML around them.

For each encoder of the embedded default models: items/s encoding 8 items as 8 calls of one item vs one call of 8
(what adaptive batching buys, before any serving overhead), and, on an accelerator, how far its outputs (bf16) are
from the same pipeline's fp32 outputs on the CPU (cosine similarity of the rows; agreement of the discrete codes).
`--sizes real` times the same pipelines at the released models' sizes instead, from folders with random weights
(`benchmarks/real_sizes.py`): what a GPU deployment's encoders do per item, without the checkpoints.

    .venv/bin/python benchmarks/bench_encoder_forward.py --out benchmarks/results/encoder_forward.md
    python3 benchmarks/bench_encoder_forward.py --sizes real --out benchmarks/results/encoder_forward_gpu.md
"""

from __future__ import annotations

import argparse
import base64
import copy
import io
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_encoders import machine, publish, test_png, test_wav  # noqa: E402
from benchmarks.real_sizes import write_real_size_folder  # noqa: E402
from hcxserve.config import load_track  # noqa: E402
from hcxserve.models import resolve_device  # noqa: E402
from hcxserve.protocol.payloads import AudioInput, ImageInput  # noqa: E402

BATCH = 8


def rows(embedding):
    import torch

    return torch.load(io.BytesIO(base64.b64decode(embedding.embeds_b64)), weights_only=True).float()


def pipeline(kind: str, track: str, device: str, dtype: str, real_sizes: Path | None = None, **settings):
    """The encoder pipeline its service builds, on `device` in `dtype`, with any other component `settings`."""
    from hcxserve.encoders.audio import AudioEncoderPipeline
    from hcxserve.encoders.vision import VisionEncoderPipeline

    config = load_track(track, profile="embedded")
    cfg = getattr(config.components, kind).model_copy(update={"device": device, "dtype": dtype, **settings})
    folder = config.component_dir(cfg.folder)
    if real_sizes is not None:
        out = real_sizes / f"{track}_{cfg.folder}"
        folder = out if (out / "model.safetensors").exists() else write_real_size_folder(folder, out, kind, device)
    if kind == "vision_encoder":
        return VisionEncoderPipeline.from_pretrained(folder, cfg, config.media)
    return AudioEncoderPipeline.from_pretrained(folder, cfg)


def items(kind: str, n: int) -> list:
    if kind == "vision_encoder":
        return [ImageInput(data=test_png(448 - 28 * (i % 3), 448)) for i in range(n)]
    return [AudioInput(data=test_wav(3.0 + 0.25 * (i % 3)), max_seconds=60) for i in range(n)]


def timed(fn, rounds: int, device: str = "cpu") -> float:
    """Median seconds of `fn` over `rounds`, waiting for the accelerator's queued work each time."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for _ in range(rounds):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(kind: str, track: str, device: str, dtype: str, rounds: int, real_sizes: Path | None) -> dict:
    import torch

    encoder = pipeline(kind, track, device, dtype, real_sizes)
    in_turn = copy.copy(encoder)  # the same models, a batch's items decoded and serialised one after another
    in_turn.pool = None
    batch = items(kind, BATCH)
    encoder.encode(batch)  # warm-up (kernels, allocator)
    assert in_turn.encode(batch) == encoder.encode(batch)  # the same bytes either way
    one_by_one = timed(lambda: [encoder.encode([item]) for item in batch], rounds, device)
    together = timed(lambda: encoder.encode(batch), rounds, device)
    together_in_turn = timed(lambda: in_turn.encode(batch), rounds, device)
    result = {
        "bs1": BATCH / one_by_one,
        "batched": BATCH / together,
        "in_turn": BATCH / together_in_turn,
        "threads": encoder.pool._max_workers if encoder.pool is not None else 1,
    }
    if device != "cpu" and real_sizes is None:  # random weights at 32 layers: their bf16 drift means nothing
        reference = pipeline(kind, track, "cpu", "float32").encode(batch[:2])
        ours = encoder.encode(batch[:2])
        cosines, agree = [], []
        for got, want in zip(ours, reference, strict=True):
            a, b = rows(got.embedding), rows(want.embedding)
            cosines.append(torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item())
            if want.embedding.discrete_codes is not None:
                same = [x == y for x, y in zip(got.embedding.discrete_codes, want.embedding.discrete_codes)]
                agree.append(sum(same) / len(same))
        result["min_cosine"] = min(cosines)
        result["codes_agree"] = min(agree) if agree else None
    return result


def tower_forward(device: str, dtype: str, rounds: int, real_sizes: Path | None) -> list[str]:
    """Track A's vision tower forward pass alone (448x448 images, preprocessed once): the packed attention the tower
    runs against transformers' own loop of one SDPA per window, on the same tower and pixels."""
    from PIL import Image

    from hcxserve.models.varlen_attention import PACKED_SDPA

    tower = pipeline("vision_encoder", "a", device, dtype, real_sizes).tower
    images = [Image.open(io.BytesIO(test_png(448, 448))) for _ in range(BATCH)]
    lines = []
    for n in (1, BATCH):
        batch = tower.processor(images=images[:n], return_tensors="pt")
        seconds = {}
        for impl in ("sdpa", PACKED_SDPA):
            tower.model.config._attn_implementation = impl
            run = partial(tower._forward, batch["pixel_values"], batch["image_grid_thw"])
            run()  # warm-up
            seconds[impl] = timed(run, rounds, device)
        loop, packed = seconds["sdpa"] * 1000, seconds[PACKED_SDPA] * 1000
        lines.append(f"| {n} | {loop:.1f} | {packed:.1f} | {loop / packed:.2f}x |")
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def serialise(rounds: int) -> list[str]:
    """One batch output's embeddings put on the wire, item by item (8 x 256 rows of 5120 bf16, a released-size image
    batch): `encode_tensor` against the plain way it was written before (stdlib base64 of a copied buffer)."""
    import torch

    from hcxserve.protocol.payloads import encode_tensor

    def plain(tensor) -> str:
        buffer = io.BytesIO()
        torch.save(tensor.detach().cpu().clone(), buffer)
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    rows = torch.randn(BATCH * 256, 5120).bfloat16().split(256)
    assert all(plain(r) == encode_tensor(r) for r in rows[:2])  # the same wire bytes
    before = timed(lambda: [plain(r) for r in rows], rounds) * 1000
    after = timed(lambda: [encode_tensor(r) for r in rows], rounds) * 1000
    return [f"| {BATCH} x 256 x 5120 bf16 | {before:.1f} | {after:.1f} | {before / after:.2f}x |"]


def main() -> None:

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=resolve_device("auto"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", choices=["embedded", "real"], default="embedded")
    parser.add_argument("--out")
    args = parser.parse_args()
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    encoders = [("vision_encoder", "a"), ("vision_encoder", "b"), ("audio_encoder", "b")]
    sizes = "released models' sizes, random weights" if args.sizes == "real" else "embedded default encoders"
    lines = [
        f"# Encoder pipelines in-process ({time.strftime('%Y-%m-%d')}): batch of {BATCH} vs {BATCH} calls of one",
        "",
        f"- Machine: {machine()}",
        f"- Device: {args.device} ({dtype}); {sizes}; items: 392-448 x 448 PNGs, 3-3.5 s WAVs",
        f"- Command: `.venv/bin/python benchmarks/bench_encoder_forward.py {' '.join(sys.argv[1:])}`",
        "",
        "A batch's items are decoded, preprocessed and serialised side by side in the encoder's item threads (by",
        "default one per core), or one after another (`item_threads: 1`; the same pipeline, items and bytes):",
        "",
        "| encoder | items/s, one per call | items/s, batch of 8 | ratio | batch of 8, items in turn "
        "| side by side / in turn | min cosine vs CPU fp32 | codes equal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory(prefix="hcx-real-sizes-") as tmp:
        real_sizes = Path(tmp) if args.sizes == "real" else None
        for kind, track in encoders:
            lines.append(row(kind, track, measure(kind, track, args.device, dtype, args.rounds, real_sizes)))
            print(lines[-1], file=sys.stderr, flush=True)
            publish(lines, args.out, partial=True)
        lines += [
            "",
            "Track A's vision tower forward alone, 448x448 images: one SDPA per attention window (transformers' loop)",
            "against the packed attention the tower runs (one SDPA per window length), same tower and pixels:",
            "",
            "| images | one SDPA per window, ms | packed, ms | ratio |",
            "|---:|---:|---:|---:|",
            *tower_forward(args.device, dtype, args.rounds, real_sizes),
            "",
            "Serialising a batch's embeddings for the wire, item by item (CPU), before and now:",
            "",
            "| embeddings | stdlib base64 of a copy, ms | encode_tensor, ms | ratio |",
            "|---|---:|---:|---:|",
            *serialise(max(args.rounds, 5)),
        ]
    publish(lines, args.out)


def row(kind: str, track: str, r: dict) -> str:
    cosine = f"{r['min_cosine']:.4f}" if "min_cosine" in r else "-"
    codes = f"{r['codes_agree']:.3f}" if r.get("codes_agree") is not None else "-"
    batched = f"{r['bs1']:.1f} | {r['batched']:.1f} | {r['batched'] / r['bs1']:.2f}x"
    threads = f"{r['in_turn']:.1f} | {r['batched'] / r['in_turn']:.2f}x ({r['threads']} threads)"
    name = f"{kind.replace('_', ' ')}, track {track.upper()}"
    return f"| {name} | {batched} | {threads} | {cosine} | {codes} |"


if __name__ == "__main__":
    main()
