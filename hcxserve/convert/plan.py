"""Turning a validated checkpoint into a conversion plan: which tensor goes where, under which name, in which shard.

Planning reads no tensor data; every size is known from the shard headers, which is what lets the writer put a
shard's header down before streaming its bytes.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path

from .audio_decoder import VocoderSource, plan_vocoders
from .checkpoint import Checkpoint, read_json
from .errors import CheckpointError, ConvertError, few
from .safetensors_io import OutTensor, output_dtype, pack_shards
from .tables import (
    AUDIO_PREPROCESSOR_SOURCES,
    COPY_FILES,
    DECODER_DIRS,
    DEFAULT_LLM_ARCHITECTURE,
    DTYPE_CHOICES,
    LLM_ARCHITECTURES,
    PROJECTOR_PREFIXES,
    RENAMES,
    REQUIRED_CONFIG_KEYS,
    REQUIRED_ROLES,
    ROLE_COMPONENT,
    ROLE_PREFIXES,
    SHARD_PATTERN,
    SINGLE_WEIGHTS,
    TRACK_A_ARCHITECTURE,
    TRACK_A_DROPPED_KEYS,
    TRACK_A_MODEL_TYPE,
    TRACK_A_MODEL_TYPES,
    TRACK_COMPONENTS,
    TRACKS,
    WHISPER_PREPROCESSOR,
)

DEFAULT_MAX_SHARD_SIZE = "5GB"
_SIZE_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}  # fmt: skip


@dataclass(frozen=True)
class Options:
    track: str
    components: tuple[str, ...]
    dtype: str = "keep"
    max_shard_size: int = 5 * 10**9

    def as_manifest(self) -> dict:
        return {"components": list(self.components), "dtype": self.dtype, "max_shard_size": self.max_shard_size}


@dataclass
class ComponentPlan:
    name: str
    tensors: list[OutTensor] = field(default_factory=list)
    shards: list[list[OutTensor]] = field(default_factory=list)
    config: dict | None = None
    copy_files: list[str] = field(default_factory=list)  # relative to the input root, copied under the same name
    generated: dict[str, dict] = field(default_factory=dict)  # file name -> JSON written
    copy_tree: Path | None = None  # vd/: a whole folder copied as-is
    vocoders: list[VocoderSource] = field(default_factory=list)  # ad/: one unpacked folder per variant

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def tree_bytes(self) -> int:
        """Bytes a decoder folder takes: the copied tree, or the members the vocoder folders are made from."""
        if self.vocoders:
            return sum(v.nbytes for v in self.vocoders)
        if self.copy_tree is None:
            return 0
        return sum(p.stat().st_size for p in self.copy_tree.rglob("*") if p.is_file())

    def shard_names(self) -> list[str]:
        if len(self.shards) <= 1:
            return [SINGLE_WEIGHTS] if self.shards else []
        return [SHARD_PATTERN.format(i + 1, len(self.shards)) for i in range(len(self.shards))]


@dataclass
class ConversionPlan:
    ckpt: Checkpoint
    options: Options
    components: dict[str, ComponentPlan]

    @property
    def total_bytes(self) -> int:
        return sum(c.tensor_bytes + c.tree_bytes for c in self.components.values())


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9 (decimal, as in transformers), '5GiB' -> 5*2**30, '1024' -> bytes."""
    if isinstance(text, int):
        size = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", text.upper())
        if not m:
            raise ConvertError(f"invalid size {text!r}: use e.g. 500MB, 5GB or 4GiB")
        size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2) or ""])
    if size <= 0:
        raise ConvertError(f"size must be positive, got {text!r}")
    return size


