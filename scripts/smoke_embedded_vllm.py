"""Smoke test: vLLM (offline `LLM`) serves the embedded track A unified checkpoint, with pixels and text.

Usage: python scripts/smoke_embedded_vllm.py [CHECKPOINT_DIR]   (default models/embedded/unified/track_a)
CPU settings as measured on the 2-core machines: fp32, eager, 1 GiB KV cache.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_DIR = Path(__file__).resolve().parents[1] / "models" / "embedded" / "unified" / "track_a"


def sample_image():
    """A 320x240 picture of a red square on a blue sky over green grass."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (320, 240), (90, 150, 230))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 160, 320, 240], fill=(40, 160, 60))
    draw.rectangle([120, 80, 200, 160], fill=(220, 30, 30))
    return image


def compare_with_hf_reference(model_dir: Path, image, prompt_ids: list[int], vllm_ids: list[int]) -> bool:
    """Greedy-decode the same expanded prompt with transformers modules loaded from the checkpoint."""
    import torch

    from hcxserve.tooling.embedded.checks import load_unified_fp32

    ref = load_unified_fp32(model_dir)
    config = ref["config"]
    features = ref["processor"].image_processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        pooled = ref["vision"](features["pixel_values"].float(), grid_thw=features["image_grid_thw"]).pooler_output
        rows = ref["projector"](pooled)
        ids = torch.tensor([prompt_ids])
        embeds = ref["lm"].get_input_embeddings()(ids)
        mask = ids[0] == config.image_token_id
        if int(mask.sum()) != rows.shape[0]:
            print(f"[smoke] reference: {int(mask.sum())} pads but {rows.shape[0]} image rows", flush=True)
            return False
        embeds[0, mask] = rows
        generated: list[int] = []
        past = None
        step = embeds
        for _ in range(len(vllm_ids)):
            result = ref["lm"](inputs_embeds=step, past_key_values=past, use_cache=True)
            past = result.past_key_values
            logits = result.logits[0, -1]
            logits[2] = float("-inf")  # vLLM's min_tokens masks EOS (<|im_end|>) the same way
            nxt = int(logits.argmax())
            generated.append(nxt)
            step = ref["lm"].get_input_embeddings()(torch.tensor([[nxt]]))
    if generated != vllm_ids:
        print(f"[smoke] reference tokens {generated}\n[smoke] vLLM tokens      {vllm_ids}", flush=True)
    return generated == vllm_ids


def main() -> int:
    from vllm import LLM, SamplingParams

    model_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR
    started = time.monotonic()
    llm = LLM(model=str(model_dir), dtype="float32", enforce_eager=True, gpu_memory_utilization=0.3,
              max_model_len=2048, max_num_seqs=4)
    print(f"[smoke] LLM ready in {time.monotonic() - started:.1f} s", flush=True)
    greedy = SamplingParams(temperature=0.0, max_tokens=48)

    t = time.monotonic()
    image_chat = [{"role": "user", "content": [{"type": "image_pil", "image_pil": sample_image()},
                                              {"type": "text", "text": "What is in this image?"}]}]
    # min_tokens keeps the tiny model talking long enough for a meaningful token-by-token comparison.
    out = llm.chat(image_chat, SamplingParams(temperature=0.0, max_tokens=32, min_tokens=32))[0]
    n_pad = out.prompt_token_ids.count(49153)
    print(f"[smoke] image chat: prompt_tokens={len(out.prompt_token_ids)} image_pads={n_pad} "
          f"({time.monotonic() - t:.2f} s)\n  -> {out.outputs[0].text!r}", flush=True)

    matched = compare_with_hf_reference(model_dir, image_chat[0]["content"][0]["image_pil"], out.prompt_token_ids,
                                        list(out.outputs[0].token_ids))
    print(f"[smoke] image chat vs transformers reference (ViT -> mm_projector -> HyperCLOVAX): "
          f"{'identical tokens' if matched else 'DIFFERENT tokens'}", flush=True)

    t = time.monotonic()
    text_chat = [{"role": "user", "content": "What is the capital of France?"}]
    out = llm.chat(text_chat, greedy)[0]
    print(f"[smoke] text chat: prompt_tokens={len(out.prompt_token_ids)} ({time.monotonic() - t:.2f} s)\n"
          f"  -> {out.outputs[0].text!r}", flush=True)

    t = time.monotonic()
    out = llm.chat(text_chat, SamplingParams(temperature=0.0, max_tokens=24),
                   chat_template_kwargs={"thinking": True})[0]
    print(f"[smoke] thinking chat (prompt ends with <think>\\n): ({time.monotonic() - t:.2f} s)\n"
          f"  -> {out.outputs[0].text!r}", flush=True)
    print(f"[smoke] done in {time.monotonic() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
