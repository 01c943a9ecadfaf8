"""Tiny synthetic unified HyperCLOVAX checkpoints in both real layouts (Think-32B = track a, Omni-8B = track b).

The LLM, ViT and audio-encoder tensors come from real (tiny, random) transformers modules, so converted folders
can be proven loadable with `load_state_dict(strict=True)`; the custom Omni parts (TA-Tok, CosyVoice, MambaMia)
get a few random tensors with plausible names, including integer and bool ones. The decoders are real and tiny:
`decoder/vision/` a seeded diffusers-layout vision decoder, `decoder/audio/` OmniServe's two TorchServe archives
holding seeded unit vocoders (both built once per session and copied into each checkpoint).
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from hcxserve.tooling.embedded.unit_vocoder import FINETUNED_ARCHIVE, SPEAKERS, ZERO_SHOT_ARCHIVE

TEXT_HIDDEN = 16
VIT_OUT = 48
IMAGE_TOKEN_ID = 60
VIDEO_TOKEN_ID = 61

SIDE_FILES: dict[str, str] = {
    "tokenizer.json": '{"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}',
    "tokenizer_config.json": '{"tokenizer_class": "GPT2Tokenizer", "model_max_length": 2048}',
    "special_tokens_map.json": '{"eos_token": "<|endofturn|>"}',
    "added_tokens.json": '{"<|IMAGE_PAD|>": 60, "<|VIDEO_PAD|>": 61}',
    "vocab.json": '{"a": 0, "b": 1}',
    "merges.txt": "#version: 0.2\na b\n",
    "chat_template.jinja": "{% for m in messages %}{{ m.content }}{% endfor %}",
    "generation_config.json": '{"eos_token_id": [2], "do_sample": false}',
    "preprocessor_config.json": '{"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 14, "merge_size": 2}',
    "processor_config.json": '{"processor_class": "HyperCLOVAXVisionV2Processor"}',
    "video_preprocessor_config.json": '{"video_processor_type": "Qwen2VLVideoProcessor"}',
}
# Unit vocoders far smaller than the embedded ones (50 units), each variant with its own config keys.
VOCODER: dict = {
    "num_units": 50,
    "unit_emb_dim": 8,
    "spk_emb_dim": 6,
    "upsample_rates": [10, 8, 12],
    "upsample_kernel_sizes": [20, 16, 24],
    "upsample_initial_channel": 16,
    "resblock": "1",
    "resblock_kernel_sizes": [3],
    "resblock_dilation_sizes": [[1]],
    "activation": "snakebeta",
    "snake_logscale": True,
}
FINETUNED_VOCODER: dict = {**VOCODER, "finetune": True, "num_spk": 4}
ZERO_SHOT_VOCODER: dict = {
    **VOCODER, "finetune": False, "num_mels": 20, "spk_hidden_dim": 16, "n_fft": 256, "hop_size": 64, "win_size": 256,
}  # fmt: skip


@dataclass
class FakeCheckpoint:
    root: Path
    track: str
    config: dict
    tensors: dict[str, torch.Tensor]  # input name -> tensor, as written
    shard_files: list[str]

    def shard_of(self, key: str) -> Path:
        index = json.loads((self.root / "model.safetensors.index.json").read_text())
        return self.root / index["weight_map"][key]


@functools.cache
def _modules() -> dict:
    """Built once per test session: the tiny transformers configs and state dicts (the import is the slow part)."""
    from transformers import HyperCLOVAXConfig, HyperCLOVAXForCausalLM, Qwen2_5_VLVisionConfig, Qwen2AudioEncoderConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder

    torch.manual_seed(0)
    text = HyperCLOVAXConfig(
        vocab_size=64, hidden_size=TEXT_HIDDEN, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, use_post_norm=False, tie_word_embeddings=False,
    )  # fmt: skip
    vision = Qwen2_5_VLVisionConfig(
        depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=VIT_OUT, fullatt_block_indexes=[1],
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112, in_channels=3,
    )  # fmt: skip
    audio = Qwen2AudioEncoderConfig(d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32)
    return {
        "text_config": text.to_dict(),
        "vision_config": vision.to_dict(),
        "audio_config": audio.to_dict(),
        "llm": HyperCLOVAXForCausalLM(text).state_dict(),
        "vit": Qwen2_5_VisionTransformerPretrainedModel(vision).state_dict(),
        "audio": Qwen2AudioEncoder(audio).state_dict(),
    }


def _prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().clone() for k, v in state.items()}


def build_tensors(track: str, *, projector: str = "mm_projector", compressor: bool = True) -> dict[str, torch.Tensor]:
    m = _modules()
    g = torch.Generator().manual_seed(1)
    tensors = _prefixed("model.language_model.", m["llm"])
    tensors |= _prefixed("model.vision_model.", m["vit"])
    tensors[f"model.{projector}.weight"] = torch.randn(TEXT_HIDDEN, VIT_OUT, generator=g)
    tensors[f"model.{projector}.bias"] = torch.randn(TEXT_HIDDEN, generator=g)
    if track == "a":
        return tensors
    tensors |= _prefixed("model.audio_model.", m["audio"])
    tensors |= {
        "model.audio_projector.fc1.weight": torch.randn(16, 16, generator=g),
        "model.audio_projector.fc1.bias": torch.randn(16, generator=g),
        "model.audio_projector.fc2.weight": torch.randn(TEXT_HIDDEN, 16, generator=g),
        "model.audio_projector.fc2.bias": torch.randn(TEXT_HIDDEN, generator=g),
        "model.discrete_vision_model.encoder.proj.weight": torch.randn(8, 4, generator=g),
        "model.discrete_vision_model.bottleneck.regularizer.codebook.weight": torch.randn(64, 16, generator=g),
        "model.discrete_audio_model.encoder.conv1.weight": torch.randn(4, 128, 3, generator=g),
        "model.discrete_audio_model.quantizer.levels": torch.arange(8, dtype=torch.int64),
        "model.discrete_audio_model.quantizer.mask": torch.tensor([True, False, True]),
        "model.discrete_audio_model.quantizer.scale": torch.tensor(0.5),  # 0-d tensor
    }
    if compressor:
        tensors |= {
            "model.video_audio_compressor.layers.0.mixer.A_log": torch.randn(4, generator=g),
            "model.video_audio_compressor.query": torch.randn(1, TEXT_HIDDEN, generator=g),
        }
    return tensors


def build_config(track: str, model_type: str = "vlm") -> dict:
    m = _modules()
    vision = dict(m["vision_config"], model_type="qwen2_5_vl")
    config = {
        "architectures": ["HCXVisionForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_vlm.HCXVisionConfig",
            "AutoModelForCausalLM": "modeling_vlm.HCXVisionForCausalLM",
        },
        "model_type": model_type,
        "text_config": dict(m["text_config"]),
        "vision_config": vision,
        "image_token_id": IMAGE_TOKEN_ID,
        "video_token_id": VIDEO_TOKEN_ID,
        "mm_projector_type": "linear",
        "anyres": False,
        "torch_dtype": "float32",
    }
    if track == "b":
        config |= {
            "audio_config": dict(m["audio_config"]),
            "discrete_vision_config": {"model_type": "ta_tok", "model_name_or_path": "ta_tok.pth"},
            "discrete_audio_config": {"model_type": "cosyvoice2", "model_name_or_path": "speech_tokenizer_v2"},
            "audio_projector_type": "mlp",
            "video_audio_compressor_type": "mambamia",
        }
    return config


def write_checkpoint(
    root: Path,
    tensors: dict[str, torch.Tensor],
    config: dict,
    *,
    n_shards: int = 3,
    decoders: bool = False,
    side_files: bool = True,
) -> list[str]:
    """Write config + round-robin shards + index (+ tokenizer/processor files, + decoder folders)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config, indent=2))
    names = [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
    shards: list[dict[str, torch.Tensor]] = [{} for _ in names]
    for i, (key, value) in enumerate(tensors.items()):
        shards[i % n_shards][key] = value.contiguous()
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, str(root / name), metadata={"format": "pt"})
        weight_map |= {key: name for key in shard}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if side_files:
        for name, text in SIDE_FILES.items():
            (root / name).write_text(text)
    if decoders:
        shutil.copytree(decoder_folders(), root / "decoder")
    return names


