"""Where the embedded LLM's decoding time goes on a CPU: the track's vLLM engine alone (the embedded profile's exact
command line), served in turn with each setting that could matter, nothing else running.

Variants: the profile as it is; vLLM's CPU thread binding told to reserve no core for its scheduler process (by
default it reserves one per worker, which leaves a 2-core machine one OpenMP thread); CUDA-graph-free compilation
(`torch.compile`) instead of eager mode; both. Measured per variant: time to ready, single-stream decoding speed
(a 129-token completion minus a 1-token one, so prefill and HTTP cancel out; median of `--rounds`), and the p50 of
a 1-token completion.

    .venv/bin/python benchmarks/bench_embedded_llm.py --out benchmarks/results/embedded_llm.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_encoders import machine, publish  # noqa: E402
from hcxserve.config import load_track  # noqa: E402
from hcxserve.llm.args import vllm_server_command  # noqa: E402
from hcxserve.tooling.testing import ServedProcess, free_port, serve_env  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
# name -> (environment, eager)
VARIANTS = {
    "embedded profile (eager, vLLM's default binding)": ({}, True),
    "no core reserved for the scheduler": ({"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}, True),
    "torch.compile instead of eager": ({}, False),
    "no core reserved + torch.compile": ({"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}, False),
}


def completion(client: httpx.Client, url: str, model: str, tokens: int) -> float:
    payload = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": tokens,
               "min_tokens": tokens, "ignore_eos": True, "temperature": 0.0}  # fmt: skip
    start = time.perf_counter()
    response = client.post(url, json=payload)
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    assert response.json()["usage"]["completion_tokens"] == tokens
    return elapsed


def measure(name: str, env: dict[str, str], eager: bool, args: argparse.Namespace) -> dict:
    track = load_track(args.track, profile="embedded")
    track.llm.enforce_eager = eager
    port = free_port()
    log = Path(args.log_dir) / f"{name.split()[0]}-{port}.log"
    server = ServedProcess(vllm_server_command(track, port=port), serve_env(**track.llm.env, **env), log)
    try:
        ready = server.wait_ready(f"http://127.0.0.1:{port}/health", timeout=900)
        url, model = f"http://127.0.0.1:{port}/v1/chat/completions", track.llm.served_model_name
        with httpx.Client(timeout=600) as client:
            completion(client, url, model, 8)  # warm-up
            short = [completion(client, url, model, 1) for _ in range(args.rounds)]
            long = [completion(client, url, model, args.tokens + 1) for _ in range(args.rounds)]
    finally:
        server.stop()
    decode_s = statistics.median(long) - statistics.median(short)
    return {"ready": ready, "tokens_per_s": args.tokens / decode_s, "short_p50": statistics.median(short)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--track", default="a")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--log-dir", default="/tmp/hcx-bench-embedded-llm")
    parser.add_argument("--out")
    args = parser.parse_args()
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    results = {name: measure(name, env, eager, args) for name, (env, eager) in VARIANTS.items()}
    base = results[next(iter(VARIANTS))]["tokens_per_s"]
    lines = [
        f"# The embedded LLM (track {args.track.upper()}) decoding on a CPU",
        "",
        f"Machine: {machine()}.",
        f"Command: `.venv/bin/python benchmarks/bench_embedded_llm.py --track {args.track} --tokens {args.tokens} "
        f"--rounds {args.rounds}`",
        "",
        "| variant | ready (s) | decoding, single stream (tokens/s) | vs the profile | 1-token completion p50 (s) |",
        "|---|---|---|---|---|",
    ]
    for name, row in results.items():
        lines.append(
            f"| {name} | {row['ready']:.0f} | {row['tokens_per_s']:.1f} | {row['tokens_per_s'] / base:.2f}x | "
            f"{row['short_p50']:.3f} |"
        )
    publish(lines, args.out)


if __name__ == "__main__":
    main()
