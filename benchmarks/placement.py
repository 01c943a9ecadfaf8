"""Where a benchmark's processes run: `split` gives vLLM (every process and thread of it, one OpenMP thread) the
machine's last core and the rest of the bento, the load generators and the timing process the other cores, as a
deployment gives the gateway cores of its own and vLLM an accelerator; `shared` (the default) lets every process
run on every core. On a small machine `shared` measures the processes' competition for its cores as much as the
server."""

from __future__ import annotations

import os

import psutil

from hcxserve.config import load_track

PLACEMENTS = ("shared", "split")


# read once, before `apply` narrows this process's own affinity
CORES = sorted(os.sched_getaffinity(0))
LLM_CORES, OTHER_CORES = set(CORES[-1:]), set(CORES[:-1])


def overrides(placement: str, track: str) -> dict:
    """The track's configuration for `placement`: under `split`, vLLM's one OpenMP thread on its core."""
    if placement != "split":
        return {}
    if not OTHER_CORES:
        raise SystemExit("--placement split needs at least two cores")
    env = load_track(track).llm.env
    return {f"{track}.llm.env": {**env, "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, sorted(LLM_CORES)))}}


def pin(process: psutil.Process, cores: set[int]) -> None:
    """Every thread of `process` on `cores` (affinity is per thread; a new thread inherits its creator's)."""
    try:
        threads = process.threads()
    except psutil.NoSuchProcess:
        return
    for thread in threads:
        try:
            os.sched_setaffinity(thread.id, cores)
        except OSError:  # gone meanwhile
            pass


def apply(placement: str, server_pid: int) -> str:
    """Places the served bento (its `bentoml serve` process tree) and this process; says where each runs."""
    if placement != "split":
        return "every process on every core"
    root = psutil.Process(server_pid)
    bento = [root, *root.children(recursive=True)]
    vllm = {
        process.pid
        for launcher in bento  # the LLM supervisor and the vLLM server it runs both name vLLM's entry point
        if "vllm.entrypoints" in " ".join(launcher.cmdline())
        for process in [launcher, *launcher.children(recursive=True)]
    }
    for process in bento:
        pin(process, LLM_CORES if process.pid in vllm else OTHER_CORES)
    pin(psutil.Process(), OTHER_CORES)
    return f"vLLM on core(s) {sorted(LLM_CORES)}, everything else (gateway, encoders, clients) on {sorted(OTHER_CORES)}"
