"""The Omni output parser: text, speech and image blocks recognised the same whichever way the stream splits them."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from hcxserve.gateway.output_parser import ImageTokens, OmniOutputParser, SpeechEnd, SpeechStart, SpeechUnits, Text

SPEECH = (
    "<user_transcript>what is the weather</user_transcript>\n"
    "<assistant_transcript>It is sunny <today>.</assistant_transcript>\n"
    "<audio_decoder_call>\n"
    '<speaker_info>{"is_ref_audio": true}</speaker_info>\n'
    "<discrete_audio>\n"
    "<|discrete_audio_start|><|audio1490|><|audio1950|><|audio0|><|audio6560|><|discrete_audio_end|>\n"
    "</discrete_audio>\n"
    "</audio_decoder_call>"
)
IMAGE = (
    "Here you go: <|discrete_image_start|><|vision_ratio_4:3|>"
    + "".join(f"<|vision{i}|>" for i in (5, 65535, 0))
    + "<|discrete_image_end|>\nDone."
)


def parse(*deltas: str) -> list:
    parser = OmniOutputParser()
    events = [event for delta in deltas for event in parser.feed(delta)] + parser.finish()
    return normalised(events)


def normalised(events: list) -> list:
    """Adjacent text and adjacent unit runs merged: how a stream was split does not matter."""
    out: list = []
    for event in events:
        if out and type(event) is type(out[-1]) and isinstance(event, Text):
            out[-1] = Text(out[-1].text + event.text)
        elif out and type(event) is type(out[-1]) and isinstance(event, SpeechUnits):
            out[-1] = SpeechUnits(out[-1].codes + event.codes)
        else:
            out.append(event)
    return out


def test_a_speech_block():
    assert parse(SPEECH) == [
        Text("It is sunny <today>."),
        SpeechStart({"is_ref_audio": True}),
        SpeechUnits([1490, 1950, 0, 6560]),
        SpeechEnd(),
    ]


def test_an_image_block():
    assert parse(IMAGE) == [Text("Here you go: "), ImageTokens("4:3", [5, 65535, 0]), Text("Done.")]


def test_one_character_at_a_time():
    assert parse(*SPEECH) == parse(SPEECH)
    assert parse(*IMAGE) == parse(IMAGE)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, len(SPEECH + IMAGE)), max_size=12))
def test_any_split_of_the_stream_gives_the_same_events(cuts):
    text = SPEECH + "\n" + IMAGE
    bounds = [0, *sorted(cuts), len(text)]
    assert parse(*(text[a:b] for a, b in zip(bounds, bounds[1:]))) == parse(text)


def test_units_arrive_as_they_are_generated():
    parser = OmniOutputParser()
    assert parser.feed("<assistant_transcript>Hi</assistant_transcript><audio_decoder_call><discrete_audio>") == [
        Text("Hi")
    ]
    assert parser.feed("<|discrete_audio_start|><|audio3|><|aud") == [SpeechStart({}), SpeechUnits([3])]
    assert parser.feed("io4|>") == [SpeechUnits([4])]
    assert parser.units == 2 and "".join(parser.transcript) == "Hi"


def test_text_that_only_looks_like_a_marker_is_text():
    assert parse("a < b and <b>bold</b> <|im_weird|> <speaker") == [Text("a < b and <b>bold</b> <|im_weird|> <speaker")]
    parser = OmniOutputParser()
    assert parser.feed("x <assis") == [Text("x ")]  # held back: it may become a tag
    assert parser.finish() == [Text("<assis")]


def test_units_without_their_start_marker_and_an_unterminated_image():
    assert parse("ok <|audio1|><|audio2|>") == [Text("ok "), SpeechStart({}), SpeechUnits([1, 2]), SpeechEnd()]
    assert parse("<|discrete_image_start|><|vision1|>") == [ImageTokens(None, [1], complete=False)]


def test_speaker_info_that_is_not_a_json_object_counts_as_none():
    for info in ("{not json", "[1, 2]", ""):
        events = parse(f"<speaker_info>{info}</speaker_info><|discrete_audio_start|><|audio1|>")
        assert events[0] == SpeechStart({})


def test_vision_tokens_outside_an_image_block_are_dropped_not_shown():
    assert parse("a<|vision3|>b<|vision_ratio_1:1|>c") == [Text("abc")]


def test_the_block_markers_alone_open_and_close_speech():
    """Each marker counts on its own, not only within the full layout: an empty block, text right after the end
    marker, and text after the call's closing tag."""
    assert parse("<|discrete_audio_start|><|discrete_audio_end|>") == [SpeechStart({}), SpeechEnd()]
    assert parse("<|discrete_audio_start|><|audio0007|><|discrete_audio_end|>Bye") == [
        SpeechStart({}), SpeechUnits([7]), SpeechEnd(), Text("Bye")
    ]  # fmt: skip
    assert parse("<audio_decoder_call><|audio0007|></audio_decoder_call>After") == [
        SpeechStart({}), SpeechUnits([7]), SpeechEnd(), Text("After")
    ]  # fmt: skip
    assert parse('<audio_decoder_call><speaker_info>{"a": 1}</speaker_info><|audio0001|>') == [
        SpeechStart({"a": 1}), SpeechUnits([1]), SpeechEnd()  # the end of the output ends the speech
    ]  # fmt: skip
    # an image right after units ends the speech and is an image
    assert parse(
        "<|discrete_audio_start|><|audio0001|><|discrete_image_start|><|vision_ratio_1:1|><|vision5|>"
        "<|discrete_image_end|>"
    ) == [SpeechStart({}), SpeechUnits([1]), SpeechEnd(), ImageTokens("1:1", [5])]


