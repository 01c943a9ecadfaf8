"""Large inline media left in the body's bytes while the rest of a request body is parsed: where it is cut out,
and that the parsed body is always the one the whole body gives."""

from __future__ import annotations

import asyncio
import base64
import json
import tracemalloc

import pytest

from hcxserve.config import MediaConfig
from hcxserve.gateway import inline_media
from hcxserve.gateway.body import parse_json_body, parse_request
from hcxserve.gateway.fetch import MediaFetcher
from hcxserve.protocol.errors import InvalidRequestError, PayloadTooLargeError
from hcxserve.protocol.openai import InlineMedia

DEPTH = 64
# over 256 KiB on its own: smaller bodies are parsed whole, with no search for media
PAYLOAD = base64.b64encode(bytes(range(256)) * 1024).decode()
assert len(PAYLOAD) > 256 << 10
IMAGE = "data:image/png;base64," + PAYLOAD
ESCAPED = PAYLOAD.replace("/", "\\/")  # the payload as JSON may write it


def as_text(value):
    """`value` with every InlineMedia read back as the string the client sent."""
    if isinstance(value, InlineMedia):
        return value.header + json.loads(b'"' + value.payload.tobytes() + b'"')
    if isinstance(value, dict):
        return {key: as_text(item) for key, item in value.items()}
    if isinstance(value, list):
        return [as_text(item) for item in value]
    return value


def inline(value) -> list[InlineMedia]:
    if isinstance(value, InlineMedia):
        return [value]
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return [found for child in children for found in inline(child)]


def body_with(*parts, **top) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": list(parts)}], **top}).encode()


def test_every_media_reference_form_is_left_in_the_bodys_bytes():
    other = "data:video/mp4;base64," + PAYLOAD[::-1]
    parts = [
        {"type": "image_url", "image_url": {"url": IMAGE, "detail": "low"}},
        {"type": "image_url", "image_url": IMAGE},
        {"type": "image", "image": IMAGE},
        {"type": "video_url", "video_url": {"url": other}},
        {"type": "video", "video": other},
        {"type": "video", "video": [IMAGE, IMAGE]},
        {"type": "input_audio", "input_audio": {"data": PAYLOAD, "format": "wav"}},
        {"type": "audio_url", "audio_url": {"url": "DATA:audio/wav;BASE64," + PAYLOAD}},
        {"type": "audio_url", "audio_url": IMAGE},
        {"type": "text", "text": "what is in these?"},
    ]
    raw = body_with(*parts, extra_body={"messages": [{"role": "user", "content": [parts[0]]}]})
    parsed = parse_json_body(raw, DEPTH)
    found = inline(parsed)
    assert len(found) == 11  # every reference but the text, the one in `extra_body` too
    assert as_text(parsed) == json.loads(raw)
    assert {media.header for media in found} == {
        "data:image/png;base64,", "data:video/mp4;base64,", "", "DATA:audio/wav;BASE64,"
    }  # fmt: skip
    # each is a view of the body itself: no copy of the payload was made
    assert all(media.body is raw for media in found)
    # as text, a short stand-in that keeps the header (a `data:video/` URL in an image part is still told by it)
    assert all(len(media) < 100 and media.startswith(media.header) for media in found)


def test_the_request_model_keeps_them_where_the_client_put_them():
    raw = body_with({"type": "image_url", "image_url": {"url": IMAGE}},
                    {"type": "video", "video": [IMAGE]},
                    {"type": "input_audio", "input_audio": {"data": PAYLOAD}})  # fmt: skip
    image, video, audio = parse_request(raw, DEPTH).messages[0].content
    assert isinstance(image.image_url.url, InlineMedia)
    assert isinstance(video.video[0], InlineMedia)
    assert isinstance(audio.input_audio.data, InlineMedia)
    assert audio.input_audio.data.payload.tobytes().decode() == PAYLOAD


