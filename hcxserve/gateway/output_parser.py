"""What the Omni LLM writes besides text, recognised as it streams: one parser per request (vLLM's tool-parser
shape), fed each text delta, answering events.

The model's speech block (as OmniServe's decoder tests show it):

    <user_transcript>...</user_transcript>
    <assistant_transcript>Hello!</assistant_transcript>
    <audio_decoder_call>
    <speaker_info>{"is_ref_audio": true}</speaker_info>
    <discrete_audio>
    <|discrete_audio_start|><|audio1490|><|audio1950|>...<|discrete_audio_end|>
    </discrete_audio>
    </audio_decoder_call>

and its image block: `<|discrete_image_start|><|vision_ratio_4:3|><|vision123|>...<|discrete_image_end|>`. The
client gets the text (the assistant transcript's included, the user transcript dropped, the tags removed); speech
comes out as `SpeechStart` (with the speaker info), `SpeechUnits` as they arrive and `SpeechEnd`; an image as one
`ImageTokens` once its block closes. A unit's code is the number in its token (`<|audioN|>` is token `unit_0 + N`,
the same offset the input side uses). Markers split across deltas are held back until they are whole; text that
only looks like a marker's start (`<b`) is released with the next delta or at `finish()`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class SpeechStart:
    speaker: dict[str, Any] = field(default_factory=dict)  # the model's <speaker_info>, {} when it gave none


@dataclass(frozen=True)
class SpeechUnits:
    codes: list[int]


@dataclass(frozen=True)
class SpeechEnd:
    pass


@dataclass(frozen=True)
class ImageTokens:
    ratio: str | None  # "W:H" from <|vision_ratio_W:H|>, None when the block had none
    codes: list[int]
    complete: bool = True  # False: the output ended inside the block


Event = Text | SpeechStart | SpeechUnits | SpeechEnd | ImageTokens


class _State(Enum):
    TEXT = auto()
    USER_TRANSCRIPT = auto()  # dropped: the client's own words, transcribed
    AUDIO_CALL = auto()  # inside <audio_decoder_call>: layout only
    SPEAKER_INFO = auto()  # JSON, collected
    SPEECH = auto()  # units
    IMAGE = auto()  # image tokens


_MARKER = re.compile(
    r"<\|audio(?P<unit>\d+)\|>"
    r"|<\|vision(?P<vision>\d+)\|>"
    r"|<\|vision_ratio_(?P<ratio>\d+:\d+)\|>"
    r"|<\|(?P<special>discrete_audio_start|discrete_audio_end|discrete_image_start|discrete_image_end)\|>"
    r"|<(?P<close>/?)(?P<tag>user_transcript|assistant_transcript|audio_decoder_call|speaker_info|discrete_audio)>"
)
# the start of a marker that may still be completed by the next delta
_PARTIAL = re.compile(r"<(?:/?[a-z_]{0,24}|\|[a-z_]{0,24}\d*(?::\d*)?\|?)\Z")


class OmniOutputParser:
    """One request's output, delta by delta: `feed(text)` and, at the end, `finish()`, each returning events."""

    def __init__(self, *, trim_start: bool = True) -> None:
        self._pending = ""
        self._state = _State.TEXT
        self._speaker_json: list[str] = []
        self._speaker: dict[str, Any] = {}
        self._ratio: str | None = None
        self._image: list[int] = []
        self._in_call = False  # inside <audio_decoder_call>
        self._after_tag = trim_start  # whitespace laid out around the blocks is not text
        self.units = 0  # speech units seen so far
        self.transcript: list[str] = []  # the text the client got (OmniServe's `audio.transcript`)

    def feed(self, delta: str) -> list[Event]:
        self._pending += delta
        events: list[Event] = []
        units: list[int] = []
        while self._pending:
            start = self._pending.find("<")
            if start < 0:
                self._emit_text(self._pending, events)
                self._pending = ""
                break
            self._emit_text(self._pending[:start], events)
            self._pending = self._pending[start:]
            match = _MARKER.match(self._pending)
            if match is None:
                if _PARTIAL.match(self._pending):
                    break  # wait for the rest of the marker
                self._emit_text("<", events)
                self._pending = self._pending[1:]
                continue
            self._pending = self._pending[match.end() :]
            self._on_marker(match, events, units)
        self._flush_units(units, events)
        return events

    def finish(self) -> list[Event]:
        """The end of the output: held-back text is text after all; an open block is closed."""
        events: list[Event] = []
        pending, self._pending = self._pending, ""
        self._emit_text(pending, events)
        if self._state is _State.SPEECH:
            events.append(SpeechEnd())
        elif self._state is _State.IMAGE:
            events.append(ImageTokens(self._ratio, self._image, complete=False))
        self._state = _State.TEXT
        return events

    # ------------------------------------------------------------------------------------------ internals
    def _emit_text(self, text: str, events: list[Event]) -> None:
        if not text:
            return
        if self._state is _State.TEXT:
            if self._after_tag:
                text = text.lstrip()
                if not text:
                    return
                self._after_tag = False
            self.transcript.append(text)
            if events and isinstance(events[-1], Text):
                events[-1] = Text(events[-1].text + text)
            else:
                events.append(Text(text))
        elif self._state is _State.SPEAKER_INFO:
            self._speaker_json.append(text)
        # inside the user transcript, between units or image tokens: dropped (layout newlines, stray text)

    def _flush_units(self, units: list[int], events: list[Event]) -> None:
        if units:
            events.append(SpeechUnits(list(units)))
            units.clear()

    def _on_marker(self, match: re.Match, events: list[Event], units: list[int]) -> None:
        kind = match.lastgroup
        state = self._state
        if kind == "unit":
            if state is not _State.SPEECH:  # a run of units without its start marker (OmniServe's legacy form)
                self._start_speech(events)
            units.append(int(match["unit"]))
            self.units += 1
        elif kind == "vision" and state is _State.IMAGE:
            self._image.append(int(match["vision"]))
        elif kind == "ratio" and state is _State.IMAGE:
            self._ratio = match["ratio"]
        elif kind == "special":
            self._flush_units(units, events)
            self._on_special(match["special"], events)
        elif kind == "tag":
            self._flush_units(units, events)
            self._on_tag(match["tag"], closing=bool(match["close"]), events=events)
        # a vision token or ratio outside an image block: not an image, and not text either

    def _on_special(self, name: str, events: list[Event]) -> None:
        self._after_tag = True
        if name == "discrete_audio_start" and self._state is not _State.SPEECH:
            self._start_speech(events)
        elif name == "discrete_audio_end" and self._state is _State.SPEECH:
            events.append(SpeechEnd())
            self._state = self._outside()
        elif name == "discrete_image_start":
            if self._state is _State.SPEECH:
                events.append(SpeechEnd())
            self._state, self._ratio, self._image = _State.IMAGE, None, []
        elif name == "discrete_image_end" and self._state is _State.IMAGE:
            events.append(ImageTokens(self._ratio, self._image))
            self._state = self._outside()

    def _on_tag(self, tag: str, *, closing: bool, events: list[Event]) -> None:
        self._after_tag = True
        if tag == "user_transcript":
            self._state = _State.TEXT if closing else _State.USER_TRANSCRIPT
        elif tag == "speaker_info":
            if closing and self._state is _State.SPEAKER_INFO:
                self._speaker = _speaker_info("".join(self._speaker_json))
                self._state = self._outside()
            elif not closing:
                self._speaker_json, self._state = [], _State.SPEAKER_INFO
        elif tag in ("discrete_audio", "audio_decoder_call") and closing:
            if self._state is _State.SPEECH:
                events.append(SpeechEnd())  # the block closed without <|discrete_audio_end|>
            if tag == "audio_decoder_call":
                self._in_call = False
            self._state = self._outside()
        elif tag == "audio_decoder_call":
            self._in_call, self._state = True, _State.AUDIO_CALL
        # <assistant_transcript>, </assistant_transcript>, <discrete_audio>: layout only

    def _outside(self) -> _State:
        """Where a closed block returns to."""
        return _State.AUDIO_CALL if self._in_call else _State.TEXT

    def _start_speech(self, events: list[Event]) -> None:
        self._state = _State.SPEECH
        events.append(SpeechStart(dict(self._speaker)))


def _speaker_info(text: str) -> dict[str, Any]:
    """The model's speaker JSON; anything else (it is generated text) counts as no information."""
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
