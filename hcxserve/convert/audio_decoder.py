"""ad/: track B's unit vocoders, unpacked from OmniServe's TorchServe archives into plain component folders.

The unified checkpoint's `decoder/audio/` holds two `.mar` archives (zip files): each has the generator's hparams
(`config.json`), its checkpoint (a pickled `{"generator": state_dict}`), TorchServe's `MAR-INF/`, the handler's
source and, for the finetuned variant, `spk_list.txt`. The converter writes one folder per variant:

    ad/finetuned/   config.json, model.safetensors, spk_list.txt     (config.json `finetune: true`)
    ad/zeroshot/    config.json, model.safetensors                   (`finetune: false`)

so the audio decoder service (`hcxserve.models.unit_vocoder.UnitVocoder.from_pretrained`) never unpickles anything.
The checkpoint is read with `torch.load(weights_only=True)`, which refuses every pickled object but tensors and
plain containers; its tensors are written unchanged (names, dtypes, weight-norm pairs and constant buffers included:
the loader folds and checks those). Handler source and other archive members are left behind.

A `decoder/audio/` that already holds `finetuned/` and `zeroshot/` folders is accepted too: config.json,
spk_list.txt and safetensors weights are copied; a torch checkpoint there is converted like an archived one.

Memory: the checkpoint is extracted to a temporary file next to the output (streamed) and memory-mapped, so the
converter holds no more than the pages of one generator, whatever the LLM's size. Planning reads only the archives'
directories and their small text members.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from .errors import CheckpointError, ComponentError, VerifyError, few
from .tables import (
    ARCHIVE_MANIFEST,
    ARCHIVE_SUFFIX,
    AUDIO_DECODER_ARCHIVES,
    AUDIO_DECODER_VARIANTS,
    GENERATOR_PREFIX,
    SINGLE_WEIGHTS,
    SPEAKER_LIST,
    TORCH_CHECKPOINT_SUFFIXES,
    TRAINING_CHECKPOINT_PATTERN,
    WEIGHTS_INDEX,
)

if TYPE_CHECKING:
    import torch

CONFIG = "config.json"
MAX_TEXT_MEMBER = 16 * 1024 * 1024  # config.json / spk_list.txt / MANIFEST.json larger than this are not what we think
COPY_BUFFER = 16 * 1024 * 1024


@dataclass(frozen=True)
class VocoderSource:
    """Where one variant comes from: an archive and its member names, or an unpacked folder and its file names."""

    variant: str
    path: Path  # the .mar, or the variant folder
    archived: bool
    config: str
    weights: tuple[str, ...]  # one torch checkpoint, or (folders only) model.safetensors / the index and its shards
    speakers: str | None
    nbytes: int  # uncompressed bytes of the members read: the estimate for disk space and progress

    @property
    def torch_checkpoint(self) -> bool:
        return not self.weights[0].endswith((".safetensors", ".json"))

    @property
    def label(self) -> str:
        return self.path.name if self.archived else self.path.name + "/"

    def expected_files(self) -> list[str]:
        """The files of the written ad/<variant>/ folder, sorted."""
        weights = [SINGLE_WEIGHTS] if self.torch_checkpoint else [PurePosixPath(w).name for w in self.weights]
        return sorted([CONFIG, *weights, *([SPEAKER_LIST] if self.speakers else [])])


# ------------------------------------------------------------------------------------------------------ planning


def plan_vocoders(folder: Path, rel: str) -> list[VocoderSource]:
    """One source per variant, both required, from the archives or variant folders in `folder` (= root / rel)."""
    sources: dict[str, VocoderSource] = {}
    archives = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ARCHIVE_SUFFIX)
    folders = [folder / v for v in AUDIO_DECODER_VARIANTS if (folder / v).is_dir()]
    for source in [*(_archive_source(p) for p in archives), *(_folder_source(p) for p in folders)]:
        if source.variant in sources:
            raise CheckpointError(
                f"{rel}/: both {sources[source.variant].label} and {source.label} hold the {source.variant} audio "
                "decoder; keep one"
            )
        sources[source.variant] = source
    missing = [v for v in AUDIO_DECODER_VARIANTS if v not in sources]
    if missing:
        found = few(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise CheckpointError(
            f"{rel}/ has no {' and no '.join(missing)} audio decoder (expected {' and '.join(AUDIO_DECODER_ARCHIVES)}"
            f", or {'/ and '.join(AUDIO_DECODER_VARIANTS)}/ folders; found {found})"
        )
    return [sources[v] for v in AUDIO_DECODER_VARIANTS]


def _archive_source(path: Path) -> VocoderSource:
    try:
        with zipfile.ZipFile(path) as archive:
            infos = {i.filename: i for i in archive.infolist() if not i.is_dir()}
            names = [n for n in infos if not n.startswith("MAR-INF/")]
            config_name = _one_member(path, names, CONFIG, required=True)
            speakers = _one_member(path, names, SPEAKER_LIST, required=False)
            weights = _generator_member(path, archive, infos, names)
            config = _parse_config(_read_text(path, archive, infos[config_name]), f"{path.name}:{config_name}")
    except zipfile.BadZipFile as exc:
        raise CheckpointError(f"{path}: not a readable .mar (zip) archive ({exc})") from exc
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from exc
    variant = _variant(config, path.name)
    expected = AUDIO_DECODER_ARCHIVES.get(path.name)
    if expected and expected != variant:
        raise CheckpointError(
            f"{path.name}: its config.json says finetune: {json.dumps(config.get('finetune', False))}, which is the "
            f"{variant} variant, but this archive name is the {expected} one"
        )
    if variant == "finetuned" and speakers is None:
        raise CheckpointError(f"{path.name}: the finetuned audio decoder has no {SPEAKER_LIST} (its speaker names)")
    members = [config_name, weights, *([speakers] if speakers else [])]
    nbytes = sum(infos[m].file_size for m in members)
    return VocoderSource(variant, path, True, config_name, (weights,), speakers, nbytes)


def _one_member(path: Path, names: list[str], basename: str, *, required: bool) -> str | None:
    """The member with this base name; the shallowest one if it occurs at several depths."""
    hits = [n for n in names if PurePosixPath(n).name == basename]
    if not hits:
        if required:
            raise CheckpointError(f"{path.name}: no {basename} in the archive (members: {few(sorted(names))})")
        return None
    top = min(n.count("/") for n in hits)
    shallowest = sorted(n for n in hits if n.count("/") == top)
    if len(shallowest) > 1:
        raise CheckpointError(f"{path.name}: several {basename} members at the same depth: {few(shallowest)}")
    return shallowest[0]


def _is_checkpoint_name(name: str) -> bool:
    base = PurePosixPath(name).name
    return (
        base.endswith(TORCH_CHECKPOINT_SUFFIXES)
        or re.fullmatch(TRAINING_CHECKPOINT_PATTERN, base) is not None
        or base.startswith(GENERATOR_PREFIX)
    )


def _generator_member(path: Path, archive: zipfile.ZipFile, infos: dict, names: list[str]) -> str:
    """The member TorchServe's manifest names as its serializedFile when the archive has it, else the one member
    named like a checkpoint."""
    serialized = _serialized_file(path, archive, infos)
    if serialized in names:
        return serialized
    candidates = sorted(n for n in names if _is_checkpoint_name(n))
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise CheckpointError(
            f"{path.name}: no generator checkpoint in the archive (a *{', *'.join(TORCH_CHECKPOINT_SUFFIXES)}, "
            f"g_<step> or generator* file, or the {ARCHIVE_MANIFEST} serializedFile; members: {few(sorted(names))})"
        )
    raise CheckpointError(
        f"{path.name}: several possible generator checkpoints ({few(candidates)}) and no {ARCHIVE_MANIFEST} "
        "serializedFile naming one of them"
    )


def _serialized_file(path: Path, archive: zipfile.ZipFile, infos: dict) -> str | None:
    if ARCHIVE_MANIFEST not in infos:
        return None
    try:
        serialized = json.loads(_read_text(path, archive, infos[ARCHIVE_MANIFEST]))["model"]["serializedFile"]
    except (ValueError, KeyError, TypeError):
        return None  # a manifest we cannot read only loses the tie-break
    return serialized if isinstance(serialized, str) else None


def _read_text(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> str:
    if info.file_size > MAX_TEXT_MEMBER:
        raise CheckpointError(f"{path.name}:{info.filename} is {info.file_size} bytes; expected a small text file")
    try:
        return archive.read(info).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path.name}:{info.filename}: not UTF-8 text ({exc})") from exc


def _parse_config(text: str, where: str) -> dict:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{where}: unreadable JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: not a JSON object")
    return config


def _variant(config: dict, where: str) -> str:
    finetune = config.get("finetune", False)  # OmniServe's fallback, as UnitVocoderConfig's
    if not isinstance(finetune, bool):
        raise CheckpointError(f"{where}: config.json finetune must be true or false, not {finetune!r}")
    return "finetuned" if finetune else "zeroshot"


def _folder_source(folder: Path) -> VocoderSource:
    where = f"{folder.parent.name}/{folder.name}/"
    config_path = folder / CONFIG
    if not config_path.is_file():
        raise CheckpointError(f"{where}: no {CONFIG}")
    try:
        config = _parse_config(config_path.read_text(encoding="utf-8"), f"{where}{CONFIG}")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{where}{CONFIG}: unreadable ({exc})") from exc
    variant = _variant(config, where)
    if variant != folder.name:
        raise CheckpointError(
            f"{where}: its config.json says finetune: {json.dumps(config.get('finetune', False))}, which is the "
            f"{variant} variant"
        )
    speakers = SPEAKER_LIST if (folder / SPEAKER_LIST).is_file() else None
    if variant == "finetuned" and speakers is None:
        raise CheckpointError(f"{where}: the finetuned audio decoder has no {SPEAKER_LIST} (its speaker names)")
    weights = _folder_weights(folder, where)
    nbytes = sum((folder / f).stat().st_size for f in (CONFIG, *weights, *([speakers] if speakers else [])))
    return VocoderSource(variant, folder, False, CONFIG, weights, speakers, nbytes)


def _folder_weights(folder: Path, where: str) -> tuple[str, ...]:
    if (folder / WEIGHTS_INDEX).is_file():
        index = _parse_config((folder / WEIGHTS_INDEX).read_text(encoding="utf-8"), f"{where}{WEIGHTS_INDEX}")
        shards = sorted(set((index.get("weight_map") or {}).values()))
        bad = [s for s in shards if not isinstance(s, str) or Path(s).name != s or not (folder / s).is_file()]
        if not shards or bad:
            raise CheckpointError(f"{where}{WEIGHTS_INDEX}: missing or invalid shard files: {few(list(map(str, bad)))}")
        return (WEIGHTS_INDEX, *shards)
    if (folder / SINGLE_WEIGHTS).is_file():
        return (SINGLE_WEIGHTS,)
    candidates = sorted(p.name for p in folder.iterdir() if p.is_file() and _is_checkpoint_name(p.name))
    if len(candidates) != 1:
        raise CheckpointError(
            f"{where}: expected {SINGLE_WEIGHTS} or one generator checkpoint, found {', '.join(candidates) or 'none'}"
        )
    return (candidates[0],)


# ------------------------------------------------------------------------------------------------------- writing


def write_vocoders(sources: list[VocoderSource], dst: Path, on_bytes: Callable[[int], object]) -> None:
    """Write ad/: one folder per variant."""
    dst.mkdir()
    for source in sources:
        _write_variant(source, dst / source.variant, dst)
        on_bytes(source.nbytes)


def _write_variant(source: VocoderSource, out: Path, scratch: Path) -> None:
    out.mkdir()
    if not source.archived:
        for name in (source.config, *([source.speakers] if source.speakers else [])):
            shutil.copy2(source.path / name, out / name)
        if not source.torch_checkpoint:
            for name in source.weights:
                shutil.copy2(source.path / name, out / name)
            return
        checkpoint = source.path / source.weights[0]
        _save_safetensors(load_generator(checkpoint, where=f"{source.label}{checkpoint.name}"), out / SINGLE_WEIGHTS)
        return
    try:
        with zipfile.ZipFile(source.path) as archive:
            (out / CONFIG).write_bytes(archive.read(source.config))
            if source.speakers:
                (out / SPEAKER_LIST).write_bytes(archive.read(source.speakers))
    except zipfile.BadZipFile as exc:  # a CRC mismatch shows up only while reading
        raise CheckpointError(f"{source.path}: corrupt archive ({exc})") from exc
    where = f"{source.label}:{source.weights[0]}"
    with extracted(source, scratch) as checkpoint:
        _save_safetensors(load_generator(checkpoint, where=where), out / SINGLE_WEIGHTS)


@contextmanager
def extracted(source: VocoderSource, scratch: Path) -> Iterator[Path]:
    """The archived checkpoint as a temporary file in `scratch` (streamed out of the zip), removed afterwards."""
    tmp = scratch / f".{source.variant}-generator.{os.getpid()}.tmp"
    try:
        with zipfile.ZipFile(source.path) as archive, archive.open(source.weights[0]) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, COPY_BUFFER)
        yield tmp
    except zipfile.BadZipFile as exc:  # a CRC mismatch shows up only while reading
        raise CheckpointError(f"{source.path}: corrupt archive member {source.weights[0]} ({exc})") from exc
    finally:
        tmp.unlink(missing_ok=True)


def load_generator(path: Path, *, where: str | None = None) -> dict[str, torch.Tensor]:
    """The generator's tensors from a torch checkpoint `{"generator": state_dict}` (or a bare state dict).

    `weights_only=True` refuses any pickled object but tensors and plain containers, so nothing in the file runs.
    The file is memory-mapped when it is in torch's zip format (every torch.save since 1.6)."""
    import pickle

    import torch

    where = where or str(path)
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{where}: refused: not a plain tensor checkpoint ({_unpickler_reason(exc)}); only tensors and plain "
            "containers are unpickled (torch.load weights_only=True), never other objects"
        ) from exc
    except Exception as exc:  # a corrupt or truncated file
        raise CheckpointError(f"{where}: not a readable torch checkpoint ({_first_line(exc)})") from exc
    state = checkpoint.get("generator", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{where}: expected {{'generator': state_dict}}, got {type(checkpoint).__name__}")
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{where}: the generator state dict holds non-tensor entries: {few(bad)}")
    return dict(state)


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors wants contiguous tensors that share no storage; a tensor that is not is copied on its own."""
    from safetensors.torch import save_file

    seen: set[int] = set()
    out = {}
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if tensor.numel() and storage in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    save_file(out, str(path), metadata={"format": "pt"})
    # safetensors creates the file 0600; the services may run as another user, so it gets the umask's mode as the
    # converter's other files do.
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def _unpickler_reason(exc: Exception) -> str:
    text = str(exc)
    match = re.search(r"(Unsupported global: [^\n]*?|Unsupported operand [^\n]*?)(?:\. |\n|$)", text)
    return match.group(1) if match else _first_line(exc)


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


# ------------------------------------------------------------------------------------------------------ --verify


def verify_vocoders(sources: list[VocoderSource], target: Path, scratch: Path) -> None:
    """Each variant folder: exactly the expected files, texts byte-equal to the source, every tensor byte-equal to
    the source checkpoint's, and the weights fit `UnitVocoder` (names and shapes, checked on the meta device)."""
    if not target.is_dir() or sorted(p.name for p in target.iterdir()) != sorted(s.variant for s in sources):
        found = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
        raise VerifyError(f"ad: expected {', '.join(s.variant + '/' for s in sources)}, found {found or 'nothing'}")
    for source in sources:
        out = target / source.variant
        where = f"ad/{source.variant}"
        files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
        if files != source.expected_files():
            missing = few(sorted(set(source.expected_files()) - set(files))) or "-"
            extra = few(sorted(set(files) - set(source.expected_files()))) or "-"
            raise VerifyError(f"{where}: files differ (missing: {missing}; unexpected: {extra})")
        _verify_copies(source, out, where)
        if source.torch_checkpoint:
            if source.archived:
                with extracted(source, scratch) as checkpoint:
                    _verify_tensors(load_generator(checkpoint, where=f"{source.label}:{source.weights[0]}"), out, where)
            else:
                checkpoint = source.path / source.weights[0]
                _verify_tensors(load_generator(checkpoint, where=f"{source.label}{checkpoint.name}"), out, where)
        check_vocoder_shapes(out, where)


def _verify_copies(source: VocoderSource, out: Path, where: str) -> None:
    names = [(source.config, CONFIG), *([(source.speakers, SPEAKER_LIST)] if source.speakers else [])]
    if not source.torch_checkpoint:
        names += [(w, w) for w in source.weights]
    if source.archived:
        with zipfile.ZipFile(source.path) as archive:
            for member, name in names:
                if archive.read(member) != (out / name).read_bytes():
                    raise VerifyError(f"{where}/{name} differs from {source.label}:{member}")
        return
    import filecmp

    for rel, name in names:
        if not filecmp.cmp(source.path / rel, out / name, shallow=False):
            raise VerifyError(f"{where}/{name} differs from the input file")


def _verify_tensors(expected: dict[str, torch.Tensor], out: Path, where: str) -> None:
    import torch
    from safetensors import safe_open

    try:
        with safe_open(str(out / SINGLE_WEIGHTS), framework="pt") as f:
            names = set(f.keys())
            if names != set(expected):
                missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
                raise VerifyError(
                    f"{where}: tensor names differ (missing: {few(missing) or '-'}; unexpected: {few(extra) or '-'})"
                )
            for name in sorted(names):
                got, want = f.get_tensor(name), expected[name]
                if got.dtype != want.dtype or got.shape != want.shape:
                    raise VerifyError(
                        f"{where}: {name}: {got.dtype}{list(got.shape)}, expected {want.dtype}{list(want.shape)}"
                    )
                if not torch.equal(got.reshape(-1).view(torch.uint8), want.contiguous().reshape(-1).view(torch.uint8)):
                    raise VerifyError(f"{where}: {name}: content differs from the source checkpoint")
    except VerifyError:
        raise
    except Exception as exc:  # safetensors' own errors: the file is not even readable
        raise VerifyError(f"{where}: {SINGLE_WEIGHTS} cannot be read back ({_first_line(exc)})") from exc


def check_vocoder_shapes(folder: Path, where: str) -> None:
    """The folder's weights load into `UnitVocoder` built from its config.json: weight norm folded, buffers
    checked, names and shapes matched, without reading more than the 12-tap filters (the rest stays on meta)."""
    import torch

    from hcxserve.models import state_dict_mismatch
    from hcxserve.models.bigvgan import generator_state_dict
    from hcxserve.models.unit_vocoder import UnitVocoder, UnitVocoderConfig, read_speaker_list

    from .loader import read_component_config

    try:
        config = UnitVocoderConfig.from_dict(read_component_config(folder))
        speakers = read_speaker_list(folder, config.num_spk) if config.finetune else ()
        with torch.device("meta"):
            model = UnitVocoder(config, speakers)
        tensors = generator_state_dict(_shapes_and_filters(folder), where=where)
    except (ValueError, TypeError, ComponentError) as exc:
        raise VerifyError(f"{where}: not a loadable audio decoder ({exc})") from exc
    problems = [f"{label}: {few(items)}" for label, items in state_dict_mismatch(model, tensors).items() if items]
    if problems:
        raise VerifyError(f"{where}: weights do not fit the audio decoder: " + "; ".join(problems))


def _shapes_and_filters(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder as an empty meta tensor of its shape, except the anti-aliasing filters (12 values
    each), which are read: the weight-norm fold needs only shapes, the filter check needs values."""
    import torch
    from safetensors import safe_open

    from .loader import weight_map

    by_file: dict[str, list[str]] = {}
    for key, file in weight_map(folder).items():
        by_file.setdefault(file, []).append(key)
    tensors: dict[str, torch.Tensor] = {}
    for file, keys in sorted(by_file.items()):
        with safe_open(str(folder / file), framework="pt") as f:
            for key in keys:
                if key.endswith("filter"):
                    tensors[key] = f.get_tensor(key)
                else:
                    tensors[key] = torch.empty(f.get_slice(key).get_shape(), device="meta")
    return tensors
