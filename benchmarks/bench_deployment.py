"""Deployment benchmark: time to ready and memory of the combined bento (both tracks behind one gateway) against the
two single-track bentos, in one run, on the embedded default models.

Each bento is served in turn (`bentoml serve`, nothing else running): time from the command to `/readyz` answering
200, then one greedy request per served track (so every engine has run), a few seconds to settle, and the RSS of
every process of the tree. Prints a markdown report; `--out` also writes it to a file.

    .venv/bin/python benchmarks/bench_deployment.py --out benchmarks/results/deployment.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_encoders import machine, publish  # noqa: E402
from benchmarks.bench_serving import command_line, rss_table  # noqa: E402
from hcxserve.tooling.testing import serve_bento  # noqa: E402

BENTOS = {  # name -> (target, tracks)
    "track A": ("bentos.track_a:Gateway", ["a"]),
    "track B": ("bentos.track_b:Gateway", ["b"]),
    "both tracks": ("bentos.combined:Gateway", ["a", "b"]),
}
MODELS = {"a": "track_a_model", "b": "track_b_model"}


def measure(name: str, log_dir: Path, settle_s: float) -> dict:
    target, tracks = BENTOS[name]
    bento = serve_bento(target, log_dir / f"{name.replace(' ', '_')}.log", tracks=tracks)
    try:
        ready = bento.wait_ready(f"{bento.url}/readyz", timeout=900)
        answers = {}
        for track in tracks:
            body = {
                "model": MODELS[track],
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 8,
                "temperature": 0,
                "chat_template_kwargs": {"skip_reasoning": True},
            }
            response = httpx.post(f"{bento.url}/{track}/v1/chat/completions", json=body, timeout=300)
            response.raise_for_status()
            answers[track] = response.json()["choices"][0]["message"]["content"]
        time.sleep(settle_s)
        rss = bento.rss_by_process()
    finally:
        bento.stop()
    print(f"{name}: ready {ready:.1f} s, RSS {sum(rss.values()) / 1024:.2f} GB, answers {answers}", file=sys.stderr)
    return {"ready": ready, "rss": rss, "answers": answers}


def report(results: dict[str, dict]) -> list[str]:
    both = results["both tracks"]
    singles = results["track A"]["rss"], results["track B"]["rss"]
    total = {name: sum(r["rss"].values()) / 1024 for name, r in results.items()}
    lines = [
        f"Deployment benchmark ({time.strftime('%Y-%m-%d')}, embedded default models, `bentoml serve`, one bento at a "
        "time, each after one request per track).",
        "",
        f"Machine: {machine()}.",
        "",
        "| bento | ready (s) | RSS of the whole tree (GB) |",
        "|---|---:|---:|",
        *[f"| {name} | {r['ready']:.1f} | {total[name]:.2f} |" for name, r in results.items()],
        "",
        "| check | value | target |",
        "|---|---:|---|",
        f"| both tracks: ready | {both['ready']:.1f} s | <= 120 s |",
        f"| both tracks: RSS / (track A + track B) "
        f"| {total['both tracks'] / (total['track A'] + total['track B']):.3f} | <= 1 |",
        "",
        "Where the combined bento's memory goes:",
        "",
        *rss_table(both["rss"]),
        "",
        "The single-track bentos, for comparison:",
        "",
        *rss_table({f"A: {k}": v for k, v in singles[0].items()} | {f"B: {k}": v for k, v in singles[1].items()}),
        "",
        command_line("bench_deployment.py"),
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds between the requests and the RSS sample")
    parser.add_argument("--log-dir", default="benchmarks/.data/logs")
    parser.add_argument("--out")
    args = parser.parse_args()
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HCX_PROFILE", "embedded")
    results = {name: measure(name, log_dir, args.settle) for name in BENTOS}
    publish(report(results), args.out)


if __name__ == "__main__":
    main()
