"""Track B's audio decoder (unit BigVGAN) on tiny random checkpoints written as ad/ component folders.

The checkpoints are named as OmniServe's generator state dict is: weight norm split into a magnitude and a direction
(either naming), plus the `pad_buffer` and Kaiser filter buffers the original saves.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hcxserve.convert.errors import ComponentError
from hcxserve.models.bigvgan import ALIAS_RATIO, ALIAS_TAPS, kaiser_sinc_filter
from hcxserve.models.ecapa_tdnn import REFERENCE_LEVEL, butterworth_highpass, prepare_reference, reference_log_mel
from hcxserve.models.unit_vocoder import (
    SAMPLES_PER_UNIT,
    InvalidUnitError,
    UnitVocoder,
    UnitVocoderConfig,
    UnknownSpeakerError,
)
from tests.unit.ckpt_factory import VOCODER

# the tests' small vocoder with blocks of unequal depth: the stage's delay is the deeper one's
GENERATOR = {
    **VOCODER,
    "resblock_kernel_sizes": [3, 5],
    "resblock_dilation_sizes": [[1, 3], [1]],
    "segment_size": 8192,  # a training key, ignored
}
FINETUNED = {**GENERATOR, "finetune": True, "num_spk": 5}
ZERO_SHOT = {
    **GENERATOR,
    "finetune": False,
    "num_mels": 20,
    "spk_hidden_dim": 16,
    "global_context_att": True,
    "sampling_rate": 24000,
    "n_fft": 256,
    "hop_size": 64,
    "win_size": 256,
    "fmin": 0,
    "fmax": 8000,
}
SPEAKERS = ["fkms", "mhwj", "fphj", "mphw"]
LOOKAHEAD = 2 * 5 * 2 * (8 * 12 + 12 + 1) + 5  # two dilations of two activations per stage, then activation_post
NEW_NAMES = ("parametrizations.weight.original0", "parametrizations.weight.original1")
LEGACY_NAMES = ("weight_g", "weight_v")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def original_tensors(h: dict, *, seed: int = 0, names: tuple[str, str] = NEW_NAMES) -> dict[str, torch.Tensor]:
    """Seeded random weights under the original's names for the generator `h` describes."""
    model = UnitVocoder(UnitVocoderConfig.from_dict(h), SPEAKERS if h["finetune"] else ())
    generator = torch.Generator().manual_seed(seed)
    magnitude, direction = names
    tensors: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        if not value.is_floating_point():  # BatchNorm's num_batches_tracked
            tensors[name] = value
        elif name.endswith(("conv.weight", "deconv.weight")) and not name.startswith("spk_emb."):
            base = name.removesuffix("weight")
            tensors[base + direction] = torch.randn(value.shape, generator=generator)
            tensors[base + magnitude] = 0.5 + torch.rand(value.shape[0], 1, 1, generator=generator)
            owner = base.removesuffix("conv.").removesuffix("de")  # `X.conv.` / `X.deconv.` -> `X.`
            tensors[owner + "pad_buffer"] = torch.zeros(1, value.shape[1], 1)  # unused zeros the original saves
        elif name.endswith("running_var"):
            tensors[name] = 0.5 + torch.rand(value.shape, generator=generator)
        else:
            tensors[name] = 0.2 * torch.randn(value.shape, generator=generator)
        if name.endswith("act.alpha"):
            taps = kaiser_sinc_filter(0.5 / ALIAS_RATIO, 0.6 / ALIAS_RATIO, ALIAS_TAPS).view(1, 1, -1)
            base = name.removesuffix("act.alpha")
            tensors[base + "upsample.filter"] = taps
            tensors[base + "downsample.lowpass.filter"] = taps.clone()
    return tensors