def write_vocoder_archive(path: Path, h: dict, *, seed: int = 0, **kwargs) -> Path:
    """A `.mar` as OmniServe ships it: config.json, {"generator": seeded weights under the original's names} and,
    for the finetuned variant, spk_list.txt (keyword arguments go to `write_archive`)."""
    from hcxserve.tooling.embedded.unit_vocoder import original_state_dict, write_archive

    if h["finetune"]:
        kwargs.setdefault("speakers", SPEAKERS)
    return write_archive(path, h, original_state_dict(h, seed=seed), **kwargs)


@functools.cache
def decoder_folders() -> Path:
    """`decoder/` with `vision/` (a tiny vision decoder) and `audio/` (both archives); built once per session."""
    from hcxserve.tooling.embedded.vision_decoder import write_tiny_folder

    root = Path(_session_dir().name) / "decoder"
    write_tiny_folder(root / "vision", seed=0)
    write_vocoder_archive(root / "audio" / FINETUNED_ARCHIVE, FINETUNED_VOCODER, seed=0)
    write_vocoder_archive(root / "audio" / ZERO_SHOT_ARCHIVE, ZERO_SHOT_VOCODER, seed=1)
    return root


@functools.cache
def _session_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="hcx-ckpt-factory-")  # kept by the cache; removed at interpreter exit


def make_checkpoint(
    root: Path,
    track: str = "a",
    *,
    projector: str = "mm_projector",
    compressor: bool = True,
    dtype: torch.dtype | None = None,
    n_shards: int = 3,
    model_type: str = "vlm",
) -> FakeCheckpoint:
    tensors = build_tensors(track, projector=projector, compressor=compressor)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    config = build_config(track, model_type)
    names = write_checkpoint(root, tensors, config, n_shards=n_shards, decoders=track == "b")
    return FakeCheckpoint(root, track, config, tensors, names)
