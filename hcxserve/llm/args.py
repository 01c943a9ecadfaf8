"""The vLLM OpenAI-server command line for a track's LLM component, built from its `LLMConfig`.

Used by the LLM service and by the benchmarks (so "bare vLLM" baselines run the very same engine settings).
"""

from __future__ import annotations

import json
import sys

from hcxserve.config import TrackConfig


def vllm_server_command(
    track: TrackConfig, *, model: str | None = None, port: int | None = None, embeds_only: bool = True
) -> list[str]:
    """`embeds_only`: skip the vision tower inside vLLM (our VisionEncoder service runs it) and accept
    precomputed `image_embeds`; False serves the whole VLM from pixels (the benchmark baseline)."""
    llm = track.llm
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model or str(track.component_dir("llm")),
        "--served-model-name",
        llm.served_model_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port or llm.port),
        "--tensor-parallel-size",
        str(llm.tensor_parallel_size),
        "--dtype",
        llm.dtype,
        "--max-model-len",
        str(llm.max_model_len),
        "--gpu-memory-utilization",
        str(llm.gpu_memory_utilization),
        "--chat-template",
        str(track.resolve(llm.chat_template)),
        "--chat-template-content-format",
        "openai",
        "--reasoning-parser",
        llm.reasoning_parser,
        "--reasoning-config",
        json.dumps({"reasoning_start_str": llm.reasoning_start, "reasoning_end_str": llm.reasoning_end}),
        "--enable-prefix-caching" if llm.enable_prefix_caching else "--no-enable-prefix-caching",
        "--disable-uvicorn-access-log",
        # usage.prompt_tokens_details.cached_tokens: how much of each prompt vLLM's prefix cache served
        "--enable-prompt-tokens-details",
        "--shutdown-timeout",
        str(llm.shutdown_timeout_s),
    ]
    if embeds_only:
        # limit 0 keeps vLLM from building or profiling encoders; precomputed embeddings are still accepted
        cmd += ["--enable-mm-embeds", "--limit-mm-per-prompt", json.dumps(dict.fromkeys(llm.modalities, 0))]
    if llm.architecture:
        cmd += ["--hf-overrides", json.dumps({"architectures": [llm.architecture]})]
    if llm.tool_call_parser:
        cmd += ["--enable-auto-tool-choice", "--tool-call-parser", llm.tool_call_parser]
    if llm.max_num_seqs:
        cmd += ["--max-num-seqs", str(llm.max_num_seqs)]
    if llm.enforce_eager:
        cmd.append("--enforce-eager")
    return cmd + list(llm.extra_args)


# BentoML's proxy kills the service's command 30 s after asking it to stop: vLLM's own leftovers must be gone first
_PROXY_KILL_AFTER_S = 30


def supervised_command(track: TrackConfig) -> list[str]:
    """The LLM service's command: vLLM's server under `hcxserve.llm.supervisor`, which starts it again if it dies."""
    llm = track.llm
    grace = max(1, min(llm.shutdown_timeout_s + 2, _PROXY_KILL_AFTER_S - 3))
    return [
        sys.executable, "-m", "hcxserve.llm.supervisor",
        "--max-restarts", str(llm.max_restarts), "--window", str(llm.restart_window_s), "--grace", str(grace),
        "--", *vllm_server_command(track),
    ]  # fmt: skip