def write_ad(
    folder: Path,
    h: dict,
    *,
    torch_checkpoint: bool = False,
    names: tuple[str, str] = NEW_NAMES,
    tensors: dict[str, torch.Tensor] | None = None,
    speakers: list[str] | None = SPEAKERS,
) -> Path:
    """An ad/ folder: config.json, the weights as safetensors or as the original's {"generator": ...} checkpoint,
    and spk_list.txt for the finetuned variant."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = original_tensors(h, names=names) if tensors is None else tensors
    (folder / "config.json").write_text(json.dumps(h))
    if torch_checkpoint:
        torch.save({"generator": tensors}, folder / "generator.pt")
    else:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    if h["finetune"] and speakers is not None:
        (folder / "spk_list.txt").write_text("\n".join(speakers) + "\n")
    return folder


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory) -> UnitVocoder:
    return UnitVocoder.from_pretrained(write_ad(tmp_path_factory.mktemp("ad"), FINETUNED, names=LEGACY_NAMES))


@pytest.fixture(scope="module")
def zero_shot(tmp_path_factory: pytest.TempPathFactory) -> UnitVocoder:
    return UnitVocoder.from_pretrained(write_ad(tmp_path_factory.mktemp("ad"), ZERO_SHOT, torch_checkpoint=True))


def random_units(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, GENERATOR["num_units"], (batch, length), generator=torch.Generator().manual_seed(seed))


def tone(seconds: float, rate: int, freq: float, amplitude: float = 0.3) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def test_both_weight_files_and_weight_norm_namings_load_the_same_generator(tmp_path: Path) -> None:
    legacy = UnitVocoder.from_pretrained(write_ad(tmp_path / "st", FINETUNED, names=LEGACY_NAMES))
    original = UnitVocoder.from_pretrained(write_ad(tmp_path / "pt", FINETUNED, torch_checkpoint=True))
    units, speaker = random_units(1, 4), legacy.speaker_embedding("mhwj")
    assert torch.equal(legacy(units, speaker), original(units, speaker))

    tensors = original_tensors(FINETUNED)
    g, v = tensors["conv_pre.conv." + NEW_NAMES[0]], tensors["conv_pre.conv." + NEW_NAMES[1]]
    expected = g * v / v.flatten(1).norm(dim=1)[:, None, None]
    assert torch.allclose(original.conv_pre.conv.weight, expected, atol=1e-6)
    assert not any("parametrizations" in name or "pad_buffer" in name for name in original.state_dict())


def test_one_shot_gives_960_samples_per_unit_within_full_scale(finetuned: UnitVocoder) -> None:
    assert finetuned.sample_rate == 24000 and finetuned.units_per_second == 25
    audio = finetuned(random_units(2, 7), finetuned.speaker_embedding())
    assert audio.shape == (2, 7 * SAMPLES_PER_UNIT) == (2, 7 * 960)
    assert torch.isfinite(audio).all() and audio.abs().max() <= 1.0
    assert audio.std() > 1e-3  # not silence
    assert not torch.equal(audio[0], audio[1])


@pytest.mark.parametrize("chunks", [[9], [1, 2, 0, 3, 3], [4, 1, 1, 1, 1, 1]])
def test_streaming_in_uneven_chunks_equals_one_shot(finetuned: UnitVocoder, chunks: list[int]) -> None:
    units = random_units(2, sum(chunks), seed=1)
    speaker = torch.cat([finetuned.speaker_embedding("fkms"), finetuned.speaker_embedding("mphw")])
    stream = finetuned.start(speaker)
    pieces, start = [], 0
    for size in chunks:
        pieces.append(stream.decode(units[:, start : start + size]))
        start += size
    pieces.append(stream.finish())
    assert torch.allclose(torch.cat(pieces, dim=-1), finetuned(units, speaker), atol=1e-6)
    assert stream.samples_emitted == units.shape[1] * 960


def test_the_stream_holds_back_exactly_the_lookahead(finetuned: UnitVocoder) -> None:
    assert finetuned.config.lookahead_samples == LOOKAHEAD
    stream = finetuned.start(finetuned.speaker_embedding())
    first = stream.decode(random_units(1, 5))
    assert first.shape == (1, 5 * 960 - LOOKAHEAD)
    assert stream.decode(random_units(1, 2)).shape == (1, 2 * 960)  # past the start, each unit releases 960
    assert stream.finish().shape == (1, LOOKAHEAD)


def test_stream_shapes_and_lifecycle(finetuned: UnitVocoder) -> None:
    stream = finetuned.start(finetuned.speaker_embedding())
    assert stream.decode([]).shape == (0,)
    flat = stream.decode([3, 4, 5, 6])
    assert flat.dim() == 1
    with pytest.raises(ValueError, match="decodes 1 row"):
        stream.decode(torch.tensor([[1], [2]]))
    assert stream.finish().dim() == 2
    with pytest.raises(RuntimeError, match="finished"):
        stream.decode([1])
    with pytest.raises(RuntimeError, match="finished"):
        stream.finish()
    assert finetuned.start(finetuned.speaker_embedding()).finish().shape == (1, 0)


def test_speakers_come_from_spk_list_and_sound_different(finetuned: UnitVocoder) -> None:
    assert finetuned.speakers == SPEAKERS
    assert finetuned.default_speaker == "fkms"
    assert torch.equal(finetuned.speaker_embedding(), finetuned.speaker_embedding("fkms"))
    assert finetuned.speaker_embedding("fphj").shape == (1, FINETUNED["spk_emb_dim"])
    units = random_units(1, 3)
    female, male = (finetuned(units, finetuned.speaker_embedding(name)) for name in ("fkms", "mhwj"))
    assert (female - male).abs().max() > 1e-3


def test_unknown_speaker_lists_the_known_ones(finetuned: UnitVocoder) -> None:
    with pytest.raises(UnknownSpeakerError, match="'nobody'; this audio decoder knows fkms, mhwj, fphj, mphw"):
        finetuned.speaker_embedding("nobody")
    with pytest.raises(ValueError, match="fixed speakers"):
        finetuned.speaker_embedding(reference=tone(1.0, 24000, 200.0), sample_rate=24000)


def test_bad_unit_ids_are_named_with_their_position(finetuned: UnitVocoder) -> None:
    speaker = finetuned.speaker_embedding()
    with pytest.raises(InvalidUnitError, match=r"unit 50 at position 2 is outside \[0, 50\)") as caught:
        finetuned(torch.tensor([[1, 2, 50, 3]]), speaker)
    assert (caught.value.value, caught.value.position) == (50, 2)
    with pytest.raises(InvalidUnitError, match=r"unit -1 at position 0 of row 1 is outside .* \(1 more out of range\)"):
        finetuned(torch.tensor([[1, 2], [-1, 99]]), speaker)
    with pytest.raises(InvalidUnitError, match="must be integers"):
        finetuned(torch.tensor([[1.0, 2.0]]), speaker)
    assert isinstance(InvalidUnitError("x"), ValueError)

    stream = finetuned.start(speaker)
    stream.decode([1, 2, 3])
    with pytest.raises(InvalidUnitError, match="unit 77 at position 4"):  # counted from the start of the stream
        stream.decode([4, 77])


def test_zero_shot_embeds_the_reference_clip(zero_shot: UnitVocoder) -> None:
    assert zero_shot.speakers == [] and zero_shot.default_speaker is None
    low = zero_shot.speaker_embedding(reference=tone(0.5, 16000, 180.0), sample_rate=16000)
    assert low.shape == (1, ZERO_SHOT["spk_emb_dim"]) and torch.isfinite(low).all()
    again = zero_shot.speaker_embedding(reference=tone(0.5, 16000, 180.0), sample_rate=16000)
    assert torch.equal(low, again)
    noise = 0.1 * np.random.default_rng(0).standard_normal(12000).astype(np.float32)
    other = zero_shot.speaker_embedding(reference=noise, sample_rate=24000)
    assert (low - other).abs().max() > 1e-3
    assert zero_shot(random_units(1, 2), other).shape == (1, 2 * 960)


def test_zero_shot_takes_no_speaker_names(zero_shot: UnitVocoder) -> None:
    with pytest.raises(UnknownSpeakerError, match="zero-shot, it takes a reference clip"):
        zero_shot.speaker_embedding("fkms")
    with pytest.raises(ValueError, match="needs a reference clip"):
        zero_shot.speaker_embedding()
    with pytest.raises(ValueError, match="silent"):
        zero_shot.speaker_embedding(reference=np.zeros(4800, np.float32), sample_rate=24000)
    with pytest.raises(ValueError, match="too short"):
        zero_shot.speaker_embedding(reference=tone(0.005, 24000, 300.0), sample_rate=24000)


def test_reference_high_pass_is_minus_3_db_at_70_hz() -> None:
    rate = 24000

    def gain(freq: float) -> float:
        out = butterworth_highpass(tone(2.0, rate, freq), rate)
        return float(np.abs(out[rate:]).max() / 0.3)  # after the filter has settled

    assert gain(70.0) == pytest.approx(2**-0.5, abs=0.01)
    assert gain(1000.0) == pytest.approx(1.0, abs=0.01)
    assert gain(20.0) < 0.1


def test_reference_is_normalised_to_minus_26_dbfs_unless_the_peak_caps_it() -> None:
    quiet = prepare_reference(tone(1.0, 24000, 440.0, amplitude=0.01), 24000, 24000)
    assert np.sqrt(np.mean(quiet.astype(np.float64) ** 2)) == pytest.approx(REFERENCE_LEVEL, rel=1e-3)
    spiky = tone(1.0, 24000, 440.0, amplitude=0.001)
    spiky[12000] = 0.5  # a click: -26 dBFS RMS would push it past full scale
    capped = prepare_reference(spiky, 24000, 24000)
    assert np.abs(capped).max() == pytest.approx(1.0, rel=1e-5)
    resampled = prepare_reference(tone(1.0, 16000, 440.0), 16000, 24000)
    assert resampled.shape == (24000,) and resampled.dtype == np.float32


def test_reference_log_mel_frames_and_bands() -> None:
    config = UnitVocoderConfig.from_dict(ZERO_SHOT)
    mel = reference_log_mel(tone(0.5, 24000, 1000.0), config)
    assert mel.shape == (1, ZERO_SHOT["num_mels"], 12000 // ZERO_SHOT["hop_size"])
    assert mel.min() >= np.log(1e-5) - 1e-6
    loud_band = int(mel[0].mean(dim=1).argmax())
    lower = reference_log_mel(tone(0.5, 24000, 300.0), config)[0].mean(dim=1).argmax()
    assert int(lower) < loud_band  # a lower tone lands in a lower mel band


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.pop("conv_post.conv.bias"), "missing: conv_post.conv.bias"),
        (lambda t: t.update({"ups.0.0.extra": torch.zeros(1)}), "unexpected: ups.0.0.extra"),
        (lambda t: t.update({"unit_emb.weight": torch.zeros(49, 8)}), r"unit_emb.weight \(49, 8\) != \(50, 8\)"),
        (lambda t: t.pop("conv_pre.conv." + NEW_NAMES[0]), "original1 has no parametrizations.weight.original0"),
        (
            lambda t: t.update({"activation_post.upsample.filter": torch.ones(1, 1, 12) / 12}),
            "activation_post.upsample.filter is not the 12-tap Kaiser-sinc filter",
        ),
    ],
)
def test_checkpoint_mismatches_name_the_tensors(tmp_path: Path, change, message: str) -> None:
    tensors = original_tensors(FINETUNED)
    change(tensors)
    with pytest.raises(ComponentError, match=message):
        UnitVocoder.from_pretrained(write_ad(tmp_path, FINETUNED, tensors=tensors, torch_checkpoint=True))


def test_folder_problems_are_component_errors(tmp_path: Path) -> None:
    with pytest.raises(ComponentError, match="spk_list.txt not found"):
        UnitVocoder.from_pretrained(write_ad(tmp_path / "no_list", FINETUNED, speakers=None))
    with pytest.raises(ComponentError, match="up to 5 distinct"):
        UnitVocoder.from_pretrained(write_ad(tmp_path / "dupes", FINETUNED, speakers=["fkms", "fkms"]))
    two = write_ad(tmp_path / "two", FINETUNED, torch_checkpoint=True)
    (two / "generator.pt").rename(two / "other.pt")
    torch.save({"generator": {}}, two / "g_00100000")
    with pytest.raises(ComponentError, match="one generator checkpoint, found g_00100000, other.pt"):
        UnitVocoder.from_pretrained(two)
    not_tensors = write_ad(tmp_path / "odd", FINETUNED, torch_checkpoint=True)
    torch.save({"generator": {"step": 3}}, not_tensors / "generator.pt")
    with pytest.raises(ComponentError, match="expected {'generator': state_dict}"):
        UnitVocoder.from_pretrained(not_tensors)
    bad_config = write_ad(tmp_path / "config", FINETUNED)
    (bad_config / "config.json").write_text(json.dumps({**FINETUNED, "upsample_rates": [10, 8, 11]}))
    with pytest.raises(ComponentError, match="config.json: audio decoder config: upsample_kernel_sizes"):
        UnitVocoder.from_pretrained(bad_config)


def test_config_reads_the_hparams_and_rejects_what_the_model_cannot_be() -> None:
    config = UnitVocoderConfig.from_dict(FINETUNED)
    assert config.upsample_rates == (10, 8, 12) and config.resblock_dilation_sizes == ((1, 3), (1,))
    assert config.causal and config.use_tanh_at_final and config.stage_channels == [8, 4, 2]
    with pytest.raises(ValueError, match="missing snake_logscale"):
        UnitVocoderConfig.from_dict({k: v for k, v in FINETUNED.items() if k != "snake_logscale"})
    with pytest.raises(ValueError, match="multiply to 800, not 960"):
        UnitVocoderConfig.from_dict({**FINETUNED, "upsample_rates": [10, 8, 10], "upsample_kernel_sizes": [20, 16, 20]})
    with pytest.raises(ValueError, match="causal=false is not supported"):
        UnitVocoderConfig.from_dict({**FINETUNED, "causal": False})
    with pytest.raises(ValueError, match="needs num_spk"):
        UnitVocoderConfig.from_dict({**GENERATOR, "finetune": True})
    with pytest.raises(ValueError, match="needs n_fft, hop_size"):
        UnitVocoderConfig.from_dict({k: v for k, v in ZERO_SHOT.items() if k not in ("n_fft", "hop_size")})


@pytest.mark.parametrize("final", [False, True])
@pytest.mark.parametrize("start_unit", [0, 3, 17, 30])
def test_a_window_of_the_units_gives_the_samples_of_a_decode_from_the_start(
    finetuned: UnitVocoder, start_unit: int, final: bool
) -> None:
    # what lets a stream's calls go to any replica: no state, only the units and where the last call stopped
    config = finetuned.config
    units, speaker = random_units(1, 40, seed=3), finetuned.speaker_embedding("mhwj")
    whole = finetuned(units, speaker)
    start = start_unit * 960 + 123
    first, lo, hi = config.span(40, start, final=final)
    assert first == max(0, start_unit - config.context_units)
    piece = finetuned(units[:, first:], speaker)[:, lo:hi]
    end = 40 * 960 if final else 40 * 960 - config.lookahead_samples
    assert piece.shape[-1] == end - start
    assert torch.allclose(piece, whole[:, start:end], atol=1e-6)


def test_the_context_covers_the_receptive_field_and_not_much_more(finetuned: UnitVocoder) -> None:
    # the gradient of one late sample shows which units it depends on
    config = finetuned.config
    units = random_units(1, 40, seed=4)
    embedded = finetuned._embed(units, finetuned.speaker_embedding()).detach().requires_grad_(True)
    with torch.enable_grad():
        x = finetuned.conv_pre(embedded)
        for i, (upsample,) in enumerate(finetuned.ups):
            x = upsample(x)
            x = sum(finetuned.resblocks[i * 2 + j](x) for j in range(2)) / 2
        out = finetuned.conv_post(finetuned.activation_post(x))[0, 0]
        out[35 * 960].backward()
    depends = (embedded.grad[0].abs().sum(0) > 0).nonzero().flatten()
    reach = 35 - int(depends.min())
    assert reach <= config.context_units <= reach + 3