@pytest.mark.parametrize(
    "raw",
    [
        body_with({"type": "text", "text": PAYLOAD}),  # base64 as text stays text
        body_with({"type": "text", "text": IMAGE}),
        body_with({"type": "image_url", "image_url": {"url": IMAGE}}, metadata={"url": IMAGE}),
        body_with({"type": "image_url", "image_url": {"url": IMAGE}}, **{IMAGE: 1}),  # a key
        body_with({"type": "image_url", "image_url": {"url": IMAGE}},
                  tools=[{"type": "function", "function": {"name": "f", "description": PAYLOAD}}]),
        body_with({"type": "input_audio", "input_audio": {"data": PAYLOAD}}, stop=[PAYLOAD]),
        # a data: URL that is not base64, and an escaped quote that looks like the start of one
        body_with({"type": "image_url", "image_url": {"url": "data:image/png," + PAYLOAD}}),
        body_with({"type": "text", "text": '"' + IMAGE + '"'}, stop=[IMAGE]),
        # JSON escapes (`\\/`, as some encoders write every slash) in a payload and everywhere; a payload whose
        # closing quote follows a backslash
        body_with({"type": "image_url", "image_url": {"url": IMAGE}}).replace(b"/", b"\\/"),
        body_with({"type": "image_url", "image_url": {"url": IMAGE}}).replace(PAYLOAD.encode(), ESCAPED.encode()),
        body_with({"type": "image_url", "image_url": {"url": IMAGE + "\\"}}),
        json.dumps([{"type": "image_url", "image_url": {"url": IMAGE}}]).encode(),  # not an object
    ],
    ids=["text", "data-url-text", "other-url", "key", "tool", "stop", "not-base64", "escaped-quote",
         "escaped-slashes", "escaped-payload", "backslash-end", "array"],
)  # fmt: skip
def test_the_parsed_body_is_the_one_the_whole_body_gives(raw):
    assert as_text(parse_json_body(raw, DEPTH)) == json.loads(raw)


def test_a_placeholder_a_client_writes_is_only_text(monkeypatch):
    """Placeholders carry a random token; were a client to guess one, the body is parsed whole."""
    monkeypatch.setattr(inline_media.secrets, "token_hex", lambda n: "0" * 2 * n)
    guessed = f"hcx-inline:{'0' * 16}:0"
    raw = body_with({"type": "image_url", "image_url": {"url": IMAGE}}, {"type": "image", "image": guessed})
    assert inline_media.cut(raw)[1].keys() == {guessed}
    parsed = parse_json_body(raw, DEPTH)
    assert inline(parsed) == []
    assert parsed == json.loads(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"messages": [{"role": "user", "content": [{"type": "image", "image": "x""' + IMAGE.encode() + b'"}]}]}',
        b'{"messages": [{"role": "user", "content": [{"type": "image", "image": "' + IMAGE.encode(),
        b'{"messages": [{"role": "user", "content": [{"type": "image", "image": "' + IMAGE.encode() + b'"}]',
    ],
    ids=["between-strings", "unterminated-string", "unclosed-object"],
)
def test_a_body_that_is_not_json_is_still_refused(raw):
    with pytest.raises(InvalidRequestError) as refused:
        parse_json_body(raw, DEPTH)
    assert refused.value.code == "invalid_json"


def test_parsing_builds_no_string_of_the_payload():
    payload = PAYLOAD * 40  # ~3.5 MB
    raw = body_with({"type": "image_url", "image_url": {"url": "data:image/png;base64," + payload}})
    tracemalloc.start()
    try:
        request = parse_request(raw, DEPTH)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(request.messages[0].content[0].image_url.url, InlineMedia)
    assert peak < len(payload) // 10, peak


# ---------------------------------------------------------------------------------------------- what is cut out
SHORT_IMAGE = "data:image/png;base64," + base64.b64encode(b"png" * 100).decode()


def cut_spans(raw: bytes) -> list[bytes]:
    """The payloads `cut` takes out of `raw`, checking that the cut body is `raw` with each one's placeholder."""
    cut, found = inline_media.cut(raw)
    rebuilt = cut
    for placeholder, media in found.items():
        assert media.body is raw
        rebuilt = rebuilt.replace(placeholder.encode(), media.header.encode() + raw[media.start : media.end], 1)
    assert rebuilt == raw
    return [raw[media.start : media.end] for media in found.values()]