def resolve_components(track: str, requested: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    if track not in TRACKS:
        raise ConvertError(f"unknown track {track!r} (choose from {', '.join(TRACKS)})")
    allowed = TRACK_COMPONENTS[track]
    if not requested or "all" in requested:
        return allowed
    bad = [c for c in requested if c not in allowed]
    if bad:
        raise ConvertError(
            f"component(s) {', '.join(bad)} do not exist on track {track} (track {track} has: {', '.join(allowed)})"
        )
    return tuple(c for c in allowed if c in requested)


def build_plan(ckpt: Checkpoint, options: Options) -> ConversionPlan:
    track = options.track
    roles = _assign_roles(ckpt, track)  # first: a wrong track is clearer from the tensors than from the config
    _check_config(ckpt, track)
    target = DTYPE_CHOICES[options.dtype]
    by_component: dict[str, list[OutTensor]] = {}
    for key, role in roles.items():
        component = ROLE_COMPONENT[track][role]
        name = _rename(track, component, key)
        by_component.setdefault(component, []).append(
            OutTensor(name, ckpt.tensors[key], output_dtype(ckpt.tensors[key].dtype, target))
        )
    for component, tensors in by_component.items():
        _check_unique(component, tensors)
    plans = {}
    for component in options.components:
        plan = ComponentPlan(component)
        if component == "ad":
            plan.vocoders = plan_vocoders(_decoder_dir(ckpt, component), DECODER_DIRS[component])
        elif component in DECODER_DIRS:
            plan.copy_tree = _decoder_dir(ckpt, component)
        else:
            plan.tensors = sorted(by_component.get(component, []), key=lambda t: t.name)
            plan.shards = pack_shards(plan.tensors, options.max_shard_size)
            plan.config = _component_config(ckpt, track, component, plan.tensors)
            plan.copy_files = [f for f in COPY_FILES[component] if (ckpt.root / f).is_file()]
            if component == "ae":
                _plan_audio_preprocessor(ckpt, plan)
        plans[component] = plan
    return ConversionPlan(ckpt, options, plans)


# ----------------------------------------------------------------------------------------------- validation


def _check_config(ckpt: Checkpoint, track: str) -> None:
    missing = [k for k in REQUIRED_CONFIG_KEYS[track] if not isinstance(ckpt.config.get(k), dict)]
    if missing:
        raise CheckpointError(f"config.json lacks {', '.join(missing)} (required for track {track})")
    if track == "a" and ckpt.model_type not in TRACK_A_MODEL_TYPES:
        raise CheckpointError(
            f"config.json model_type is {ckpt.model_type!r}; track a expects one of {', '.join(TRACK_A_MODEL_TYPES)}"
        )


def _role_of(key: str) -> str | None:
    for prefix, role in ROLE_PREFIXES.items():
        if key.startswith(prefix):
            return role
    return None


def _assign_roles(ckpt: Checkpoint, track: str) -> dict[str, str]:
    """Every input tensor must map to exactly one role known on this track; anything else fails loudly."""
    roles: dict[str, str] = {}
    unknown: list[str] = []
    foreign: dict[str, list[str]] = {}  # role known, but not on this track
    for key in sorted(ckpt.tensors):
        role = _role_of(key)
        if role is None:
            unknown.append(key)
        elif role not in ROLE_COMPONENT[track]:
            foreign.setdefault(role, []).append(key)
        else:
            roles[key] = role
    if foreign:
        other = next(t for t in ROLE_COMPONENT if t != track)
        raise CheckpointError(
            f"tensors {_prefix_list(foreign)} are not part of a track {track} checkpoint "
            f"(this looks like a track {other} checkpoint: use --track {other})"
        )
    if unknown:
        raise CheckpointError(f"{len(unknown)} tensor(s) with an unrecognised prefix for track {track}: {few(unknown)}")
    _check_required(roles, track)
    _check_projector(roles)
    return roles


def _check_required(roles: dict[str, str], track: str) -> None:
    present = set(roles.values())
    missing = [r for r in REQUIRED_ROLES[track] if r not in present]
    if not missing:
        return
    prefixes = [p for r in missing for p, role in ROLE_PREFIXES.items() if role == r and p not in PROJECTOR_PREFIXES]
    if "projector" in missing:
        prefixes.append(" or ".join(p + "*" for p in PROJECTOR_PREFIXES))
    hint = " (this looks like a track a checkpoint: use --track a)" if track == "b" and "audio_model" in missing else ""
    raise CheckpointError(f"missing required tensors for track {track}: {', '.join(_star(p) for p in prefixes)}{hint}")


def _check_projector(roles: dict[str, str]) -> None:
    spellings = {p for key in roles for p in PROJECTOR_PREFIXES if key.startswith(p)}
    if len(spellings) > 1:
        raise CheckpointError(
            f"both {' and '.join(sorted(spellings))} tensors present: cannot tell which is the projector"
        )


def _check_unique(component: str, tensors: list[OutTensor]) -> None:
    seen: dict[str, str] = {}
    for t in tensors:
        if t.name in seen:
            raise CheckpointError(
                f"{component}: {seen[t.name]!r} and {t.src.key!r} would both be written as {t.name!r}"
            )
        seen[t.name] = t.src.key


def _rename(track: str, component: str, key: str) -> str:
    for old, new in RENAMES[(track, component)]:
        if key.startswith(old):
            return new + key[len(old) :]
    raise AssertionError(f"no rename rule for {key} ({track}/{component})")  # the tables cover every role


def _decoder_dir(ckpt: Checkpoint, component: str) -> Path:
    path = ckpt.root / DECODER_DIRS[component]
    if not path.is_dir():
        raise CheckpointError(
            f"{DECODER_DIRS[component]}/ not found in {ckpt.root} (needed for component {component}; "
            f"leave it out with --components)"
        )
    return path


# ------------------------------------------------------------------------------------------- component configs


def _component_config(ckpt: Checkpoint, track: str, component: str, tensors: list[OutTensor]) -> dict:
    cfg = ckpt.config
    if component == "llm":
        return _llm_config_a(cfg) if track == "a" else _llm_config_b(cfg)
    text_hidden = cfg["text_config"].get("hidden_size")
    if component == "ve":
        vision = copy.deepcopy(cfg["vision_config"])
        vision["model_type"] = "qwen2_5_vl_vision"
        out = {
            "vision_config": vision,
            "text_hidden_size": text_hidden,
            "image_token_id": cfg.get("image_token_id"),
            "video_token_id": cfg.get("video_token_id"),
        }
        if track == "b":
            out["discrete_vision_config"] = copy.deepcopy(cfg.get("discrete_vision_config"))
            out["projector"] = _projector_shape(tensors)
        return out
    out = {  # ae
        "audio_config": copy.deepcopy(cfg["audio_config"]),
        "discrete_audio_config": copy.deepcopy(cfg.get("discrete_audio_config")),
        "text_hidden_size": text_hidden,
    }
    for key in ("video_audio_compressor_config", "audio_projector_type", "video_audio_compressor_type"):
        if key in cfg:
            out[key] = copy.deepcopy(cfg[key])
    return out


def _llm_config_a(cfg: dict) -> dict:
    """The unified config as vLLM's HCXVisionV2ForCausalLM reads it; every other top-level key is kept."""
    out = {k: copy.deepcopy(v) for k, v in cfg.items() if k not in TRACK_A_DROPPED_KEYS}
    out["architectures"] = [TRACK_A_ARCHITECTURE]
    out["model_type"] = TRACK_A_MODEL_TYPE
    out["vision_config"]["model_type"] = "qwen2_5_vl"
    return out


def _llm_config_b(cfg: dict) -> dict:
    out = copy.deepcopy(cfg["text_config"])
    if not out.get("architectures"):
        out["architectures"] = [LLM_ARCHITECTURES.get(out.get("model_type", ""), DEFAULT_LLM_ARCHITECTURE)]
    return out


def _projector_shape(tensors: list[OutTensor]) -> dict:
    weight = next((t for t in tensors if t.name == "mm_projector.weight"), None)
    if weight is None or len(weight.src.shape) != 2:
        raise CheckpointError("projector has no 2-D weight (expected mm_projector.weight / vision_projector.weight)")
    out_features, in_features = weight.src.shape
    return {"in_features": in_features, "out_features": out_features}


def _plan_audio_preprocessor(ckpt: Checkpoint, plan: ComponentPlan) -> None:
    """Use the input's Whisper feature-extractor config when it has one, else write the standard one."""
    for name in AUDIO_PREPROCESSOR_SOURCES:
        path = ckpt.root / name
        if path.is_file():
            data = read_json(path, what=name)
            if isinstance(data, dict) and "Whisper" in str(data.get("feature_extractor_type", "")):
                plan.generated["preprocessor_config.json"] = data
                return
    generated = dict(WHISPER_PREPROCESSOR)
    generated["feature_size"] = ckpt.config["audio_config"].get("num_mel_bins") or WHISPER_PREPROCESSOR["feature_size"]
    plan.generated["preprocessor_config.json"] = generated


def _star(prefix: str) -> str:
    return prefix if prefix.endswith("*") else prefix + "*"


def _prefix_list(by_role: dict[str, list[str]]) -> str:
    prefixes = {p for role in by_role for p, r in ROLE_PREFIXES.items() if r == role}
    return ", ".join(sorted(_star(p) for p in prefixes))
