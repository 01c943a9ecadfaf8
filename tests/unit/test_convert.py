"""Tests of the checkpoint converter (hcxserve.convert + convert_model.py) on tiny synthetic checkpoints."""

from __future__ import annotations

import io
import json
import os
import struct
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the factory sits next to this file
from ckpt_factory import (  # noqa: E402
    FINETUNED_ARCHIVE,
    FINETUNED_VOCODER,
    IMAGE_TOKEN_ID,
    SPEAKERS,
    TEXT_HIDDEN,
    VIT_OUT,
    ZERO_SHOT_ARCHIVE,
    FakeCheckpoint,
    make_checkpoint,
)

import convert_model  # noqa: E402
from hcxserve import convert as hc  # noqa: E402
from hcxserve.convert import safetensors_io  # noqa: E402

AD_LAYOUT = [
    "finetuned", "finetuned/config.json", "finetuned/model.safetensors", "finetuned/spk_list.txt",
    "zeroshot", "zeroshot/config.json", "zeroshot/model.safetensors",
]  # fmt: skip
LLM_FILES = {
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "chat_template.jinja", "generation_config.json", "preprocessor_config.json",
    "processor_config.json", "video_preprocessor_config.json",
}  # fmt: skip


# ------------------------------------------------------------------------------------------------ helpers


def expected_layout(ckpt: FakeCheckpoint) -> dict[str, dict[str, str]]:
    """component -> {output name: input name}, written out independently of the converter's tables."""
    out: dict[str, dict[str, str]] = {"llm": {}, "ve": {}, "ae": {}}
    for key in ckpt.tensors:
        proj = key.startswith(("model.mm_projector.", "model.vision_projector."))
        tail = key.split(".", 2)[2] if proj else None
        if ckpt.track == "a":
            if key.startswith("model.language_model."):
                out["llm"][key] = key
            elif proj:
                out["llm"]["model.mm_projector." + tail] = key
            else:
                out["ve"][key.removeprefix("model.")] = key
        elif key.startswith("model.language_model.model."):
            out["llm"]["model." + key.removeprefix("model.language_model.model.")] = key
        elif key.startswith("model.language_model.lm_head."):
            out["llm"]["lm_head." + key.removeprefix("model.language_model.lm_head.")] = key
        elif proj:
            out["ve"]["mm_projector." + tail] = key
        elif key.startswith(("model.vision_model.", "model.discrete_vision_model.")):
            out["ve"][key.removeprefix("model.")] = key
        else:
            out["ae"][key.removeprefix("model.")] = key
    return {k: v for k, v in out.items() if v}


def assert_component(out: Path, component: str, ckpt: FakeCheckpoint, cast: torch.dtype | None = None) -> None:
    expected = expected_layout(ckpt)[component]
    tensors = hc.load_state_dict(out / component)
    assert set(tensors) == set(expected)
    for name, key in expected.items():
        want = ckpt.tensors[key]
        if cast is not None and want.is_floating_point():
            want = want.to(cast)
        got = tensors[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got, want), name


def run_cli(*args: str) -> int:
    return convert_model.main([str(a) for a in args])


def tree_snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")} if root.exists() else {}


@pytest.fixture
def think(tmp_path: Path) -> FakeCheckpoint:
    return make_checkpoint(tmp_path / "think", "a")


@pytest.fixture
def omni(tmp_path: Path) -> FakeCheckpoint:
    return make_checkpoint(tmp_path / "omni", "b")


# ------------------------------------------------------------------------------------------------ track a


@pytest.mark.parametrize("projector", ["mm_projector", "vision_projector"])
def test_track_a_layout_and_content(tmp_path: Path, projector: str) -> None:
    ckpt = make_checkpoint(tmp_path / "in", "a", projector=projector)
    out = tmp_path / "out"
    result = hc.convert(ckpt.root, out, track="a")
    assert result.status == "converted"
    assert sorted(p.name for p in out.iterdir()) == ["llm", "manifest.json", "ve"]
    assert_component(out, "llm", ckpt)
    assert_component(out, "ve", ckpt)
    llm = hc.load_state_dict(out / "llm")
    assert llm["model.mm_projector.weight"].shape == (TEXT_HIDDEN, VIT_OUT)  # normalised name, only in llm/
    assert not any("projector" in k for k in hc.load_state_dict(out / "ve"))
    assert not (tmp_path / f"out.partial-{os.getpid()}").exists()


def test_track_a_llm_config_is_normalised_for_vllm(think: FakeCheckpoint, tmp_path: Path) -> None:
    out = tmp_path / "out"
    hc.convert(think.root, out, track="a")
    cfg = json.loads((out / "llm" / "config.json").read_text())
    assert cfg["architectures"] == ["HCXVisionV2ForCausalLM"]
    assert cfg["model_type"] == "hyperclovax_vision_v2"
    assert cfg["vision_config"]["model_type"] == "qwen2_5_vl"
    assert cfg["text_config"] == json.loads((think.root / "config.json").read_text())["text_config"]
    assert (cfg["image_token_id"], cfg["mm_projector_type"], cfg["anyres"]) == (IMAGE_TOKEN_ID, "linear", False)
    assert "auto_map" not in cfg  # it points at remote code that is not copied
    assert {p.name for p in (out / "llm").iterdir()} == LLM_FILES | {"config.json", "model.safetensors"}
    for name in LLM_FILES:
        assert (out / "llm" / name).read_bytes() == (think.root / name).read_bytes()
    # transformers parses it as the native HCX-V2 config
    from transformers import AutoConfig

    parsed = AutoConfig.from_pretrained(out / "llm")
    assert parsed.model_type == "hyperclovax_vision_v2" and parsed.text_config.hidden_size == TEXT_HIDDEN


def test_track_a_ve_loads_into_qwen25_vit_strict(think: FakeCheckpoint, tmp_path: Path) -> None:
    from transformers import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    out = tmp_path / "out"
    hc.convert(think.root, out, track="a")
    config, tensors = hc.read_component(out / "ve")
    assert config["vision_config"]["model_type"] == "qwen2_5_vl_vision"
    assert (config["text_hidden_size"], config["image_token_id"]) == (TEXT_HIDDEN, IMAGE_TOKEN_ID)
    assert "projector" not in config  # track a: the projector is applied by vLLM
    assert {p.name for p in (out / "ve").iterdir()} == {
        "config.json", "model.safetensors", "preprocessor_config.json", "video_preprocessor_config.json"
    }  # fmt: skip
    vit = Qwen2_5_VisionTransformerPretrainedModel(Qwen2_5_VLVisionConfig(**config["vision_config"]))
    vit.load_state_dict(hc.load_state_dict(out / "ve", prefix="vision_model."), strict=True)
    assert all(k.startswith("vision_model.") for k in tensors)


