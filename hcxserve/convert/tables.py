"""Data tables of the converter: input prefixes, where each one goes, how names change, which files travel along.

Everything that describes the checkpoint layouts lives here as plain data, so a new layout is a table edit.
"""

from __future__ import annotations

TRACKS: tuple[str, ...] = ("a", "b")
COMPONENTS: tuple[str, ...] = ("llm", "ve", "ae", "vd", "ad")
TRACK_COMPONENTS: dict[str, tuple[str, ...]] = {
    "a": ("llm", "ve"),  # Think-32B
    "b": ("llm", "ve", "ae", "vd", "ad"),  # Omni-8B
}

# Input tensor prefix -> role. Both projector spellings occur in the wild (OmniServe assumed `mm_projector`,
# transformers' HCX-V2 class expects `vision_projector`); the one present is detected per checkpoint.
ROLE_PREFIXES: dict[str, str] = {
    "model.language_model.": "language_model",
    "model.vision_model.": "vision_model",
    "model.mm_projector.": "projector",
    "model.vision_projector.": "projector",
    "model.discrete_vision_model.": "discrete_vision_model",
    "model.audio_model.": "audio_model",
    "model.audio_projector.": "audio_projector",
    "model.discrete_audio_model.": "discrete_audio_model",
    "model.video_audio_compressor.": "video_audio_compressor",
}
PROJECTOR_PREFIXES: tuple[str, ...] = ("model.mm_projector.", "model.vision_projector.")

# Role -> output component, per track. A role absent from a track's table is unexpected on that track.
# Track a keeps the projector with the LLM because vLLM's HCXVisionV2ForCausalLM applies it to image_embeds.
ROLE_COMPONENT: dict[str, dict[str, str]] = {
    "a": {"language_model": "llm", "projector": "llm", "vision_model": "ve"},
    "b": {
        "language_model": "llm",
        "vision_model": "ve",
        "projector": "ve",
        "discrete_vision_model": "ve",
        "audio_model": "ae",
        "audio_projector": "ae",
        "discrete_audio_model": "ae",
        "video_audio_compressor": "ae",
    },
}
REQUIRED_ROLES: dict[str, tuple[str, ...]] = {
    "a": ("language_model", "vision_model", "projector"),
    "b": (
        "language_model",
        "vision_model",
        "projector",
        "discrete_vision_model",
        "audio_model",
        "audio_projector",
        "discrete_audio_model",
    ),  # video_audio_compressor is optional
}
REQUIRED_CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "a": ("text_config", "vision_config"),
    "b": ("text_config", "vision_config", "audio_config"),
}
# Track a configs are rewritten to vLLM's HCXVisionV2ForCausalLM, which is only right for these model types.
TRACK_A_MODEL_TYPES: tuple[str, ...] = ("vlm", "hyperclovax_vision_v2")

# (track, component) -> ordered (input prefix, output prefix); the first matching rule wins.
RENAMES: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {
    ("a", "llm"): (
        ("model.vision_projector.", "model.mm_projector."),  # the name vLLM's HCX-V2 loader expects
        ("model.mm_projector.", "model.mm_projector."),
        ("model.language_model.", "model.language_model."),
    ),
    ("a", "ve"): (("model.", ""),),
    ("b", "llm"): (
        ("model.language_model.model.", "model."),
        ("model.language_model.lm_head.", "lm_head."),
        ("model.language_model.", ""),
    ),
    ("b", "ve"): (
        ("model.vision_projector.", "mm_projector."),
        ("model.", ""),
    ),
    ("b", "ae"): (("model.", ""),),
}

TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)
# Files copied verbatim (when present) into each component folder.
COPY_FILES: dict[str, tuple[str, ...]] = {
    "llm": TOKENIZER_FILES
    + (
        "chat_template.jinja",
        "generation_config.json",
        "preprocessor_config.json",
        "processor_config.json",
        "video_preprocessor_config.json",
    ),
    "ve": ("preprocessor_config.json", "video_preprocessor_config.json"),
    "ae": (),
}
# The decoders' input folders (track b): vd/ is a copy of decoder/vision/; ad/ is unpacked from decoder/audio/.
DECODER_DIRS: dict[str, str] = {"vd": "decoder/vision", "ad": "decoder/audio"}
# ad/: one folder per unit-vocoder variant (config.json `finetune` true / false). decoder/audio/ holds either
# OmniServe's TorchServe archives or these variant folders already unpacked.
AUDIO_DECODER_VARIANTS: tuple[str, ...] = ("finetuned", "zeroshot")
AUDIO_DECODER_ARCHIVES: dict[str, str] = {
    "NCCosybigvganDecoder.mar": "finetuned",
    "NCZSCosybigvganDecoder.mar": "zeroshot",
}  # the released names; any other *.mar is placed by its config
ARCHIVE_SUFFIX = ".mar"
ARCHIVE_MANIFEST = "MAR-INF/MANIFEST.json"  # TorchServe's; its model.serializedFile names the generator checkpoint
SPEAKER_LIST = "spk_list.txt"
# Without a manifest naming it, the generator checkpoint is the one file (by base name) with one of these suffixes,
# BigVGAN's training name g_<step>, or a name starting with "generator".
TORCH_CHECKPOINT_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".ckpt")
TRAINING_CHECKPOINT_PATTERN = r"g_\d+"
GENERATOR_PREFIX = "generator"

# An input file that already is the audio feature-extractor config, used instead of the generated one.
# The top-level preprocessor_config.json is normally the image processor; it is used only when it is a Whisper one.
AUDIO_PREPROCESSOR_SOURCES: tuple[str, ...] = ("audio_preprocessor_config.json", "preprocessor_config.json")
# Generated ae/preprocessor_config.json (feature_size is replaced by audio_config.num_mel_bins when set).
WHISPER_PREPROCESSOR: dict[str, object] = {
    "feature_extractor_type": "WhisperFeatureExtractor",
    "processor_class": "Qwen2AudioProcessor",
    "feature_size": 128,
    "sampling_rate": 16000,
    "hop_length": 160,
    "n_fft": 400,
    "chunk_length": 30,
    "n_samples": 480000,
    "nb_max_frames": 3000,
    "padding_side": "right",
    "padding_value": 0.0,
    "return_attention_mask": True,
}

# text_config.model_type -> architectures written into track b's llm/config.json when it has none.
LLM_ARCHITECTURES: dict[str, str] = {"hyperclovax": "HyperCLOVAXForCausalLM", "llama": "LlamaForCausalLM"}
DEFAULT_LLM_ARCHITECTURE = "HyperCLOVAXForCausalLM"
TRACK_A_ARCHITECTURE = "HCXVisionV2ForCausalLM"
TRACK_A_MODEL_TYPE = "hyperclovax_vision_v2"
# Top-level keys dropped from track a's llm/config.json: auto_map points at remote code (configuration_vlm.py)
# that is not copied, and with trust_remote_code it would override the native class.
TRACK_A_DROPPED_KEYS: tuple[str, ...] = ("auto_map",)

# safetensors dtype -> bytes per element.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
# Only these are cast by --dtype; fp8 payloads are quantised storage and are kept as they are.
CASTABLE_DTYPES: frozenset[str] = frozenset({"F16", "BF16", "F32", "F64"})
DTYPE_CHOICES: dict[str, str | None] = {"keep": None, "bfloat16": "BF16", "float16": "F16", "float32": "F32"}

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "hcxserve-components/1"
SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
SHARD_PATTERN = "model-{:05d}-of-{:05d}.safetensors"
