"""What a track B answer carries besides text, decoded as it is written: one `AnswerMedia` per request.

Each choice's output goes through its own `OmniOutputParser`; the text goes on to the client, speech units to a
`SpokenAnswer` and image blocks to `DrawnImages`, which call the track's decoders while the LLM goes on writing.
`complete()` does this for a whole response; `stream()` for a stream, merging what the LLM sends with what the
decoders give back as each arrives: text deltas as they come, speech as `delta.audio` parts, an image as one
`delta.images` chunk (and the tool-call delta) once drawn, and a choice's `finish_reason` only after its media.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import uuid
from asyncio import FIRST_COMPLETED
from collections.abc import AsyncIterator, Callable
from typing import Any

from hcxserve.config import AudioDecoderConfig, VisionDecoderConfig
from hcxserve.gateway.components import ComponentCall
from hcxserve.gateway.images import DrawnImages
from hcxserve.gateway.output_parser import ImageTokens, OmniOutputParser, SpeechEnd, SpeechStart, SpeechUnits, Text
from hcxserve.gateway.responses import build_chunk
from hcxserve.gateway.speech import SpeechOptions, SpokenAnswer
from hcxserve.gateway.storage import MediaStore
from hcxserve.protocol.openai import (
    IMAGE_TOOL,
    AudioDelta,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChunkChoice,
    DeltaMessage,
    FunctionCall,
    ImageOutput,
    ToolCall,
)

_SPEECH_TYPES = {
    "wav": "audio/wav",
    "flac": "audio/flac",
    "ogg": "audio/ogg",
    "mp3": "audio/mpeg",
    "pcm16": "audio/pcm",
}


class _ChoiceMedia:
    """One choice: its parser, and the speech and images found in it so far."""

    def __init__(self, make_speech: Callable[[str], SpokenAnswer] | None, make_images: Callable[[], DrawnImages] | None,
                 *, asked: bool) -> None:  # fmt: skip
        self.parser = OmniOutputParser(trim_start=asked)
        self.make_speech, self.make_images = make_speech, make_images
        self.speech: SpokenAnswer | None = None
        self.images: DrawnImages | None = None
        self.finish_reason: str | None = None
        self.ended = self.closed = False
        # a stream's image-tool calls the model made itself, by their index among the choice's tool calls: held
        # back (their arguments are image tokens) until the choice ends, then drawn
        self.image_calls: dict[int, ToolCall] = {}
        self.call_index: dict[str, int] = {}
        self.undrawn_calls: list[dict[str, Any]] = []  # held calls that hold no image: passed on as written

    def feed(self, text: str) -> str:
        return self._dispatch(self.parser.feed(text))

    def hold_tool_calls(self, deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The streamed tool-call deltas to pass on now: all but the image tool's (see `end`)."""
        if self.make_images is None:
            return deltas
        passed = []
        for delta in deltas:
            index, function = delta.get("index", 0), delta.get("function") or {}
            if function.get("name") == IMAGE_TOOL and index not in self.image_calls:
                call_id = delta.get("id") or f"call_{uuid.uuid4().hex[:24]}"
                self.image_calls[index] = ToolCall(id=call_id, function=FunctionCall(name=IMAGE_TOOL, arguments=""))
            if index in self.image_calls:
                self.image_calls[index].function.arguments += function.get("arguments") or ""
            else:
                passed.append(delta)
        return passed

    def end(self, finish_reason: str | None) -> str:
        """The LLM is done with this choice: the rest of its text. Held image-tool calls are drawn; their delta
        comes with the image, named by its URL."""
        for index, call in self.image_calls.items():
            self.images = self.images or self.make_images()
            if self.images.add_tool_call(call):
                self.call_index[call.id] = index
            else:
                self.undrawn_calls.append({"index": index, **call.model_dump()})
        self.image_calls.clear()
        text = self._dispatch(self.parser.finish())
        self.finish_reason, self.ended = finish_reason, True
        if self.speech is not None:
            self.speech.end()
        return text

    def work(self) -> dict[asyncio.Future, Callable[[asyncio.Future], Any]]:
        """The decoder calls in flight, with what collects each."""
        work: dict[asyncio.Future, Callable[[asyncio.Future], Any]] = {}
        if self.speech is not None and self.speech.task is not None:
            work[self.speech.task] = lambda _: self.speech.collect()
        if self.images is not None:
            work.update(dict.fromkeys(self.images.tasks, self._collect_image))
        return work

    def _collect_image(self, task: asyncio.Future) -> tuple[ImageOutput, dict[str, Any] | None]:
        """A drawn image, and the tool-call delta that goes with it (its index: the model's own call's, else the
        image's)."""
        image, call = self.images.collect(task)
        if call is None:
            return image, None
        return image, {"index": self.call_index.get(call.id, image.index), **call.model_dump()}

    @property
    def done(self) -> bool:
        return self.ended and not self.work()

    @property
    def transcript(self) -> str:
        return "".join(self.parser.transcript).strip()

    def cancel(self) -> None:
        for task in self.work():
            task.cancel()

    def _dispatch(self, events: list) -> str:
        text = []
        for event in events:
            if isinstance(event, Text):
                text.append(event.text)
            elif isinstance(event, (SpeechStart, SpeechUnits)) and self.make_speech is not None:
                if self.speech is None:
                    self.speech = self.make_speech(self.transcript)
                if isinstance(event, SpeechStart):
                    self.speech.start(event.speaker)
                else:
                    self.speech.add(event.codes)
            elif isinstance(event, SpeechEnd) and self.speech is not None:
                self.speech.end()
            elif isinstance(event, ImageTokens) and self.make_images is not None:
                if self.images is None:
                    self.images = self.make_images()
                self.images.add(event)
        return "".join(text)


