"""Generated images (track B): asking the LLM for one, and having the VisionDecoder draw what it wrote.

A `tool_choice` naming `t2i_model_generation` asks for an image: the LLM is held to its image format (a ratio token
and exactly 729 codes, `hcxserve.llm.media_format`) instead of vLLM's tool-call decoding. Whether asked or not, each
complete image block of an answer is drawn (`DrawnImages`, one per choice, fed by `hcxserve.gateway.answer_media`)
and comes back as `message.images` / `delta.images` (OpenRouter's and LiteLLM's form) and, when the request declared
the tool, as OmniServe's tool call `t2i_model_generation({"discrete_image_token": <url>})`. The URL is the media
store's (a presigned S3 URL, or a `data:` URL).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

from hcxserve.config import VisionDecoderConfig
from hcxserve.gateway.components import ComponentCall, call_component
from hcxserve.gateway.output_parser import ImageTokens, OmniOutputParser
from hcxserve.gateway.speech import hold_to_format
from hcxserve.gateway.storage import MediaStore
from hcxserve.protocol.errors import InvalidRequestError, UpstreamError
from hcxserve.protocol.openai import IMAGE_TOOL, ChatCompletionRequest, FunctionCall, ImageOutput, ImageURL, ToolCall
from hcxserve.protocol.payloads import GeneratedImage, ImageRequest

logger = logging.getLogger(__name__)

IMAGE_CODES = 729  # what the decoder draws from; a longer block's extra codes are not used (as in OmniServe)


def check_image_request(request: ChatCompletionRequest, decoder: VisionDecoderConfig | None, track: str) -> None:
    if decoder is None:
        raise InvalidRequestError(f"track {track.upper()} does not draw images", param="tool_choice")
    if request.wants_speech():
        raise InvalidRequestError("ask for speech or for an image, not both in one answer", param="tool_choice")
    steps = request.image.steps if request.image else None
    if steps is not None and steps > decoder.max_steps:
        raise InvalidRequestError(f"image.steps: at most {decoder.max_steps}, not {steps}", param="image.steps")


def ask_for_image(body: dict[str, Any]) -> None:
    """Hold the LLM to its image format, in place of vLLM's guided decoding of the named tool's arguments."""
    body["vllm_xargs"] = {"hcx_output": "image"}
    hold_to_format(body)


class DrawnImages:
    """One choice's images: each complete block the model wrote is drawn as it closes (`add`), stored, and comes
    back from `collect()` once ready."""

    def __init__(
        self, call: ComponentCall, store: MediaStore, request: ChatCompletionRequest, *, first_index: int = 0
    ) -> None:
        self.call, self.store = call, store
        options = request.image
        self.steps = options.steps if options else None
        self.guidance_scale = options.guidance_scale if options else None
        self.seed = options.seed if options and options.seed is not None else request.seed
        self.as_tool_call = request.declares_image_tool()
        self.tasks: dict[asyncio.Future, tuple[int, ToolCall | None]] = {}  # drawing -> image index, model's call
        self.images: list[ImageOutput] = []
        self.tool_calls: list[ToolCall] = []
        self._count = first_index

    def add(self, block: ImageTokens, *, call: ToolCall | None = None) -> bool:
        """Draw a block (False: it is incomplete, and is not); `call`: the model's own tool call that holds it, whose
        arguments become the image's URL."""
        if not block.complete or block.ratio is None or not block.codes:
            logger.warning("the model's image block is incomplete (%d codes); it is not drawn", len(block.codes))
            return False
        request = ImageRequest(
            ratio=block.ratio,
            codes=block.codes[:IMAGE_CODES],
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            seed=self.seed,
        )
        self.tasks[asyncio.ensure_future(self._draw(request))] = (self._count, call)
        self._count += 1
        return True

    def add_tool_call(self, call: ToolCall) -> bool:
        """The model called the image tool itself (vLLM's tool parser made the call): draw the block its
        `discrete_image_token` holds, as OmniServe does. False when it holds none (the call is left as written)."""
        try:
            tokens = json.loads(call.function.arguments)["discrete_image_token"]
        except (ValueError, TypeError, KeyError):
            return False  # not the form the tool takes
        parser = OmniOutputParser()
        for event in [*parser.feed(str(tokens)), *parser.finish()]:
            if isinstance(event, ImageTokens):
                return self.add(event, call=call)
        return False

    def collect(self, task: asyncio.Future) -> tuple[ImageOutput, ToolCall | None]:
        index, call = self.tasks.pop(task)
        image = ImageOutput(index=index, image_url=ImageURL(url=task.result()))
        self.images.append(image)
        arguments = json.dumps({"discrete_image_token": image.image_url.url})
        if call is not None:  # the model's own call: its arguments now name the image
            call.function.arguments = arguments
        elif self.as_tool_call:
            call = ToolCall(
                id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=IMAGE_TOOL, arguments=arguments)
            )
            self.tool_calls.append(call)
        return image, call

    def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()

    async def _draw(self, request: ImageRequest) -> str:
        (result,) = await call_component(self.call, "vision_decoder", "generate", [request], label="vision decoder")
        png = _checked(result)
        stored = await self.store.put(png, content_type="image/png", suffix=".png")
        return stored.url


def _checked(result: GeneratedImage) -> bytes:
    if result.png is None:
        logger.warning("the vision decoder refused the model's image: %s", result.error)
        raise UpstreamError("The vision decoder could not draw the model's image.")
    return result.png
