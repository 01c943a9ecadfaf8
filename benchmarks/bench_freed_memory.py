"""What keeping freed memory (`keep_freed_memory`, every torch component's default) buys a batch, in-process.

glibc hands blocks over 32 MiB back to the kernel when they are freed, so each batch's large tensors are new pages
that fault in on first touch; kept, the next batch reuses them. The setting is for a whole process and for good, so
each configuration runs in processes of its own, alternating: the real component pipelines (`hcxserve.encoders`,
`hcxserve.decoders`) on the embedded default models, the same batch timed again and again, and the process's RSS
at the end (what keeping costs).

    .venv/bin/python benchmarks/bench_freed_memory.py --out benchmarks/results/freed_memory.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_encoder_forward import items, pipeline, timed  # noqa: E402
from benchmarks.bench_encoders import machine, publish  # noqa: E402
from hcxserve.config import load_track  # noqa: E402

# key -> (label, track, component, items per batch)
COMPONENTS = {
    "vision-a": ("vision encoder, track A", "a", "vision_encoder", 8),
    "vision-b": ("vision encoder, track B", "b", "vision_encoder", 8),
    "audio-b": ("audio encoder, track B", "b", "audio_encoder", 8),
    "audio-decoder": ("audio decoder, track B", "b", "audio_decoder", 4),
    "vision-decoder": ("vision decoder, track B", "b", "vision_decoder", 2),
}
MODES = ("returned", "kept")


def batch_call(track: str, component: str, size: int, keep: bool):
    """The component's pipeline, built as its service builds it but for `keep_freed_memory`, and a call that runs
    one batch of `size` items through it."""
    from hcxserve.decoders.audio import AudioDecoderPipeline
    from hcxserve.decoders.vision import VisionDecoderPipeline
    from hcxserve.protocol.payloads import ImageRequest, SpeechRequest

    if component in ("vision_encoder", "audio_encoder"):
        encoder, inputs = pipeline(component, track, "cpu", "float32", keep_freed_memory=keep), items(component, size)
        return lambda: encoder.encode(inputs)
    config = load_track(track, profile="embedded")
    cfg = getattr(config.components, component).model_copy(update={"device": "cpu", "keep_freed_memory": keep})
    folder = config.component_dir(cfg.folder)
    if component == "audio_decoder":
        decoder = AudioDecoderPipeline.from_pretrained(folder, cfg)
        units = json.loads((folder / "finetuned" / "config.json").read_text())["num_units"]
        requests = [SpeechRequest(units=[(i * 37 + j) % units for i in range(125)]) for j in range(size)]  # 5 s
        return lambda: decoder.decode(requests)
    decoder = VisionDecoderPipeline.from_pretrained(folder, cfg)
    codebook = json.loads((folder / "token_embedder" / "config.json").read_text())["vocab_size"]
    requests = [
        ImageRequest(ratio="1:1", codes=[(i * 31 + j) % codebook for i in range(729)], steps=4, seed=j)
        for j in range(size)
    ]
    return lambda: decoder.generate(requests)


def child(key: str, mode: str, rounds: int) -> dict:
    _, track, component, size = COMPONENTS[key]
    run = batch_call(track, component, size, keep=mode == "kept")
    run()  # warm-up
    seconds = timed(run, rounds)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {"items_per_s": size / seconds, "rss_mb": int(status["VmRSS"].split()[0]) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="batches timed per process")
    parser.add_argument("--repeats", type=int, default=2, help="processes per configuration, alternating")
    parser.add_argument("--components", default=",".join(COMPONENTS), help=f"comma-separated, of {list(COMPONENTS)}")
    parser.add_argument("--out")
    parser.add_argument("--child", nargs=2, metavar=("COMPONENT", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.rounds)))
        return
    lines = [
        f"# Freed memory returned to the kernel vs kept for the next batch ({time.strftime('%Y-%m-%d')})",
        "",
        f"- Machine: {machine()}",
        "- Device: cpu (float32); embedded default models; the real pipelines, one batch timed again and again",
        f"- Each configuration in {args.repeats} processes of its own, alternating; {args.rounds} batches per process "
        "(median), after one to warm up; RSS at the end of the process",
        "- Batches: 8 PNGs of 392-448 x 448; 8 WAVs of 3-3.5 s; 4 x 5 s of speech (125 units, WAV); "
        "2 images of 768 x 768, 4 steps",
        f"- Command: `.venv/bin/python benchmarks/bench_freed_memory.py {' '.join(sys.argv[1:])}`",
        "",
        "| component | batch | items/s, returned (glibc's default) | items/s, kept | ratio | RSS MB, returned | "
        "RSS MB, kept |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key in args.components.split(","):
        label, _, _, size = COMPONENTS[key]
        results: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            for mode in MODES:
                command = [sys.executable, __file__, "--rounds", str(args.rounds), "--child", key, mode]
                done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
                results[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
        speed = {mode: statistics.median(r["items_per_s"] for r in results[mode]) for mode in MODES}
        rss = {mode: statistics.median(r["rss_mb"] for r in results[mode]) for mode in MODES}
        lines.append(
            f"| {label} | {size} | {speed['returned']:.3g} | {speed['kept']:.3g} | "
            f"{speed['kept'] / speed['returned']:.2f}x | {rss['returned']:.0f} | {rss['kept']:.0f} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
        publish(lines, args.out, partial=True)
    publish(lines, args.out)


if __name__ == "__main__":
    main()