def test_manifest(think: FakeCheckpoint, tmp_path: Path) -> None:
    out = tmp_path / "out"
    hc.convert(think.root, out, track="a")
    manifest = hc.read_manifest(out)
    assert manifest["format"] == "hcxserve-components/1" and manifest["track"] == "a"
    assert manifest["source"]["model_type"] == "vlm" and manifest["source"]["fingerprint"].startswith("sha256:")
    assert manifest["options"] == {"components": ["llm", "ve"], "dtype": "keep", "max_shard_size": 5 * 10**9}
    layout = expected_layout(think)
    for name in ("llm", "ve"):
        entry = manifest["components"][name]
        assert entry["tensors"] == len(layout[name])
        assert entry["bytes"] == sum(
            think.tensors[k].numel() * think.tensors[k].element_size() for k in layout[name].values()
        )
        assert entry["files"] == sorted(p.name for p in (out / name).iterdir())


# ------------------------------------------------------------------------------------------------ track b


def test_track_b_layout_content_and_renames(omni: FakeCheckpoint, tmp_path: Path) -> None:
    out = tmp_path / "out"
    hc.convert(omni.root, out, track="b")
    assert sorted(p.name for p in out.iterdir()) == ["ad", "ae", "llm", "manifest.json", "vd", "ve"]
    for component in ("llm", "ve", "ae"):
        assert_component(out, component, omni)
    llm = hc.load_state_dict(out / "llm")
    assert "lm_head.weight" in llm and "model.embed_tokens.weight" in llm
    ve = hc.load_state_dict(out / "ve")
    assert {"mm_projector.weight", "mm_projector.bias"} <= set(ve)
    assert any(k.startswith("discrete_vision_model.") for k in ve)
    vision = omni.root / "decoder" / "vision"
    copied = sorted(str(p.relative_to(vision)) for p in vision.rglob("*") if p.is_file())
    assert sorted(str(p.relative_to(out / "vd")) for p in (out / "vd").rglob("*") if p.is_file()) == copied
    assert all((out / "vd" / rel).read_bytes() == (vision / rel).read_bytes() for rel in copied)
    assert sorted(str(p.relative_to(out / "ad")) for p in (out / "ad").rglob("*")) == AD_LAYOUT


def test_track_b_configs_and_loadable_modules(omni: FakeCheckpoint, tmp_path: Path) -> None:
    from transformers import HyperCLOVAXConfig, HyperCLOVAXForCausalLM, Qwen2AudioEncoderConfig
    from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder

    out = tmp_path / "out"
    hc.convert(omni.root, out, track="b")
    llm_cfg = hc.read_component_config(out / "llm")
    assert llm_cfg["architectures"] == ["HyperCLOVAXForCausalLM"] and llm_cfg["model_type"] == "hyperclovax"
    lm = HyperCLOVAXForCausalLM(HyperCLOVAXConfig(**{k: v for k, v in llm_cfg.items() if k != "model_type"}))
    lm.load_state_dict(hc.load_state_dict(out / "llm"), strict=True)

    ve_cfg = hc.read_component_config(out / "ve")
    assert ve_cfg["projector"] == {"in_features": VIT_OUT, "out_features": TEXT_HIDDEN}
    assert ve_cfg["discrete_vision_config"]["model_type"] == "ta_tok"

    ae_cfg, _ = hc.read_component(out / "ae")
    assert ae_cfg["text_hidden_size"] == TEXT_HIDDEN
    assert ae_cfg["discrete_audio_config"]["model_type"] == "cosyvoice2"
    assert ae_cfg["video_audio_compressor_type"] == "mambamia"
    encoder = Qwen2AudioEncoder(
        Qwen2AudioEncoderConfig(**{k: v for k, v in ae_cfg["audio_config"].items() if k != "model_type"})
    )
    encoder.load_state_dict(hc.load_state_dict(out / "ae", prefix="audio_model."), strict=True)
    pre = json.loads((out / "ae" / "preprocessor_config.json").read_text())
    assert pre["feature_extractor_type"] == "WhisperFeatureExtractor"
    assert (pre["feature_size"], pre["sampling_rate"], pre["n_samples"], pre["nb_max_frames"]) == (
        128,
        16000,
        480000,
        3000,
    )


def test_track_b_without_compressor_and_with_vision_projector(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "in", "b", compressor=False, projector="vision_projector")
    out = tmp_path / "out"
    hc.convert(ckpt.root, out, track="b", components=["ve", "ae"])
    assert sorted(p.name for p in out.iterdir()) == ["ae", "manifest.json", "ve"]
    assert_component(out, "ae", ckpt)
    assert "mm_projector.weight" in hc.load_state_dict(out / "ve")
    assert "video_audio_compressor_config" not in hc.read_component_config(out / "ae")


# ------------------------------------------------------------------------------------- decoders: vd/ and ad/