class AnswerMedia:
    def __init__(
        self,
        request: ChatCompletionRequest,
        call: ComponentCall,
        store: MediaStore,
        *,
        audio_decoder: AudioDecoderConfig | None,
        vision_decoder: VisionDecoderConfig | None,
        reference: bytes | None = None,
        audio_as_url: bool = False,
    ) -> None:
        self.request, self.call, self.store, self.audio_as_url = request, call, store, audio_as_url
        self.audio_decoder, self.vision_decoder = audio_decoder, vision_decoder
        self.speech_options = SpeechOptions.of(request, reference)
        self.asked = request.wants_speech() or request.wants_image()
        self.choices: dict[int, _ChoiceMedia] = {}

    def _choice(self, index: int) -> _ChoiceMedia:
        if index not in self.choices:
            make_speech = make_images = None
            if self.audio_decoder is not None:
                make_speech = lambda transcript: SpokenAnswer(  # noqa: E731
                    self.call, self.audio_decoder, self.speech_options, transcript
                )
            if self.vision_decoder is not None:
                make_images = lambda: DrawnImages(self.call, self.store, self.request)  # noqa: E731
            self.choices[index] = _ChoiceMedia(make_speech, make_images, asked=self.asked)
        return self.choices[index]

    # ------------------------------------------------------------------------------------------ whole responses
    async def complete(self, response: ChatCompletionResponse) -> ChatCompletionResponse:
        """Every choice's text without the media tokens, its speech as `message.audio`, its images as
        `message.images` (and tool calls when the request declared the image tool)."""
        for choice in response.choices:
            media = self._choice(choice.index)
            for call in choice.message.tool_calls:
                if call.function.name == IMAGE_TOOL and media.make_images is not None:
                    media.images = media.images or media.make_images()
                    media.images.add_tool_call(call)
            text = media.feed(choice.message.content or "")
            text += media.end(choice.finish_reason)
            if media.speech is not None or media.images is not None:
                text = text.strip()
            if choice.message.content is not None:
                choice.message.content = text
        try:
            while work := {task: collect for media in self.choices.values() for task, collect in media.work().items()}:
                done, _ = await asyncio.wait(work, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    work[task](task)
        finally:
            self._cancel()
        for choice in response.choices:
            media = self.choices[choice.index]
            if media.speech is not None and media.speech.done and media.speech.samples:
                choice.message.audio = media.speech.output(media.transcript, await self._audio_data(media.speech))
            if media.images is not None and media.images.images:
                choice.message.images = sorted(media.images.images, key=lambda image: image.index)
                if media.images.tool_calls:
                    choice.message.tool_calls += media.images.tool_calls
                    choice.finish_reason = "tool_calls"
        return response

    async def _audio_data(self, speech: SpokenAnswer) -> str | None:
        """OmniServe's form on request of the deployment: `data` (and `id`) the URL-safe base64 of the file's URL."""
        if not self.audio_as_url:
            return None
        fmt = self.speech_options.format
        stored = await self.store.put(bytes(speech.data), content_type=_SPEECH_TYPES[fmt], suffix=f".{fmt}")
        speech.id = base64.urlsafe_b64encode(stored.url.encode()).decode("ascii")
        return speech.id

    # ------------------------------------------------------------------------------------------ streams
    async def stream(
        self, first: dict[str, Any] | None, upstream: AsyncIterator[dict[str, Any]], model: str
    ) -> AsyncIterator[ChatCompletionChunk]:
        """The client's chunks, from the LLM's (`first` already read) and the decoders' results."""
        template: ChatCompletionChunk | None = None
        usage: ChatCompletionChunk | None = None
        reading: asyncio.Future | None = None
        event, llm_done = first, first is None
        try:
            while True:
                if event is not None:
                    chunk = build_chunk(event, model)
                    template = template or chunk
                    if chunk.choices or chunk.usage is None:
                        for out in self._from_llm(chunk):
                            yield out
                    else:
                        usage = chunk  # the usage chunk goes last, after every choice's media
                if llm_done:
                    for index, media in self.choices.items():
                        if not media.ended:
                            text = media.end(media.finish_reason)
                            if text or media.undrawn_calls:
                                delta = DeltaMessage(content=text or None, tool_calls=media.undrawn_calls or None)
                                yield _chunk(template, index, delta)
                if template is not None:
                    for out in self._closings(template):
                        yield out
                if not llm_done and reading is None:
                    reading = asyncio.ensure_future(anext(upstream, None))
                work = {task: (index, collect) for index, media in self.choices.items()
                        for task, collect in media.work().items()}  # fmt: skip
                if reading is None and not work:
                    break
                done, _ = await asyncio.wait({*work, *([reading] if reading else [])}, return_when=FIRST_COMPLETED)
                event = None
                if reading in done:
                    event, reading = reading.result(), None
                    llm_done = event is None
                for task in done - {reading}:
                    if task in work:
                        index, collect = work[task]
                        for delta in _deltas(collect(task)):
                            yield _chunk(template, index, delta)
            if usage is not None:
                yield usage
        finally:
            if reading is not None:
                reading.cancel()
            self._cancel()
            with contextlib.suppress(Exception):
                await upstream.aclose()

    def _from_llm(self, chunk: ChatCompletionChunk) -> list[ChatCompletionChunk]:
        """The LLM's chunk with each choice's text in place of what it wrote; a choice that holds media gets its
        `finish_reason` later, after them (`_closings`)."""
        choices = []
        for choice in chunk.choices:
            media = self._choice(choice.index)
            delta, finish = choice.delta, choice.finish_reason
            text = None if delta.content is None else media.feed(delta.content)
            calls = delta.tool_calls
            if calls:
                calls = media.hold_tool_calls(calls) or None  # all held: none to send now
            if finish is not None:
                text = (text or "") + media.end(finish)
                calls = (calls or []) + media.undrawn_calls or None
                if media.speech is None and media.images is None:
                    media.closed = True
                else:
                    finish = None
            held = finish is None and choice.finish_reason is not None
            out = delta.model_copy(update={"content": text, "tool_calls": calls})
            if (
                (delta.content or delta.tool_calls or held)
                and not text
                and finish is None
                and not out.model_dump(exclude_none=True).keys() - {"content"}
            ):
                continue  # only media tokens, or an empty end whose finish comes after the media
            choices.append(choice.model_copy(update={"delta": out, "finish_reason": finish}))
        if not choices and chunk.choices:
            return []
        return [chunk.model_copy(update={"choices": choices})]

    def _closings(self, template: ChatCompletionChunk) -> list[ChatCompletionChunk]:
        """For each choice whose LLM output and media are all done: the audio's transcript, then its finish."""
        out = []
        for index, media in self.choices.items():
            if not media.done or media.closed:
                continue
            media.closed = True
            if media.speech is not None and media.speech.samples:
                out.append(_chunk(template, index, DeltaMessage(audio=media.speech.closing(media.transcript))))
            finish = "tool_calls" if media.images is not None and media.images.tool_calls else media.finish_reason
            out.append(_chunk(template, index, DeltaMessage(), finish_reason=finish))
        return out

    def _cancel(self) -> None:
        for media in self.choices.values():
            media.cancel()


def _deltas(result: Any) -> list[DeltaMessage]:
    """What a finished decoder call adds to the stream: an audio part, or an image (and its tool call)."""
    if result is None:
        return []
    if isinstance(result, AudioDelta):
        return [DeltaMessage(audio=result)]
    image, call = result
    return [DeltaMessage(images=[image], tool_calls=None if call is None else [call])]


def _chunk(template: ChatCompletionChunk, index: int, delta: DeltaMessage, finish_reason: str | None = None):
    return ChatCompletionChunk(
        id=template.id,
        created=template.created,
        model=template.model,
        choices=[ChunkChoice(index=index, delta=delta, finish_reason=finish_reason)],
    )
