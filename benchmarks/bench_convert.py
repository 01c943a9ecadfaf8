#!/usr/bin/env python
"""Benchmark of convert_model.py on a synthetic multi-GB track-a (Think-32B layout) checkpoint.

Builds the checkpoint once (cached under --data-dir), converts it in a child process per scenario and reports wall
time, throughput and the child's peak RSS (os.wait4 rusage, i.e. ru_maxrss of exactly that process).

    .venv/bin/python benchmarks/bench_convert.py --size-gb 3 --shards 5 --repeat 3 [--data-dir DIR] [--cleanup]

"cold" scenarios drop the input files from the page cache first (posix_fadvise DONTNEED, no root needed), so they
include reading from disk; output is not fsynced (as in the converter), so writes end in the page cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GB = 10**9

# A HyperCLOVAX-like LLM (bf16): hidden 3072, GQA 24/8 heads, SwiGLU 8192, vocab 100352; depth set by --size-gb.
HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 3072, 8192, 24, 8, 128, 100352
VIT = {"depth": 4, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 5120}


@dataclass
class Run:
    name: str
    args: list[str]
    wall_s: float
    peak_rss: int  # ru_maxrss from wait4
    sampled_rss: int  # max of psutil samples every 50 ms
    rc: int


def layer_shapes(i: int) -> dict[str, tuple[int, ...]]:
    p = f"model.language_model.model.layers.{i}."
    return {
        p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
        p + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        p + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        p + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
        p + "mlp.gate_proj.weight": (INTER, HIDDEN),
        p + "mlp.up_proj.weight": (INTER, HIDDEN),
        p + "mlp.down_proj.weight": (HIDDEN, INTER),
        p + "input_layernorm.weight": (HIDDEN,),
        p + "post_attention_layernorm.weight": (HIDDEN,),
    }


def vit_shapes() -> dict[str, tuple[int, ...]]:
    h, m = VIT["hidden_size"], VIT["intermediate_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.vision_model.patch_embed.proj.weight": (h, 3, 2, 14, 14)}
    for i in range(VIT["depth"]):
        p = f"model.vision_model.blocks.{i}."
        shapes |= {
            p + "norm1.weight": (h,), p + "norm2.weight": (h,),
            p + "attn.qkv.weight": (3 * h, h), p + "attn.qkv.bias": (3 * h,),
            p + "attn.proj.weight": (h, h), p + "attn.proj.bias": (h,),
            p + "mlp.gate_proj.weight": (m, h), p + "mlp.gate_proj.bias": (m,),
            p + "mlp.up_proj.weight": (m, h), p + "mlp.up_proj.bias": (m,),
            p + "mlp.down_proj.weight": (h, m), p + "mlp.down_proj.bias": (h,),
        }  # fmt: skip
    shapes |= {
        "model.vision_model.merger.ln_q.weight": (h,),
        "model.vision_model.merger.mlp.0.weight": (4 * h, 4 * h),
        "model.vision_model.merger.mlp.0.bias": (4 * h,),
        "model.vision_model.merger.mlp.2.weight": (VIT["out_hidden_size"], 4 * h),
        "model.vision_model.merger.mlp.2.bias": (VIT["out_hidden_size"],),
        "model.mm_projector.weight": (HIDDEN, VIT["out_hidden_size"]),
        "model.mm_projector.bias": (HIDDEN,),
    }
    return shapes


def model_shapes(size_gb: float) -> tuple[dict[str, tuple[int, ...]], int]:
    head = {"model.language_model.model.embed_tokens.weight": (VOCAB, HIDDEN)}
    tail = {
        "model.language_model.model.norm.weight": (HIDDEN,),
        "model.language_model.lm_head.weight": (VOCAB, HIDDEN),
    } | vit_shapes()
    per_layer = sum(_numel(s) for s in layer_shapes(0).values()) * 2
    fixed = sum(_numel(s) for s in (head | tail).values()) * 2
    n_layers = max(1, round((size_gb * GB - fixed) / per_layer))
    shapes = dict(head)  # module order, as HF writes it
    for i in range(n_layers):
        shapes |= layer_shapes(i)
    return shapes | tail, n_layers


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def build_checkpoint(path: Path, size_gb: float, n_shards: int) -> None:
    """Write config + index + shards in module order, one shard in memory at a time."""
    import torch
    from safetensors.torch import save_file

    stamp = path / ".bench-complete"
    want = f"{size_gb}:{n_shards}"
    if stamp.exists() and stamp.read_text() == want:
        print(f"reusing cached checkpoint {path}")
        return
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    shapes, n_layers = model_shapes(size_gb)
    total = sum(_numel(s) for s in shapes.values()) * 2
    target = total / n_shards
    groups: list[list[str]] = [[]]
    size = 0
    for key, shape in shapes.items():
        if size >= target and len(groups) < n_shards:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += _numel(shape) * 2
    weight_map = {}
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: torch.randn(shapes[k], generator=gen, dtype=torch.float32).to(torch.bfloat16) for k in keys}
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        del tensors
        weight_map |= {k: name for k in keys}
        print(f"  wrote {name} ({(path / name).stat().st_size / GB:.2f} GB)", flush=True)
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (path / "config.json").write_text(json.dumps(bench_config(n_layers), indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        (path / name).write_text("{}")
    stamp.write_text(want)
    print(f"built {total / GB:.2f} GB in {len(groups)} shards in {time.perf_counter() - t0:.0f} s")


def bench_config(n_layers: int) -> dict:
    return {
        "architectures": ["HCXVisionForCausalLM"],
        "model_type": "vlm",
        "text_config": {
            "model_type": "hyperclovax", "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": INTER,
            "num_hidden_layers": n_layers, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
            "head_dim": HEAD_DIM, "torch_dtype": "bfloat16",
        },
        "vision_config": VIT
        | {"model_type": "qwen2_5_vl", "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        "image_token_id": 128060,
        "video_token_id": 128061,
    }  # fmt: skip


def drop_page_cache(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages are not dropped, so write them back first
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run_convert(name: str, ckpt: Path, out: Path, extra: list[str], cold: bool) -> Run:
    shutil.rmtree(out, ignore_errors=True)
    if cold:
        drop_page_cache(ckpt)
    args = [sys.executable, str(ROOT / "convert_model.py"), "-i", str(ckpt), "-o", str(out), "-t", "a", "-q", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, cwd=ROOT)
    sampled = 0
    while True:  # wait4 gives ru_maxrss of exactly this child; the psutil samples are a cross-check
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        sampled = max(sampled, _rss(proc.pid))
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    run = Run(name, args[1:], wall, usage.ru_maxrss * 1024, sampled, proc.returncode)
    shutil.rmtree(out, ignore_errors=True)
    return run


def median_run(runs: list[Run]) -> Run:
    """Median wall time (the machine is shared, so single runs are noisy); the worst RSS and exit code."""
    walls = sorted(r.wall_s for r in runs)
    first = runs[0]
    return Run(
        f"{first.name} (median of {len(runs)}: {', '.join(f'{w:.1f}' for w in walls)} s)",
        first.args, walls[len(walls) // 2], max(r.peak_rss for r in runs), max(r.sampled_rss for r in runs),
        max((r.rc for r in runs), key=abs),
    )  # fmt: skip


def _rss(pid: int) -> int:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except Exception:  # the process may just have exited
        return 0


def disk_read_ceiling(files: list[Path]) -> float:
    """Cold sequential read of the largest input shard in MB/s: the best a cold conversion can do."""
    path = max(files, key=lambda p: p.stat().st_size)
    drop_page_cache(path.parent)
    fd = os.open(path, os.O_RDONLY)
    t0, n = time.perf_counter(), 0
    try:
        while chunk := os.read(fd, 64 << 20):
            n += len(chunk)
    finally:
        os.close(fd)
    return n / 1e6 / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=3.0)
    ap.add_argument("--shards", type=int, default=5)
    ap.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "hcx-bench-convert")
    ap.add_argument("--repeat", type=int, default=3, help="runs per scenario; the median wall time is reported")
    ap.add_argument("--cleanup", action="store_true", help="delete the synthetic checkpoint afterwards")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    ckpt, out = args.data_dir / "think-synthetic", args.data_dir / "out"
    if args.build_only:
        build_checkpoint(ckpt, args.size_gb, args.shards)
        return 0
    # Built in a child so that this process stays small: a forked child inherits its parent's RSS high-water mark,
    # which would inflate the converter's ru_maxrss.
    build = [sys.executable, __file__, "--build-only", "--size-gb", str(args.size_gb), "--shards", str(args.shards)]
    subprocess.run([*build, "--data-dir", str(args.data_dir)], check=True)
    shards = sorted(ckpt.glob("model-*.safetensors"))
    largest = max(p.stat().st_size for p in shards)
    total = sum(p.stat().st_size for p in shards)
    scenarios = [
        ("keep dtype, cold cache", [], True),
        ("keep dtype, warm cache", [], False),
        ("keep dtype + --verify, cold cache", ["--verify"], True),
        ("--dtype float16 (cast), cold cache", ["--dtype", "float16"], True),
    ]
    ceiling = disk_read_ceiling(shards)
    load = os.getloadavg()[0]
    runs = [
        median_run([run_convert(name, ckpt, out, extra, cold) for _ in range(args.repeat)])
        for name, extra, cold in scenarios
    ]
    if args.cleanup:
        shutil.rmtree(args.data_dir, ignore_errors=True)

    rss_limit = largest + GB // 2
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"input: {total / GB:.2f} GB in {len(shards)} shards, largest shard {largest / GB:.2f} GB")
    print(f"targets: peak RSS <= {rss_limit / 1e6:.0f} MB (largest shard + 0.5 GB), >= 300 MB/s")
    print(f"cold sequential read of the largest shard: {ceiling:.0f} MB/s; 1-min load average at start: {load:.2f}\n")
    print(
        "| scenario | wall (s) | MB/s | peak RSS, ru_maxrss (MB) | peak RSS, sampled (MB) "
        "| RSS target | MB/s target | rc |"
    )
    print("|---|---:|---:|---:|---:|:-:|:-:|:-:|")
    for r in runs:
        mbs = total / 1e6 / r.wall_s
        print(
            f"| {r.name} | {r.wall_s:.1f} | {mbs:.0f} | {r.peak_rss / 1e6:.0f} | {r.sampled_rss / 1e6:.0f} | "
            f"{'ok' if r.peak_rss <= rss_limit else 'MISSED'} | {'ok' if mbs >= 300 else 'MISSED'} | {r.rc} |"
        )
    print("\ncommands (python = " + sys.executable + "):")
    for r in runs:
        print("  python " + shlex.join(r.args))
    return 0 if all(r.rc == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
