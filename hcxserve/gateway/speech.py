"""Spoken answers (track B): asking the LLM for speech, and having the AudioDecoder speak what it wrote.

A request with `modalities: ["text", "audio"]` has the LLM held to its speech format (`hcxserve.llm.media_format`,
through `vllm_xargs`) with its special tokens kept in the text (the gateway, not the client, decides
`skip_special_tokens`). Whether asked or not, the units an answer holds are spoken (`SpokenAnswer`, one per choice,
fed by `hcxserve.gateway.answer_media`): in the voice `audio.voice` names, or, when the model's `<speaker_info>`
says `is_ref_audio` (or the request does), in the voice of the request's last input audio.

Streamed in pcm16, the speech leaves in parts as the units arrive: each part asks the decoder again with all units so
far and where the last part stopped (`SpeechRequest.start_sample`), so parts may go to any decoder replica, and the
first audio leaves long before the LLM has finished. Other formats are files, decoded whole at the end.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import zlib
from dataclasses import dataclass
from typing import Any

from hcxserve.config import AudioDecoderConfig
from hcxserve.gateway.components import ComponentCall, call_component
from hcxserve.protocol.errors import InvalidRequestError, UpstreamError
from hcxserve.protocol.openai import AudioDelta, AudioOutput, ChatCompletionRequest
from hcxserve.protocol.payloads import UNKNOWN_VOICE, SpeechAudio, SpeechRequest

logger = logging.getLogger(__name__)

AUDIO_LIFETIME_S = 3600  # `expires_at`, as OmniServe sets it
# of a spoken answer's tokens, the transcript may take this share (speech is ~25 units a second, words ~3)
TRANSCRIPT_SHARE = 0.1
MAX_TRANSCRIPT_TOKENS = 512
STREAM_FORMAT = "pcm16"  # the one format streamed in parts (OpenAI's too)
_MAX_TRANSCRIPT_BYTES = 1 << 20  # what an id may inflate to
_ALIGN = 6  # bytes: whole 16-bit samples and whole base64 quanta, so parts' base64 concatenates


def audio_id(transcript: str, expires_at: int) -> str:
    """A spoken answer's `audio.id`: what a later turn sends back in its place (`{"role": "assistant", "audio":
    {"id": ...}}`). It carries the transcript and the expiry itself, so any gateway worker or replica resolves it
    without shared state (a client could forge one, but it could as well send that text as content)."""
    packed = zlib.compress(json.dumps({"t": transcript, "e": expires_at}, ensure_ascii=False).encode(), 9)
    return "audio_" + base64.urlsafe_b64encode(packed).decode("ascii").rstrip("=")


def transcript_of(audio_id_: str, *, now: float, param: str) -> str:
    """The transcript an `audio.id` of ours stands for; a 400 naming `param` for any other id, or an expired one."""
    try:
        if not audio_id_.startswith("audio_"):
            raise ValueError
        packed = audio_id_[6:]
        inflate = zlib.decompressobj()
        text = inflate.decompress(base64.urlsafe_b64decode(packed + "=" * (-len(packed) % 4)), _MAX_TRANSCRIPT_BYTES)
        if inflate.unconsumed_tail or not inflate.eof:
            raise ValueError
        data = json.loads(text)
        transcript, expires_at = data["t"], data["e"]
        if not isinstance(transcript, str) or not isinstance(expires_at, int):
            raise ValueError
    except (ValueError, TypeError, KeyError, zlib.error):
        raise InvalidRequestError(f"{param}: not the id of a spoken answer of this server", param=param) from None
    if now > expires_at:
        raise InvalidRequestError(f"{param}: this spoken answer expired; send its transcript as content", param=param)
    return transcript


def check_speech_request(request: ChatCompletionRequest, decoder: AudioDecoderConfig | None, track: str) -> None:
    if decoder is None:
        raise InvalidRequestError(
            f"track {track.upper()} does not speak: `modalities` may only hold 'text'", param="modalities"
        )


def check_voice(voice: str | None, voices: list[str]) -> None:
    """A named voice must be one of the decoder's: refused before the LLM runs, not after."""
    if voice is not None and voice not in voices:
        known = ", ".join(voices) or "none: this decoder takes only a reference clip's voice"
        raise InvalidRequestError(f"audio.voice: unknown voice {voice!r} (known: {known})", param="audio.voice")


def ask_for_speech(body: dict[str, Any], decoder: AudioDecoderConfig) -> None:
    """Hold the LLM to its speech format within the request's token budget, keep the unit tokens in its text, and
    answer without a reasoning block (the format starts at the first token; a think block would hold the units)."""
    budget = body.get("max_tokens")
    text = (
        MAX_TRANSCRIPT_TOKENS if budget is None else max(1, min(MAX_TRANSCRIPT_TOKENS, int(budget * TRANSCRIPT_SHARE)))
    )
    units = decoder.max_units if budget is None else max(1, min(decoder.max_units, budget - text - 2))
    # `min_tokens` bounds the speech from below (vLLM's own would hold back the end of turn the format needs)
    least = min(units, max(1, body.pop("min_tokens", None) or 1))
    body["vllm_xargs"] = {
        "hcx_output": "speech", "hcx_min_units": least, "hcx_max_units": units, "hcx_max_text_tokens": text
    }  # fmt: skip
    hold_to_format(body)


def hold_to_format(body: dict[str, Any]) -> None:
    """What a media format asked of the LLM needs besides `vllm_xargs`: its special tokens in the text; no reasoning
    block (the format starts at the first token); and vLLM's tool parser off (`tool_choice: "none"` keeps the tools
    in the prompt), which would take the media tokens of a stream for the start of a tool call."""
    body["skip_special_tokens"] = False
    body["chat_template_kwargs"] = {**body.get("chat_template_kwargs", {}), "thinking": False, "skip_reasoning": True}
    if body.get("tools"):
        body["tool_choice"] = "none"
    else:
        body.pop("tool_choice", None)


@dataclass(frozen=True)
class SpeechOptions:
    """A request's choices about its spoken answers."""

    voice: str | None
    format: str
    streamed: bool
    reference: bytes | None  # the last input audio, for a cloned voice
    clone: bool  # the request asks for the reference's voice whatever the model says

    @classmethod
    def of(cls, request: ChatCompletionRequest, reference: bytes | None) -> SpeechOptions:
        options = request.audio
        return cls(
            voice=options.voice if options else None,
            format=options.format if options else "wav",
            streamed=request.stream,
            reference=reference,
            clone=bool(request.is_ref_audio),
        )


class SpokenAnswer:
    """One choice's speech: units in (`add`), audio out, either in parts while the units arrive (a pcm16 stream) or
    as one file once they have all come (`end`). At most one decoder call is in flight (`task`); `collect()` takes
    its result and starts the next call if there is one to make."""

    def __init__(self, call: ComponentCall, cfg: AudioDecoderConfig, options: SpeechOptions, transcript: str) -> None:
        """`transcript`: what the model said before it began to speak (the model's format puts it first)."""
        self.call, self.cfg, self.options = call, cfg, options
        self.expires_at = int(time.time()) + AUDIO_LIFETIME_S
        self.id = audio_id(transcript, self.expires_at)
        self.incremental = options.streamed and options.format == STREAM_FORMAT
        self.units: list[int] = []
        self.speaker: dict[str, Any] = {}
        self.task: asyncio.Future | None = None
        self.ended = self.done = False
        self.data = bytearray()  # what came back (all of it, unless streamed in parts)
        self.samples = 0
        self._asked = 0  # units the last call had
        self._final = False  # the call in flight is the last one
        self._carry = b""  # bytes held back so that every part is a whole number of base64 quanta
        self._speaker: list[float] | None = None  # a cloned voice's vector, from the first part's answer
        self._id_sent = False

    # ------------------------------------------------------------------------------------------ feeding
    def start(self, speaker: dict[str, Any]) -> None:
        self.speaker = speaker

    def add(self, codes: list[int]) -> None:
        room = self.cfg.max_units - len(self.units)
        if len(codes) > room:
            logger.warning("the model spoke more than %d units; the rest is not spoken", self.cfg.max_units)
        self.units.extend(codes[: max(room, 0)])
        self._poll()

    def end(self) -> None:
        """No more units will come."""
        self.ended = True
        if self.task is None:
            self._next()

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()

    # ------------------------------------------------------------------------------------------ results
    def collect(self) -> AudioDelta | None:
        """The finished call's audio as a stream delta (None when it brought no whole base64 quantum), and the next
        call started."""
        (result,) = self.task.result()
        self.task = None
        data = self._checked(result)
        self._speaker = self._speaker or result.speaker
        self.samples += result.samples
        if self._final:
            self.done = True
        self._next()
        if not self.options.streamed:
            self.data += data
            return None
        data, self._carry = self._carry + data, b""
        if not self.done:
            cut = len(data) - len(data) % _ALIGN
            data, self._carry = data[:cut], data[cut:]
        if not data and self._id_sent:
            return None
        delta = AudioDelta(id=None if self._id_sent else self.id, data=base64.b64encode(data).decode("ascii"))
        self._id_sent = True
        return delta

    def closing(self, transcript: str) -> AudioDelta:
        """The stream's last audio delta: what was said and until when it can be referred to."""
        return AudioDelta(id=None if self._id_sent else self.id, transcript=transcript, expires_at=self.expires_at)

    def output(self, transcript: str, data: str | None = None) -> AudioOutput:
        """OpenAI's `message.audio` (`data`: the file, base64, unless the caller gives another form)."""
        return AudioOutput(
            id=self.id,
            data=data if data is not None else base64.b64encode(bytes(self.data)).decode("ascii"),
            expires_at=self.expires_at,
            transcript=transcript,
        )

    # ------------------------------------------------------------------------------------------ internals
    def _poll(self) -> None:
        """In a stream, a part is asked for once enough new units have come (fewer for the first part)."""
        if not self.incremental or self.task is not None or self.ended:
            return
        wanted = self.cfg.stream_units if self._asked else self.cfg.stream_first_units
        if len(self.units) - self._asked >= wanted:
            self._ask(final=False)

    def _next(self) -> None:
        if self.done:
            return
        if self.ended:
            if self.units:
                self._ask(final=True)
            else:
                self.done = True  # nothing was said
        else:
            self._poll()

    def _ask(self, *, final: bool) -> None:
        options = self.options
        clone = options.reference is not None and (options.clone or bool(self.speaker.get("is_ref_audio")))
        request = SpeechRequest(
            units=list(self.units),
            voice=None if clone else options.voice,
            reference=options.reference if clone and self._speaker is None else None,
            speaker=self._speaker if clone else None,
            format=STREAM_FORMAT if self.incremental else options.format,
            start_sample=self.samples,
            final=final,
        )
        self._asked, self._final = len(self.units), final
        self.task = asyncio.ensure_future(
            call_component(self.call, "audio_decoder", "decode", [request], label="audio decoder")
        )

    @staticmethod
    def _checked(result: SpeechAudio) -> bytes:
        if result.data is None:
            if result.status == UNKNOWN_VOICE:
                raise InvalidRequestError(f"audio.voice: {result.error}", param="audio.voice")
            logger.warning("the audio decoder refused the model's units: %s", result.error)
            raise UpstreamError("The audio decoder could not speak the model's answer.")
        return result.data