def test_only_long_base64_strings_are_cut_out_wherever_they_follow_shorter_ones():
    raw = body_with(
        {"type": "image_url", "image_url": {"url": SHORT_IMAGE}},  # base64, but short
        {"type": "image_url", "image_url": {"url": "data:image/png," + PAYLOAD}},  # long, but not base64
        {"type": "text", "text": '"' + IMAGE},  # an escaped quote before a data: URL: inside a string
        {"type": "text", "text": IMAGE + "\\"},  # its closing quote follows a backslash: left to the parser
        {"type": "image_url", "image_url": {"url": IMAGE}},
        {"type": "input_audio", "input_audio": {"data": PAYLOAD}},
    )
    assert cut_spans(raw) == [PAYLOAD.encode(), PAYLOAD.encode()]


@pytest.mark.parametrize(("length", "cut"), [(inline_media.MIN_BYTES, True), (inline_media.MIN_BYTES - 1, False)])
def test_a_string_is_cut_out_from_min_bytes_on(length, cut):
    raw = body_with({"type": "input_audio", "input_audio": {"data": PAYLOAD[:length]}}, stop=[PAYLOAD])
    assert cut_spans(raw) == [PAYLOAD[:length].encode()] * cut + [PAYLOAD.encode()]


@pytest.mark.parametrize(
    ("before", "cut"),
    [(b"", True), (b"\\", False), (b"\\\\", True), (b"\\\\\\", False)],
    ids=["no-backslash", "escaped", "escaped-backslash", "escaped-backslash-and-quote"],
)
def test_a_quote_after_an_odd_run_of_backslashes_starts_nothing(before, cut):
    # not JSON when the run is even (the quote then closes a string): the parser refuses what is left
    payload = IMAGE.encode()
    raw = b'{"a": "x' + before + b'"' + payload + b'"}'
    assert cut_spans(raw) == [PAYLOAD.encode()] * cut
    assert cut_spans(before + b'"' + payload + b'"') == [PAYLOAD.encode()] * cut  # at the very start too


def test_a_backslash_just_before_the_closing_quote_is_the_only_one_that_counts():
    ends_with_an_escaped_backslash = PAYLOAD + "\\\\A"  # as JSON text: the string ends in a backslash and "A"
    raw = b'{"a": "' + ends_with_an_escaped_backslash.encode() + b'"}'
    assert cut_spans(raw) == [ends_with_an_escaped_backslash.encode()]


@pytest.mark.parametrize(
    "body",
    [
        {"messages": "hi"},
        {"messages": ["hi", {"content": "hi"}, {"content": {"image": IMAGE}}, {"content": ["text"]}]},
        {"messages": [{"content": [{"type": "image", "image": {"url": 1}}, {"image": IMAGE}]}]},
        {"messages": [], "extra_body": {"messages": 5}, "image": IMAGE},
    ],
    ids=["messages-a-string", "odd-messages", "a-reference-not-a-string", "odd-extra-body"],
)
def test_malformed_bodies_with_large_media_parse_as_they_are(body):
    """Whatever shape the client's JSON has, the validation that follows is what refuses it."""
    raw = json.dumps(body).encode()
    assert as_text(parse_json_body(raw, DEPTH)) == json.loads(raw)


@pytest.mark.parametrize("over", [0, 1], ids=["at-the-limit", "over-it"])
def test_plain_base64_is_decoded_straight_from_the_bodys_bytes(over):
    """Up to the limit, the decoded bytes are the only large allocation: no copy of the payload, no str of it."""
    media = parse_request(body_with({"type": "image", "image": IMAGE}), DEPTH).messages[0].content[0].image
    decoded = base64.b64decode(PAYLOAD)

    async def fetch_traced() -> tuple[bytes, int]:
        fetcher = MediaFetcher(MediaConfig())
        try:
            await fetcher.fetch(media, param="p")  # what a first run imports and starts is not counted
            tracemalloc.start()
            try:
                data = await fetcher.fetch(media, param="p", max_bytes=len(decoded) - over)
                return data, tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
        finally:
            await fetcher.aclose()

    if over:
        with pytest.raises(PayloadTooLargeError):
            asyncio.run(fetch_traced())
        return
    data, peak = asyncio.run(fetch_traced())
    assert data == decoded
    assert peak < len(decoded) * 1.2, peak
