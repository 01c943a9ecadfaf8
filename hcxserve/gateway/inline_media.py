"""Large inline media cut out of a request body before it is parsed, and kept as the body's bytes up to base64
decoding.

A JSON parser builds a Python str of every string it reads. For a 27-MB data: URL, msgspec does that in ~13 ms
while it holds the GIL (so the event loop waits too, whichever thread parses), allocates 27 MB more, and the str is
then sliced and decoded again. Instead, each JSON string of at least `MIN_BYTES` that starts like base64 (a
`data:...;base64,` URL, or bare base64 as `input_audio.data` takes it) is found with a regular expression and one
byte search (for its closing quote), replaced by a short placeholder, and the small rest is parsed. Each
placeholder found where the wire format puts a media reference becomes an `InlineMedia` over the body's bytes; the
fetcher decodes base64 straight from them (pybase64 releases the GIL).

The result is the request the whole body would have given: anything unexpected (a placeholder anywhere but a media
reference, a cut body that does not parse) and the caller parses the whole body as before; a payload whose bytes are
not plain base64 (JSON escapes such as `\\/`, whitespace, missing padding) is read as the JSON string it is, by the
fetcher, and decoded as any other. The search is linear in the body: no string is searched twice, and what a
candidate's header may hold stops at its closing quote.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from typing import Any

from hcxserve.gateway.fetch import MAX_DATA_URL_HEADER
from hcxserve.protocol.openai import InlineMedia

# shorter strings are parsed as they are: cutting pays off for megabytes, not for a thumbnail
MIN_BYTES = 64 << 10
_BACKSLASH = 0x5C
# a string that starts like a data: URL (its header up to the first comma, which the fetcher looks for within
# MAX_DATA_URL_HEADER characters) or like bare base64
_START = re.compile(rb'"(?:((?i:data:)[^",\\]{0,%d}),|(?=[A-Za-z0-9+/]{64}))' % (MAX_DATA_URL_HEADER - 6))
_URL_PARTS = ("image_url", "video_url", "audio_url")


def _escaped(raw: bytes, quote: int) -> bool:
    """Whether the quote at `quote` is escaped (an odd run of backslashes before it): then it is inside a string."""
    run = 0
    while quote - run > 0 and raw[quote - run - 1] == _BACKSLASH:
        run += 1
    return run % 2 == 1


def cut(raw: bytes) -> tuple[bytes, dict[str, InlineMedia]]:
    """The body with each long base64 string replaced by a placeholder (a random token: a client cannot write
    one), and the media by placeholder. No placeholder: the body as it was."""
    token = secrets.token_hex(8)
    found: dict[str, InlineMedia] = {}
    pieces, kept_from, search_from = [], 0, 0
    while (match := _START.search(raw, search_from)) is not None:
        quote, begin = match.start(), match.end()
        search_from = quote + 1
        if _escaped(raw, quote):
            continue
        end = raw.find(b'"', begin)
        if end < 0:
            break
        if raw[end - 1] == _BACKSLASH:
            continue  # that quote may be escaped: the string goes to the parser whole
        search_from = end + 1  # `end` closes the string: nothing inside it is searched again
        header = match.group(1)
        if end - begin < MIN_BYTES or (header is not None and not _is_base64_header(header)):
            continue
        placeholder = f"hcx-inline:{token}:{len(found)}"
        found[placeholder] = InlineMedia(header.decode("ascii") + "," if header else "", raw, begin, end)
        pieces += [raw[kept_from : quote + 1], placeholder.encode()]
        kept_from = end
    if not found:
        return raw, found
    pieces.append(raw[kept_from:])
    return b"".join(pieces), found


def _is_base64_header(header: bytes) -> bool:
    return header.isascii() and header.lower().endswith(b";base64")


def place(body: Any, found: dict[str, InlineMedia]) -> bool:
    """Put each placeholder's media where it stands in the parsed `body`; False when one stands anywhere but a
    media reference (the body must then be parsed whole)."""
    placed = 0
    for holder, key in _media_references(body):
        value = holder[key]
        media = found.get(value) if isinstance(value, str) else None
        if media is not None:
            holder[key] = media
            placed += 1
    return placed == len(found)


def _media_references(body: Any) -> Iterator[tuple[Any, Any]]:
    """(container, key) of every place the wire format puts a media reference: the URL of an `image_url`,
    `video_url` or `audio_url` part (or the bare string in its place), `image`, `video` (or each of its frames),
    `input_audio.data`; in `messages` and in a literal `extra_body`'s (which the request model merges in)."""
    if not isinstance(body, dict):
        return
    holders = [body, body["extra_body"]] if isinstance(body.get("extra_body"), dict) else [body]
    for holder in holders:
        messages = holder.get("messages")
        for message in messages if isinstance(messages, list) else ():
            content = message.get("content") if isinstance(message, dict) else None
            for part in content if isinstance(content, list) else ():
                if isinstance(part, dict):
                    yield from _part_references(part)


def _part_references(part: dict[str, Any]) -> Iterator[tuple[Any, Any]]:
    for name in _URL_PARTS:
        ref = part.get(name)
        if isinstance(ref, dict) and "url" in ref:
            yield ref, "url"
        elif ref is not None:
            yield part, name
    if "image" in part:
        yield part, "image"
    video = part.get("video")
    if isinstance(video, list):
        yield from ((video, index) for index in range(len(video)))
    elif video is not None:
        yield part, "video"
    audio = part.get("input_audio")
    if isinstance(audio, dict) and "data" in audio:
        yield audio, "data"
