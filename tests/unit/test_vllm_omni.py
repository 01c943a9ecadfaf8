"""The Omni LLM's prompt contract, without an engine: token ids come from the tokenizer, unit blocks must be
contiguous, and bad items are refused before they reach the engine. The engine path is tested in
tests/e2e/test_track_b.py (vLLM's own prompt_token_ids)."""

import pytest
import torch
from transformers import AutoTokenizer

from hcxserve.llm.omni import MODALITIES, _checked_codes, _checked_embeds, modality_tokens


@pytest.fixture(scope="module")
def tokenizer(track_b_model_dir):
    return AutoTokenizer.from_pretrained(track_b_model_dir / "llm")


def ids(tokenizer, *tokens):
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def test_the_replaced_run_is_what_the_template_writes(tokenizer):
    image = modality_tokens(tokenizer, MODALITIES["image"])
    (newline,) = tokenizer.encode("\n", add_special_tokens=False)
    assert image.target == [
        *ids(tokenizer, "<|DISCRETE_IMAGE_PAD|>", "<|discrete_image_end|>"),
        newline,
        *ids(tokenizer, "<|image_start|>", "<|IMAGE_PAD|>"),
    ]
    assert image.bridge == image.target[1:-1]
    assert image.unit_0 == tokenizer.convert_tokens_to_ids("<|vision00000|>") and image.codebook_size == 1024
    audio = modality_tokens(tokenizer, MODALITIES["audio"])
    assert audio.unit_0 == tokenizer.convert_tokens_to_ids("<|audio0000|>") and audio.codebook_size == 6561
    video = modality_tokens(tokenizer, MODALITIES["video"])
    assert video.target == ids(tokenizer, "<|VIDEO_PAD|>") and video.unit_0 is None


def test_a_tokenizer_without_omni_tokens_is_refused(track_a_model_dir):
    track_a = AutoTokenizer.from_pretrained(track_a_model_dir / "llm")
    with pytest.raises(ValueError, match="not an Omni checkpoint"):
        modality_tokens(track_a, MODALITIES["audio"])


def test_unit_blocks_must_be_contiguous(tokenizer):
    class Gapped:
        def __init__(self, inner):
            self.inner = inner

        def encode(self, *args, **kwargs):
            return self.inner.encode(*args, **kwargs)

        def get_vocab(self):
            vocab = self.inner.get_vocab()
            vocab["<|audio0003|>"] += 100_000
            return vocab

    with pytest.raises(ValueError, match="contiguous"):
        modality_tokens(Gapped(tokenizer), MODALITIES["audio"])


@pytest.mark.parametrize(
    "codes",
    [torch.tensor([6561]), torch.tensor([-1]), torch.tensor([]), torch.tensor([1.0]), torch.tensor([[1, 2]])],
)
def test_codes_outside_the_codebook_are_refused(codes):
    with pytest.raises(ValueError):
        _checked_codes(codes, 6561, "audio[0]")


def test_codes_inside_the_codebook_pass():
    assert _checked_codes(torch.tensor([0, 6560]), 6561, "audio[0]") == [0, 6560]


@pytest.mark.parametrize(
    "embeds", [torch.zeros(3, 7), torch.zeros(0, 8), torch.zeros(8), torch.full((2, 8), float("nan")), [1, 2]]
)
def test_malformed_embeddings_are_refused(embeds):
    with pytest.raises(ValueError):
        _checked_embeds(embeds, 8, "image[0]")


def test_wellformed_embeddings_give_their_row_count():
    assert _checked_embeds(torch.zeros(5, 8), 8, "image[0]") == 5
