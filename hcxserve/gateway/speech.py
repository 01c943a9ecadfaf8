"""Spoken answers (track B, non-streamed): asking the LLM for speech, and turning what it wrote into OpenAI's
`message.audio`.

A request with `modalities: ["text", "audio"]` has the LLM held to its speech format (`hcxserve.llm.media_format`,
through `vllm_xargs`) with its special tokens kept in the text (the gateway, not the client, decides
`skip_special_tokens`); each choice's output is parsed (`hcxserve.gateway.output_parser`): the transcript becomes
`content` and `audio.transcript`, the units go to the AudioDecoder in one batched call, and the file it returns (in
`audio.format`, in `audio.voice`) becomes `audio.data`, base64.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

from hcxserve.config import AudioDecoderConfig
from hcxserve.gateway.components import ComponentCall, call_component
from hcxserve.gateway.output_parser import OmniOutputParser, SpeechUnits, Text
from hcxserve.protocol.errors import InvalidRequestError, UpstreamError
from hcxserve.protocol.openai import AudioOutput, ChatCompletionRequest, ChatCompletionResponse
from hcxserve.protocol.payloads import UNKNOWN_VOICE, SpeechRequest

AUDIO_LIFETIME_S = 3600  # `expires_at`, as OmniServe sets it


def check_speech_request(request: ChatCompletionRequest, decoder: AudioDecoderConfig | None, track: str) -> None:
    if decoder is None:
        raise InvalidRequestError(
            f"track {track.upper()} does not speak: `modalities` may only hold 'text'", param="modalities"
        )
    if request.stream:
        raise InvalidRequestError("spoken answers are not streamed yet: send `stream: false`", param="stream")


# of a spoken answer's tokens, the transcript may take this share (speech is ~25 units a second, words ~3)
TRANSCRIPT_SHARE = 0.1
MAX_TRANSCRIPT_TOKENS = 512


def ask_for_speech(body: dict[str, Any], decoder: AudioDecoderConfig) -> None:
    """Hold the LLM to its speech format within the request's token budget, keep the unit tokens in its text, and
    answer without a reasoning block (the format starts at the first token; a think block would hold the units)."""
    budget = body.get("max_tokens")
    text = (
        MAX_TRANSCRIPT_TOKENS if budget is None else max(1, min(MAX_TRANSCRIPT_TOKENS, int(budget * TRANSCRIPT_SHARE)))
    )
    units = decoder.max_units if budget is None else max(1, min(decoder.max_units, budget - text - 2))
    body["skip_special_tokens"] = False
    body["vllm_xargs"] = {"hcx_output": "speech", "hcx_max_units": units, "hcx_max_text_tokens": text}
    body["chat_template_kwargs"] = {**body.get("chat_template_kwargs", {}), "thinking": False, "skip_reasoning": True}


async def attach_speech(
    response: ChatCompletionResponse, request: ChatCompletionRequest, call: ComponentCall
) -> ChatCompletionResponse:
    """Every choice's transcript as its content, and its units spoken as `message.audio`."""
    options = request.audio
    voice, fmt = (options.voice, options.format) if options else (None, "wav")
    spoken, requests = [], []
    for choice in response.choices:
        parser = OmniOutputParser()
        events = parser.feed(choice.message.content or "") + parser.finish()
        transcript = "".join(e.text for e in events if isinstance(e, Text)).strip()
        units = [code for e in events if isinstance(e, SpeechUnits) for code in e.codes]
        choice.message.content = transcript
        if units:
            spoken.append((choice, transcript))
            requests.append(SpeechRequest(units=units, voice=voice, format=fmt))
    if not requests:
        return response
    results = await call_component(call, "audio_decoder", "decode", requests, label="audio decoder")
    expires_at = int(time.time()) + AUDIO_LIFETIME_S
    for (choice, transcript), result in zip(spoken, results, strict=True):
        if result.data is None:
            if result.status == UNKNOWN_VOICE:
                raise InvalidRequestError(f"audio.voice: {result.error}", param="audio.voice")
            raise UpstreamError("The audio decoder could not speak the model's answer.")
        data = base64.b64encode(result.data).decode("ascii")
        choice.message.audio = AudioOutput(
            id=f"audio_{uuid.uuid4().hex}", data=data, expires_at=expires_at, transcript=transcript
        )
    return response