def test_whitespace_laid_out_before_the_answer_is_not_text():
    assert parse("\n  \nHello\n") == [Text("Hello\n")]
    assert normalised(OmniOutputParser(trim_start=False).feed("\n Hi")) == [Text("\n Hi")]


def test_an_unterminated_image_keeps_its_ratio():
    assert parse("<|discrete_image_start|><|vision_ratio_16:9|><|vision2|>") == [
        ImageTokens("16:9", [2], complete=False)
    ]


def test_a_stray_closing_marker_closes_nothing():
    """Markers that close a block the output is not in are dropped: no empty image, no speech ended early."""
    assert parse("a<|discrete_image_end|>b") == [Text("ab")]
    assert parse("<|discrete_image_start|><|vision1|><|discrete_audio_end|><|vision2|><|discrete_image_end|>") == [
        ImageTokens(None, [1, 2])
    ]
    assert parse("<|audio1|></assistant_transcript><|audio2|></speaker_info><|audio3|>") == [
        SpeechStart({}), SpeechUnits([1, 2, 3]), SpeechEnd()
    ]  # fmt: skip


def test_the_discrete_audio_tag_alone_closes_speech():
    assert parse("<|discrete_audio_start|><|audio1|></discrete_audio>Done") == [
        SpeechStart({}), SpeechUnits([1]), SpeechEnd(), Text("Done")
    ]  # fmt: skip


def test_inside_the_decoder_call_only_speech_counts():
    """Text inside <audio_decoder_call> around the speech block is layout, not answer; after the call, and after a
    speaker info outside any call, text is the answer again."""
    assert parse(
        "<audio_decoder_call><speaker_info>{}</speaker_info>junk<discrete_audio><|discrete_audio_start|><|audio1|>"
        "<|discrete_audio_end|>junk</discrete_audio>junk</audio_decoder_call>after"
    ) == [SpeechStart({}), SpeechUnits([1]), SpeechEnd(), Text("after")]
    assert parse('<speaker_info>{"a": 1}</speaker_info>Hello<|audio1|>') == [
        Text("Hello"), SpeechStart({"a": 1}), SpeechUnits([1]), SpeechEnd()
    ]  # fmt: skip