def _archive_members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _rewrite_archive(path: Path, *, drop: tuple[str, ...] = (), add: dict[str, bytes] | None = None) -> None:
    members = {n: d for n, d in _archive_members(path).items() if n not in drop} | (add or {})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def _generator(path: Path, member: str = "generator.pt") -> dict[str, torch.Tensor]:
    """The generator state dict inside an archive, read the safe way."""
    return torch.load(io.BytesIO(_archive_members(path)[member]), weights_only=True)["generator"]


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _layout(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_track_b_decoders_load_with_the_real_loaders(omni: FakeCheckpoint, tmp_path: Path) -> None:
    from hcxserve.models.unit_vocoder import SAMPLES_PER_UNIT, UnitVocoder
    from hcxserve.models.vision_decoder import VisionDecoder

    out = tmp_path / "out"
    hc.convert(omni.root, out, track="b", components=["vd", "ad"], verify=True)
    assert _layout(out / "ad") == AD_LAYOUT
    decoder = VisionDecoder.from_pretrained(out / "vd", device="cpu", dtype="float32")
    assert decoder.has_autoguidance
    (image,) = decoder.generate([list(range(729))], (64, 48), steps=2, seeds=[0])
    assert image.size == (64, 48)

    finetuned = UnitVocoder.from_pretrained(out / "ad" / "finetuned")
    assert finetuned.config.finetune and finetuned.speakers == list(SPEAKERS)
    wave = finetuned(torch.tensor([[1, 2, 3]]), finetuned.speaker_embedding("mhwj"))
    assert wave.shape == (1, 3 * SAMPLES_PER_UNIT) and float(wave.abs().max()) <= 1.0
    zeroshot = UnitVocoder.from_pretrained(out / "ad" / "zeroshot")
    assert not zeroshot.config.finetune and zeroshot.speakers == []

    audio = omni.root / "decoder" / "audio"
    total = 0
    for variant, archive in (("finetuned", FINETUNED_ARCHIVE), ("zeroshot", ZERO_SHOT_ARCHIVE)):
        members = _archive_members(audio / archive)
        assert (out / "ad" / variant / "config.json").read_bytes() == members["config.json"]
        written, original = hc.load_state_dict(out / "ad" / variant), _generator(audio / archive)
        assert set(written) == set(original)  # unchanged names: weight-norm pairs and buffers are the loader's job
        assert any(k.endswith("weight.original0") for k in written) and any(k.endswith("pad_buffer") for k in written)
        assert all(written[k].dtype == original[k].dtype and torch.equal(written[k], original[k]) for k in original)
        total += len(original)
    assert (out / "ad" / "finetuned" / "spk_list.txt").read_bytes() == _archive_members(audio / FINETUNED_ARCHIVE)[
        "spk_list.txt"
    ]
    weights = out / "ad" / "finetuned" / "model.safetensors"
    umask = os.umask(0)
    os.umask(umask)
    assert weights.stat().st_mode & 0o777 == 0o666 & ~umask  # readable by the services' user, like other outputs
    manifest = hc.read_manifest(out)["components"]
    assert manifest["ad"]["tensors"] == total and manifest["ad"]["files"] == [f for f in AD_LAYOUT if "/" in f]
    vision_tensors = sum(len(safe_open(str(p), framework="pt").keys()) for p in (out / "vd").rglob("*.safetensors"))
    assert manifest["vd"]["tensors"] == vision_tensors > 0


def test_archive_members_are_found_by_base_name(omni: FakeCheckpoint, tmp_path: Path) -> None:
    """Nested members, BigVGAN's g_<step> name and no TorchServe manifest; a deeper config.json is not taken."""
    from hcxserve.models.unit_vocoder import UnitVocoder

    archive = omni.root / "decoder" / "audio" / FINETUNED_ARCHIVE
    members = _archive_members(archive)
    nested = {
        "model/config.json": members["config.json"],
        "model/g_00250000": members["generator.pt"],
        "model/spk_list.txt": members["spk_list.txt"],
        "model/src/configs/config.json": b'{"not": "the generator"}',
        "model/src/handler.py": b"",
    }
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in nested.items():
            z.writestr(name, data)
    out = tmp_path / "out"
    hc.convert(omni.root, out, track="b", components=["ad"], verify=True)
    assert _layout(out / "ad") == AD_LAYOUT
    assert UnitVocoder.from_pretrained(out / "ad" / "finetuned").speakers == list(SPEAKERS)


def test_the_manifest_names_the_generator_among_several(omni: FakeCheckpoint, tmp_path: Path) -> None:
    archive = omni.root / "decoder" / "audio" / ZERO_SHOT_ARCHIVE
    _rewrite_archive(archive, add={"discriminator.pt": _torch_bytes({"discriminator": {"w": torch.ones(2)}})})
    hc.convert(omni.root, tmp_path / "out", track="b", components=["ad"], verify=True)
    assert set(hc.load_state_dict(tmp_path / "out" / "ad" / "zeroshot")) == set(_generator(archive))


def test_tensors_sharing_storage_are_written_apart(omni: FakeCheckpoint, tmp_path: Path) -> None:
    """A checkpoint may save one tensor under two names (here each activation's two equal filters); safetensors
    refuses shared storage, so the converter writes them as two tensors."""
    archive = omni.root / "decoder" / "audio" / ZERO_SHOT_ARCHIVE
    state = _generator(archive)
    shared = [k for k in state if k.endswith("downsample.lowpass.filter")]
    for name in shared:
        state[name] = state[name.replace("downsample.lowpass.filter", "upsample.filter")]
    _rewrite_archive(archive, add={"generator.pt": _torch_bytes({"generator": state})})
    hc.convert(omni.root, tmp_path / "out", track="b", components=["ad"], verify=True)
    written = hc.load_state_dict(tmp_path / "out" / "ad" / "zeroshot")
    assert shared and all(torch.equal(written[k], state[k]) for k in state)


def test_unpacked_variant_folders_are_accepted(omni: FakeCheckpoint, tmp_path: Path) -> None:
    """decoder/audio/{finetuned,zeroshot}/: safetensors weights are copied, a torch checkpoint is converted."""
    from safetensors.torch import save_file

    from hcxserve.models.unit_vocoder import UnitVocoder

    audio = omni.root / "decoder" / "audio"
    for variant, archive in (("finetuned", FINETUNED_ARCHIVE), ("zeroshot", ZERO_SHOT_ARCHIVE)):
        folder = audio / variant
        folder.mkdir()
        members = _archive_members(audio / archive)
        for name in ("config.json", "spk_list.txt"):
            if name in members:
                (folder / name).write_bytes(members[name])
        if variant == "finetuned":
            (folder / "generator.pt").write_bytes(members["generator.pt"])
        else:
            save_file(_generator(audio / archive), str(folder / "model.safetensors"))
        (folder / "README.md").write_text("not copied")
        (audio / archive).unlink()
    out = tmp_path / "out"
    hc.convert(omni.root, out, track="b", components=["ad"], verify=True)
    assert _layout(out / "ad") == AD_LAYOUT
    assert (out / "ad" / "zeroshot" / "model.safetensors").read_bytes() == (
        audio / "zeroshot" / "model.safetensors"
    ).read_bytes()
    assert UnitVocoder.from_pretrained(out / "ad" / "finetuned").speakers == list(SPEAKERS)
    UnitVocoder.from_pretrained(out / "ad" / "zeroshot")


class _RunsCode:
    """A pickle that would create a file when unpickled: weights_only must refuse it before that happens."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize(
    "case, match",
    [
        ("no generator", "NCCosybigvganDecoder.mar: no generator checkpoint in the archive"),
        ("code in the pickle", "generator.pt: refused: not a plain tensor checkpoint (Unsupported global"),
        ("not tensors", "the generator state dict holds non-tensor entries: step"),
        ("not a state dict", "expected {'generator': state_dict}, got list"),
        ("not a zip", "NCCosybigvganDecoder.mar: not a readable .mar (zip) archive"),
        ("no speaker list", "NCCosybigvganDecoder.mar: the finetuned audio decoder has no spk_list.txt"),
        ("no config", "NCCosybigvganDecoder.mar: no config.json in the archive"),
        ("two checkpoints", "several possible generator checkpoints (extra.pt, generator.pt)"),
        ("archives swapped", "finetune: false, which is the zeroshot variant, but this archive name is the finetuned"),
        ("one variant only", "decoder/audio/ has no zeroshot audio decoder"),
    ],
)
def test_bad_audio_decoder_archives_are_refused(
    omni: FakeCheckpoint, tmp_path: Path, capsys, case: str, match: str
) -> None:
    audio = omni.root / "decoder" / "audio"
    archive = audio / FINETUNED_ARCHIVE
    marker = tmp_path / "code-ran"
    if case == "no generator":
        _rewrite_archive(archive, drop=("generator.pt",))
    elif case == "code in the pickle":
        _rewrite_archive(archive, add={"generator.pt": _torch_bytes({"generator": {"w": _RunsCode(marker)}})})
    elif case == "not tensors":
        _rewrite_archive(archive, add={"generator.pt": _torch_bytes({"generator": {"w": torch.ones(1), "step": 5}})})
    elif case == "not a state dict":
        _rewrite_archive(archive, add={"generator.pt": _torch_bytes([torch.ones(1)])})
    elif case == "not a zip":
        archive.write_bytes(b"PK\x03\x04 not really a zip" * 10)
    elif case == "no speaker list":
        _rewrite_archive(archive, drop=("spk_list.txt",))
    elif case == "no config":
        _rewrite_archive(archive, drop=("config.json",))
    elif case == "two checkpoints":
        _rewrite_archive(archive, drop=("MAR-INF/MANIFEST.json",), add={"extra.pt": b"x"})
    elif case == "archives swapped":
        archive.rename(audio / "tmp.mar")
        (audio / ZERO_SHOT_ARCHIVE).rename(archive)
        (audio / "tmp.mar").rename(audio / ZERO_SHOT_ARCHIVE)
    elif case == "one variant only":
        (audio / ZERO_SHOT_ARCHIVE).unlink()
    _expect_cli_error(omni.root, tmp_path / "out", "b", capsys, match)
    assert not marker.exists()


def test_verify_catches_a_missing_audio_decoder_file(omni: FakeCheckpoint, tmp_path: Path, monkeypatch) -> None:
    from hcxserve.convert import audio_decoder

    real = audio_decoder._write_variant

    def forgetful(source, out: Path, scratch: Path) -> None:
        real(source, out, scratch)
        (out / "spk_list.txt").unlink(missing_ok=True)

    monkeypatch.setattr(audio_decoder, "_write_variant", forgetful)
    with pytest.raises(hc.VerifyError, match=r"ad/finetuned: files differ \(missing: spk_list.txt; unexpected: -\)"):
        hc.convert(omni.root, tmp_path / "out", track="b", components=["ad"], verify=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["omni"]  # nothing half-written is left


def test_verify_catches_a_changed_audio_decoder_tensor(omni: FakeCheckpoint, tmp_path: Path, capsys) -> None:
    _converted(omni, tmp_path / "out", "-c", "ad")
    weights = tmp_path / "out" / "ad" / "zeroshot" / "model.safetensors"
    with open(weights, "r+b") as f:  # one bit of the last tensor's data
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    _verify_fails(omni, tmp_path / "out", capsys, "content differs from the source checkpoint", "-c", "ad")


def test_verify_checks_the_weights_fit_the_audio_decoder(omni: FakeCheckpoint, tmp_path: Path, capsys) -> None:
    from hcxserve.tooling.embedded.unit_vocoder import original_state_dict, write_archive

    archive = omni.root / "decoder" / "audio" / FINETUNED_ARCHIVE
    wrong = original_state_dict({**FINETUNED_VOCODER, "num_units": 60})  # config.json still says 50
    write_archive(archive, FINETUNED_VOCODER, wrong, speakers=SPEAKERS)
    _converted(omni, tmp_path / "out", "-c", "ad")  # conversion copies what it is given
    _verify_fails(
        omni, tmp_path / "out", capsys, "ad/finetuned: weights do not fit the audio decoder: wrong shape: unit_emb",
        "-c", "ad",
    )  # fmt: skip


# ------------------------------------------------------------------------------------- sharding and dtype


def test_sharding_and_index(omni: FakeCheckpoint, tmp_path: Path) -> None:
    out = tmp_path / "out"
    limit = 4096
    hc.convert(omni.root, out, track="b", components=["llm", "ae"], max_shard_size=f"{limit}B")
    for component in ("llm", "ae"):
        folder = out / component
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        files = sorted({*index["weight_map"].values()})
        n = len(files)
        assert n > 1 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        assert not (folder / "model.safetensors").exists()
        sizes = {}
        order = []
        for name in files:
            with safe_open(str(folder / name), framework="pt") as f:
                keys = list(f.keys())
                order += sorted(keys)
                sizes[name] = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in keys)
                assert all(index["weight_map"][k] == name for k in keys)
                assert f.metadata() == {"format": "pt"}
            assert sizes[name] <= limit or len(keys) == 1  # only an oversized tensor may exceed the limit
        assert order == sorted(order)  # keys packed in sorted order across shards
        assert index["metadata"]["total_size"] == sum(sizes.values())
        assert_component(out, component, omni)


def test_dtype_cast_only_touches_floating_tensors(omni: FakeCheckpoint, tmp_path: Path) -> None:
    out = tmp_path / "out"
    hc.convert(omni.root, out, track="b", components=["ae"], dtype="bfloat16", verify=True)
    assert_component(out, "ae", omni, cast=torch.bfloat16)
    ae = hc.load_state_dict(out / "ae")
    assert ae["discrete_audio_model.quantizer.levels"].dtype == torch.int64
    assert ae["discrete_audio_model.quantizer.mask"].dtype == torch.bool
    assert (
        ae["discrete_audio_model.quantizer.scale"].dtype == torch.bfloat16
        and ae["discrete_audio_model.quantizer.scale"].dim() == 0
    )


def test_bf16_input_cast_to_float32(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "in", "a", dtype=torch.bfloat16)
    out = tmp_path / "out"
    hc.convert(ckpt.root, out, track="a", dtype="float32", verify=True)
    assert_component(out, "ve", ckpt, cast=torch.float32)
    assert_component(out, "llm", ckpt, cast=torch.float32)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("5GB", 5 * 10**9),
        ("500MB", 5 * 10**8),
        ("4GiB", 4 * 2**30),
        ("1.5KB", 1500),
        ("123", 123),
        ("2 mib", 2 * 2**20),
        ("1TB", 10**12),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert hc.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "5XB", "-1GB", "0", "GB"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(hc.ConvertError):
        hc.parse_size(text)


# --------------------------------------------------------------------------- dry-run, re-runs, --force


def test_dry_run_writes_nothing(omni: FakeCheckpoint, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    before = tree_snapshot(tmp_path)
    assert run_cli("--input", omni.root, "--output", out, "--track", "b", "--dry-run", "--max-shard-size", "2KB") == 0
    assert tree_snapshot(tmp_path) == before and not out.exists()
    report = capsys.readouterr().out
    layout = expected_layout(omni)
    for component in ("llm", "ve", "ae", "vd", "ad"):
        assert f"\n{component} " in report
    assert f"{len(layout['llm'])}" in report and "tokenizer.json" in report and "will be created" in report
    assert "preprocessor_config.json (generated)" in report


def test_rerun_is_up_to_date_and_untouched(
    think: FakeCheckpoint, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert run_cli("-i", think.root, "-o", out, "-t", "a") == 0
    before = tree_snapshot(out)
    assert run_cli("-i", think.root, "-o", out, "-t", "a", "--verify") == 0
    assert "up to date" in capsys.readouterr().out
    assert tree_snapshot(out) == before


def test_changed_options_need_force(think: FakeCheckpoint, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    hc.convert(think.root, out, track="a")
    assert run_cli("-i", think.root, "-o", out, "-t", "a", "--dtype", "float16") == 2
    assert "--force" in capsys.readouterr().err
    assert hc.read_manifest(out)["options"]["dtype"] == "keep"
    assert run_cli("-i", think.root, "-o", out, "-t", "a", "--dtype", "float16", "--force") == 0
    assert hc.read_manifest(out)["options"]["dtype"] == "float16"
    assert_component(out, "ve", think, cast=torch.float16)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out.")] == []  # no temp or old folders left


def test_changed_input_is_not_up_to_date(think: FakeCheckpoint, tmp_path: Path) -> None:
    out = tmp_path / "out"
    hc.convert(think.root, out, track="a")
    os.utime(think.shard_of("model.vision_model.patch_embed.proj.weight"), ns=(1, 1))
    with pytest.raises(hc.OutputExistsError):
        hc.convert(think.root, out, track="a")


def test_refuses_foreign_non_empty_output(think: FakeCheckpoint, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(hc.OutputExistsError):
        hc.convert(think.root, out, track="a")
    assert (out / "precious.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert hc.convert(think.root, empty, track="a").status == "converted"


def test_force_keeps_old_output_when_new_conversion_fails(think: FakeCheckpoint, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    hc.convert(think.root, out, track="a")
    before = tree_snapshot(out)

    def boom(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr("hcxserve.convert.converter.write_shard", boom)
    with pytest.raises(OSError):
        hc.convert(think.root, out, track="a", dtype="float16", force=True)
    assert tree_snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "think"]


def test_refuses_output_equal_to_input(think: FakeCheckpoint) -> None:
    with pytest.raises(hc.ConvertError, match="must not be the input"):
        hc.convert(think.root, think.root, track="a", force=True)


# ------------------------------------------------------------------------------------------------ --verify


def test_verify_catches_corrupted_output(think: FakeCheckpoint, tmp_path: Path, monkeypatch) -> None:
    real = safetensors_io.write_shard

    def corrupting(path: Path, tensors, on_bytes=lambda n: None) -> None:
        real(path, tensors, on_bytes)
        with open(path, "r+b") as f:  # flip the last byte of the data section
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 0xFF]))

    monkeypatch.setattr("hcxserve.convert.converter.write_shard", corrupting)
    out = tmp_path / "out"
    with pytest.raises(hc.VerifyError, match="content differs"):
        hc.convert(think.root, out, track="a", verify=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["think"]  # nothing half-written is left


def test_cli_verify_ok(omni: FakeCheckpoint, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("-i", omni.root, "-o", tmp_path / "out", "-t", "b", "--verify", "--max-shard-size", "3KB", "-q") == 0
    assert "verified" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------- broken inputs


def _expect_cli_error(ckpt_root: Path, out: Path, track: str, capsys, match: str, *extra: str) -> None:
    assert run_cli("-i", ckpt_root, "-o", out, "-t", track, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert match in err, err
    assert not out.exists()
    assert [p for p in out.parent.iterdir() if p.name.startswith(out.name + ".")] == []


def test_missing_shard(think: FakeCheckpoint, tmp_path: Path, capsys) -> None:
    think.shard_of("model.vision_model.patch_embed.proj.weight").unlink()
    _expect_cli_error(think.root, tmp_path / "out", "a", capsys, "missing shard file")


def test_truncated_shard(think: FakeCheckpoint, tmp_path: Path, capsys) -> None:
    shard = think.shard_of("model.vision_model.patch_embed.proj.weight")
    os.truncate(shard, shard.stat().st_size - 10)
    _expect_cli_error(think.root, tmp_path / "out", "a", capsys, "truncated")


def test_corrupt_header(think: FakeCheckpoint, tmp_path: Path, capsys) -> None:
    shard = think.shard_of("model.vision_model.patch_embed.proj.weight")
    with open(shard, "r+b") as f:
        f.write(struct.pack("<Q", 10**12))
    _expect_cli_error(think.root, tmp_path / "out", "a", capsys, "corrupt safetensors header")


def test_index_names_absent_tensor(think: FakeCheckpoint, tmp_path: Path, capsys) -> None:
    index_path = think.root / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.vision_model.ghost.weight"] = think.shard_files[0]
    index_path.write_text(json.dumps(index))
    _expect_cli_error(think.root, tmp_path / "out", "a", capsys, "model.vision_model.ghost.weight")


def test_unknown_prefix(tmp_path: Path, capsys) -> None:
    from ckpt_factory import build_config, build_tensors, write_checkpoint

    tensors = build_tensors("a") | {"model.mystery_head.weight": torch.zeros(2)}
    write_checkpoint(tmp_path / "in", tensors, build_config("a"))
    _expect_cli_error(tmp_path / "in", tmp_path / "out", "a", capsys, "model.mystery_head.weight")


def test_track_a_on_omni_checkpoint(omni: FakeCheckpoint, tmp_path: Path, capsys) -> None:
    _expect_cli_error(omni.root, tmp_path / "out", "a", capsys, "use --track b")


def test_track_b_on_think_checkpoint(think: FakeCheckpoint, tmp_path: Path, capsys) -> None:
    _expect_cli_error(think.root, tmp_path / "out", "b", capsys, "model.audio_model.*", "-c", "llm", "ve")


@pytest.mark.parametrize("drop", ["model.language_model.", "model.vision_model.", "model.mm_projector."])
def test_missing_required_prefix(tmp_path: Path, capsys, drop: str) -> None:
    from ckpt_factory import build_config, build_tensors, write_checkpoint

    tensors = {k: v for k, v in build_tensors("a").items() if not k.startswith(drop)}
    write_checkpoint(tmp_path / "in", tensors, build_config("a"))
    _expect_cli_error(tmp_path / "in", tmp_path / "out", "a", capsys, "missing required tensors")


def test_both_projector_spellings_is_ambiguous(tmp_path: Path, capsys) -> None:
    from ckpt_factory import build_config, build_tensors, write_checkpoint

    tensors = build_tensors("a") | {"model.vision_projector.weight": torch.zeros(TEXT_HIDDEN, VIT_OUT)}
    write_checkpoint(tmp_path / "in", tensors, build_config("a"))
    _expect_cli_error(tmp_path / "in", tmp_path / "out", "a", capsys, "cannot tell which is the projector")


@pytest.mark.parametrize("key", ["text_config", "vision_config"])
def test_missing_config_key(think: FakeCheckpoint, tmp_path: Path, capsys, key: str) -> None:
    config = dict(think.config)
    del config[key]
    (think.root / "config.json").write_text(json.dumps(config))
    _expect_cli_error(think.root, tmp_path / "out", "a", capsys, f"config.json lacks {key}")


def test_missing_decoder_folder(omni: FakeCheckpoint, tmp_path: Path, capsys) -> None:
    import shutil

    shutil.rmtree(omni.root / "decoder" / "audio")
    _expect_cli_error(omni.root, tmp_path / "out", "b", capsys, "decoder/audio/")


def test_track_b_component_on_track_a(think: FakeCheckpoint, tmp_path: Path, capsys) -> None:
    _expect_cli_error(think.root, tmp_path / "out", "a", capsys, "ae", "--components", "llm", "ae")


# ------------------------------------------------------------------------------------------------ loader


def test_loader_prefix_and_errors(think: FakeCheckpoint, tmp_path: Path) -> None:
    out = tmp_path / "out"
    hc.convert(think.root, out, track="a", max_shard_size="1KB")
    assert (out / "llm" / "model.safetensors.index.json").exists()
    full = hc.load_state_dict(out / "llm")
    proj = hc.load_state_dict(out / "llm", prefix="model.mm_projector.")
    assert set(proj) == {"weight", "bias"} and torch.equal(proj["weight"], full["model.mm_projector.weight"])
    kept = hc.load_state_dict(out / "llm", prefix="model.mm_projector.", strip_prefix=False)
    assert set(kept) == {"model.mm_projector.weight", "model.mm_projector.bias"}
    with pytest.raises(hc.ComponentError, match="no tensor starts with"):
        hc.load_state_dict(out / "llm", prefix="nope.")
    with pytest.raises(hc.ComponentError):
        hc.load_state_dict(tmp_path / "missing")
    next((out / "llm").glob("model-00001-*.safetensors")).unlink()
    with pytest.raises(hc.ComponentError, match="missing"):
        hc.load_state_dict(out / "llm")


# ------------------------------------------------------------------------------------- streaming internals


def test_chunked_cast_and_windowed_verify(omni: FakeCheckpoint, tmp_path: Path, monkeypatch) -> None:
    """Tiny chunks force every tensor across many cast chunks, verify slices and handle re-opens."""
    from hcxserve.convert import verify

    monkeypatch.setattr(safetensors_io, "CAST_CHUNK", 64)
    monkeypatch.setattr(verify, "VERIFY_CHUNK", 96)
    monkeypatch.setattr(verify, "VERIFY_WINDOW", 512)
    out = tmp_path / "out"
    hc.convert(omni.root, out, track="b", components=["llm", "ve", "ae"], dtype="bfloat16", verify=True)
    for component in ("llm", "ve", "ae"):
        assert_component(out, component, omni, cast=torch.bfloat16)


def test_verify_catches_corruption_in_a_middle_slice(think: FakeCheckpoint, tmp_path: Path, monkeypatch) -> None:
    from hcxserve.convert import verify

    real = safetensors_io.write_shard
    monkeypatch.setattr(verify, "VERIFY_CHUNK", 64)

    def corrupting(path: Path, tensors, on_bytes=lambda n: None) -> None:
        real(path, tensors, on_bytes)
        header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
        big = max(tensors, key=lambda t: t.nbytes)
        begin = 8 + header_len + sum(t.nbytes for t in tensors[: tensors.index(big)])
        with open(path, "r+b") as f:  # flip one byte in the middle of the largest tensor
            f.seek(begin + big.nbytes // 2)
            byte = f.read(1)
            f.seek(begin + big.nbytes // 2)
            f.write(bytes([byte[0] ^ 0x01]))

    monkeypatch.setattr("hcxserve.convert.converter.write_shard", corrupting)
    with pytest.raises(hc.VerifyError, match="content differs"):
        hc.convert(think.root, tmp_path / "out", track="a", verify=True)


def test_copy_falls_back_when_copy_file_range_fails(think: FakeCheckpoint, tmp_path: Path, monkeypatch) -> None:
    def unsupported(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(safetensors_io, "COPY_CHUNK", 100)
    monkeypatch.setattr(os, "copy_file_range", unsupported)
    out = tmp_path / "out"
    hc.convert(think.root, out, track="a", verify=True)
    assert_component(out, "llm", think)


# ------------------------------------------------------------------------------------ --verify on an output
# Each test converts, then damages the output the way a bad disk, a bad copy or a buggy writer would, and runs the
# CLI again with --verify (the output is up to date, so this re-verifies it in place). Verify must name the damage.


def _rewrite_header(path: Path, edit) -> None:
    """Edit a safetensors file's JSON header in place; the header keeps its length (padded with spaces)."""
    with open(path, "r+b") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        edit(header)
        text = json.dumps(header, separators=(",", ":")).encode()
        assert len(text) <= size, "the edit must not lengthen the header"
        f.seek(8)
        f.write(text.ljust(size))


def _converted(ckpt: FakeCheckpoint, out: Path, *extra: str) -> None:
    assert run_cli("-i", ckpt.root, "-o", out, "-t", ckpt.track, "-q", *extra) == 0


def _verify_fails(ckpt: FakeCheckpoint, out: Path, capsys, match: str, *extra: str) -> None:
    capsys.readouterr()
    assert run_cli("-i", ckpt.root, "-o", out, "-t", ckpt.track, "-q", "--verify", *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err, err


def _a_tensor(header: dict) -> str:
    return sorted(k for k in header if k != "__metadata__" and header[k]["dtype"] == "F32")[0]


def test_verify_passes_on_an_intact_output(think: FakeCheckpoint, tmp_path: Path, capsys) -> None:
    _converted(think, tmp_path / "out")
    capsys.readouterr()
    assert run_cli("-i", think.root, "-o", tmp_path / "out", "-t", "a", "--verify") == 0
    assert "up to date" in capsys.readouterr().out


def test_verify_catches_changed_content(think: FakeCheckpoint, tmp_path: Path, capsys) -> None:
    _converted(think, tmp_path / "out")
    shard = tmp_path / "out" / "ve" / "model.safetensors"
    with open(shard, "r+b") as f:  # one bit in the last tensor's data
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    _verify_fails(think, tmp_path / "out", capsys, "content differs from input tensor")


def test_verify_catches_a_wrong_dtype_in_a_readable_header(think: FakeCheckpoint, tmp_path: Path, capsys) -> None:
    _converted(think, tmp_path / "out")
    names = []

    def retype(header):  # F32 -> I32: the same size, so the file still parses
        names.append(_a_tensor(header))
        header[names[0]]["dtype"] = "I32"

    _rewrite_header(tmp_path / "out" / "ve" / "model.safetensors", retype)
    _verify_fails(think, tmp_path / "out", capsys, f"ve: {names[0]}: dtype I32, expected F32")


def test_verify_catches_a_wrong_shape(think: FakeCheckpoint, tmp_path: Path, capsys) -> None:
    _converted(think, tmp_path / "out")
    names = []

    def reshape(header):  # the same number of elements, another shape
        name = sorted(k for k in header if k != "__metadata__" and len(header[k]["shape"]) == 2)[0]
        names.append(name)
        rows, cols = header[name]["shape"]
        header[name]["shape"] = [cols, rows] if rows != cols else [rows * cols, 1]

    _rewrite_header(tmp_path / "out" / "ve" / "model.safetensors", reshape)
    _verify_fails(think, tmp_path / "out", capsys, f"ve: {names[0]}: shape")


def test_verify_catches_a_renamed_tensor(think: FakeCheckpoint, tmp_path: Path, capsys) -> None:
    _converted(think, tmp_path / "out")

    def rename(header):
        name = _a_tensor(header)
        header[name[:-1] + ("X" if name[-1] != "X" else "Y")] = header.pop(name)

    _rewrite_header(tmp_path / "out" / "ve" / "model.safetensors", rename)
    _verify_fails(think, tmp_path / "out", capsys, "ve: tensor names differ (missing: ")


def test_verify_catches_a_tensor_in_the_wrong_shard(omni: FakeCheckpoint, tmp_path: Path, capsys) -> None:
    _converted(omni, tmp_path / "out", "-c", "ae", "--max-shard-size", "4096B")
    index_path = tmp_path / "out" / "ae" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    files = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == files[0])
    index["weight_map"][name] = files[1]
    index_path.write_text(json.dumps(index))
    _verify_fails(omni, tmp_path / "out", capsys, "ae: tensors are not in the planned weight files", "-c", "ae",
                  "--max-shard-size", "4096B")  # fmt: skip


def test_verify_catches_a_wrong_total_size(omni: FakeCheckpoint, tmp_path: Path, capsys) -> None:
    _converted(omni, tmp_path / "out", "-c", "ae", "--max-shard-size", "4096B")
    index_path = tmp_path / "out" / "ae" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["metadata"]["total_size"] += 1
    index_path.write_text(json.dumps(index))
    _verify_fails(omni, tmp_path / "out", capsys, "ae/model.safetensors.index.json: total_size is not", "-c", "ae",
                  "--max-shard-size", "4096B")  # fmt: skip


@pytest.mark.parametrize("side_file", ["tokenizer.json", "chat_template.jinja", "preprocessor_config.json"])
def test_verify_catches_a_changed_side_file(think: FakeCheckpoint, tmp_path: Path, capsys, side_file: str) -> None:
    _converted(think, tmp_path / "out")
    path = tmp_path / "out" / "llm" / side_file
    path.write_text(path.read_text() + " ")
    _verify_fails(think, tmp_path / "out", capsys, f"llm/{side_file} differs from the input file")


def test_verify_catches_a_changed_decoder_file(omni: FakeCheckpoint, tmp_path: Path, capsys) -> None:
    _converted(omni, tmp_path / "out")
    path = tmp_path / "out" / "vd" / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    _verify_fails(omni, tmp_path / "out", capsys, "vd/transformer/diffusion_pytorch_model.safetensors differs")


def test_verify_catches_an_extra_file_in_a_decoder_tree(omni: FakeCheckpoint, tmp_path: Path, capsys) -> None:
    _converted(omni, tmp_path / "out")
    (tmp_path / "out" / "vd" / "stray.bin").write_bytes(b"x")
    _verify_fails(omni, tmp_path / "out", capsys, "vd: copied file list differs")
    (tmp_path / "out" / "vd" / "stray.bin").unlink()
    (tmp_path / "out" / "ad" / "zeroshot" / "stray.bin").write_bytes(b"x")
    _verify_fails(omni, tmp_path / "out", capsys, "ad/zeroshot: files differ (missing: -; unexpected: stray.bin)")


def test_verify_catches_a_missing_config(think: FakeCheckpoint, tmp_path: Path, monkeypatch) -> None:
    from hcxserve.convert import converter

    real = converter.write_json

    def skipping(path: Path, data) -> None:
        if not (path.name == "config.json" and path.parent.name == "ve"):
            real(path, data)

    monkeypatch.setattr(converter, "write_json", skipping)
    with pytest.raises(hc.VerifyError, match="ve/config.json is missing"):
        hc.convert(think.root, tmp_path / "out", track="a", verify=True)
    assert not (tmp_path / "out").exists()


def _same_size_change(path: Path) -> None:
    """Flip one byte and put the modification time back: what a shallow (size + mtime) comparison cannot see."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_verify_compares_side_files_byte_for_byte(think: FakeCheckpoint, tmp_path: Path, capsys) -> None:
    _converted(think, tmp_path / "out")
    _same_size_change(tmp_path / "out" / "llm" / "tokenizer.json")
    _verify_fails(think, tmp_path / "out", capsys, "error: llm/tokenizer.json differs from the input file")


def test_verify_compares_decoder_files_byte_for_byte(omni: FakeCheckpoint, tmp_path: Path, capsys) -> None:
    _converted(omni, tmp_path / "out")
    _same_size_change(tmp_path / "out" / "vd" / "vae" / "config.json")
    _verify_fails(omni, tmp_path / "out", capsys, "error: vd/vae/config.json differs from the input file")


def test_verify_compares_audio_decoder_texts_with_the_archive(omni: FakeCheckpoint, tmp_path: Path, capsys) -> None:
    _converted(omni, tmp_path / "out")
    _same_size_change(tmp_path / "out" / "ad" / "finetuned" / "spk_list.txt")
    match = "error: ad/finetuned/spk_list.txt differs from NCCosybigvganDecoder.mar:spk_list.txt"
    _verify_fails(omni, tmp_path / "out", capsys, match)


def _two_shards(omni: FakeCheckpoint, out: Path) -> Path:
    """Convert `ae` into exactly two shards; returns its index."""
    total = sum(t.numel() * t.element_size() for k, t in omni.tensors.items() if k.startswith("model.audio"))
    for limit in (total * k // 20 for k in range(10, 20)):
        if out.exists():
            import shutil

            shutil.rmtree(out)
        _converted(omni, out, "-c", "ae", "--max-shard-size", f"{limit}B")
        index = json.loads((out / "ae" / "model.safetensors.index.json").read_text())
        if len(set(index["weight_map"].values())) == 2:
            return out / "ae" / "model.safetensors.index.json"
    raise AssertionError("no shard size gives two shards")


@pytest.mark.parametrize("edit", ["total_size", "no_metadata"])
def test_verify_checks_total_size_from_two_shards_on(omni: FakeCheckpoint, tmp_path: Path, capsys, edit: str) -> None:
    index_path = _two_shards(omni, tmp_path / "out")
    options = json.loads((tmp_path / "out" / "manifest.json").read_text())["options"]
    index = json.loads(index_path.read_text())
    if edit == "total_size":
        index["metadata"]["total_size"] -= 1
    else:
        del index["metadata"]
    index_path.write_text(json.dumps(index))
    _verify_fails(omni, tmp_path / "out", capsys, "error: ae/model.safetensors.index.json: total_size is not",
                  "-c", "ae", "--max-shard-size", f"{options['max_shard_size']}B")  # fmt: skip


def test_verify_names_missing_and_unexpected_tensors(omni: FakeCheckpoint, tmp_path: Path, capsys) -> None:
    index_path = _two_shards(omni, tmp_path / "out")
    shard_size = json.loads((tmp_path / "out" / "manifest.json").read_text())["options"]["max_shard_size"]
    original = index_path.read_text()
    index = json.loads(original)
    dropped = sorted(index["weight_map"])[0]
    del index["weight_map"][dropped]
    index_path.write_text(json.dumps(index))
    args = ("-c", "ae", "--max-shard-size", f"{shard_size}B")
    _verify_fails(
        omni, tmp_path / "out", capsys, f"error: ae: tensor names differ (missing: {dropped}; unexpected: -)", *args
    )
    index = json.loads(original)
    index["weight_map"]["audio_model.ghost"] = sorted(index["weight_map"].values())[0]
    index_path.write_text(json.dumps(index))
    _verify_fails(
        omni,
        tmp_path / "out",
        capsys,
        "error: ae: tensor names differ (missing: -; unexpected: audio_model.ghost)",
        *args,
    )


def test_verify_reports_an_unreadable_index(omni: FakeCheckpoint, tmp_path: Path, capsys) -> None:
    index_path = _two_shards(omni, tmp_path / "out")
    shard_size = json.loads((tmp_path / "out" / "manifest.json").read_text())["options"]["max_shard_size"]
    index_path.write_text("{not json")
    _verify_fails(omni, tmp_path / "out", capsys, "error: ae: ", "-c", "ae", "--max-shard-size", f"{shard_size}B")


def test_verify_reports_an_unreadable_output_shard(think: FakeCheckpoint, tmp_path: Path, capsys) -> None:
    _converted(think, tmp_path / "out")
    shard = tmp_path / "out" / "ve" / "model.safetensors"
    os.truncate(shard, shard.stat().st_size - 100)
    _verify_fails(think, tmp_path / "out", capsys, f"error: ve: {shard}: unreadable safetensors file (")


def test_verify_reads_in_bounded_slices_and_reopens_files(think: FakeCheckpoint, tmp_path: Path, monkeypatch) -> None:
    """Verify's memory bound: each read holds at most VERIFY_CHUNK bytes (or one row of a tensor with bigger rows),
    covers every row once, and a file handle is dropped once VERIFY_WINDOW bytes went through it."""
    import safetensors

    from hcxserve.convert import verify

    chunk, window = 96, 512
    monkeypatch.setattr(verify, "VERIFY_CHUNK", chunk)
    monkeypatch.setattr(verify, "VERIFY_WINDOW", window)
    real_open = safetensors.safe_open
    handles: list[dict] = []  # per opened handle: path and the reads made through it

    class Slice:
        def __init__(self, inner, record):
            self.inner, self.record = inner, record

        def get_dtype(self):
            return self.inner.get_dtype()

        def get_shape(self):
            return self.inner.get_shape()

        def __getitem__(self, rows):
            tensor = self.inner[rows]
            self.record(rows, tensor)
            return tensor

    class Recording:
        def __init__(self, path, framework):
            self.inner = real_open(path, framework=framework)
            self.log = {"path": path, "reads": []}
            handles.append(self.log)

        def __getattr__(self, name):  # keys(), metadata(), ... as they are
            return getattr(self.inner, name)

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def _record(self, key, rows, tensor):
            self.log["reads"].append((key, rows, tensor.numel() * tensor.element_size(), tuple(tensor.shape)))

        def get_tensor(self, key):
            tensor = self.inner.get_tensor(key)
            self._record(key, None, tensor)
            return tensor

        def get_slice(self, key):
            return Slice(self.inner.get_slice(key), lambda rows, tensor: self._record(key, rows, tensor))

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    hc.convert(think.root, tmp_path / "out", track="a", verify=True)

    shapes: dict[tuple[str, str], tuple] = {}
    covered: dict[tuple[str, str], list[int]] = {}
    for handle in handles:
        through = 0
        for key, rows, nbytes, shape in handle["reads"]:
            assert through < window  # a handle that had a window's worth was replaced before this read
            through += nbytes
            row_bytes = nbytes // shape[0] if shape and shape[0] else nbytes
            assert nbytes <= max(chunk, row_bytes), (key, rows, nbytes)
            name = (handle["path"], key)
            if rows is None:
                shapes[name] = shape
                covered.setdefault(name, []).extend(range(shape[0]) if shape else [0])
            else:
                covered.setdefault(name, []).extend(range(rows.start, rows.stop))
    sliced = [name for name in covered if name not in shapes]
    assert sliced, "no tensor was big enough to be read in slices"
    for name, rows in covered.items():
        assert sorted(rows) == sorted(set(rows)), f"{name}: a row read twice by one side"
