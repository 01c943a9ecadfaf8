# ruff: noqa: E501 - the checks' requests stay verbatim, a few long lines
"""OmniServe's acceptance script (`scripts/check_server.sh`, ../shared/reference/omniserve-api.md §6), replayed
against the served bento: its ten requests as it sends them (JSON over HTTP, `extra_body` literally, track routes),
with its media served from loopback instead of the internet, its retries, and its pass criteria made stricter (the
generated media must be fetchable and decodable, not just present).

The embedded LLM never chooses to draw or speak, so checks 6, 7, 9 and 10 also ask for the medium explicitly
(`tool_choice` naming the image tool; `modalities`), which a real Omni model does not need.
"""

from __future__ import annotations

import base64
import functools
import http.server
import io
import json
import threading

import httpx
import pytest

from tests.conftest import make_audio, make_photo, make_video
from tests.e2e.helpers import MODELS, drawn

pytestmark = pytest.mark.e2e

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
SKIP_REASONING = {"chat_template_kwargs": {"skip_reasoning": True}}
IMAGE_TOOL = {
    "type": "function",
    "function": {
        "name": "t2i_model_generation",
        "description": "Generates an RGB image based on the provided discrete image representation.",
        "parameters": {
            "type": "object",
            "required": ["discrete_image_token"],
            "properties": {
                "discrete_image_token": {
                    "type": "string",
                    "description": "A serialized string of discrete vision tokens, encapsulated by special tokens. "
                    "The format must be strictly followed: <|discrete_image_start|><|vision_ratio_4:3|>"
                    "<|vision_token|><|visionaaaaa|><|visionbbbbb|>... <|visionzzzzz|><|vision_eol|><|vision_eof|>"
                    "<|discrete_image_end|>.",
                    "minLength": 1,
                }
            },
        },
    },
}
# on the embedded default only: ask for the medium the real model would choose to produce
DRAW = {"tool_choice": {"type": "function", "function": {"name": "t2i_model_generation"}}}
SPEAK = {"modalities": ["text", "audio"]}


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """OmniServe's media, under its file names, on a loopback HTTP server."""
    from PIL import Image

    root = tmp_path_factory.mktemp("omniserve-media")

    jpeg = io.BytesIO()
    Image.open(io.BytesIO(make_photo())).convert("RGB").save(jpeg, format="JPEG")
    (root / "img_5terre.jpg").write_bytes(jpeg.getvalue())
    (root / "sample-3s.mp3").write_bytes(make_audio(3.0, fmt="MP3", freq=330.0))
    (root / "sample-5s.mp4").write_bytes(make_video(seconds=5, fps=10))
    (root / "translate_tts").write_bytes(make_audio(1.5, fmt="MP3", freq=520.0))  # a TTS answer: mp3 by its bytes
    handler = functools.partial(_Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def checks(web: str) -> list[tuple[str, str, dict, int, str]]:
    """(name, route, body, attempts, pass criterion) of each check, as check_server.sh sends them."""
    image = {"type": "image_url", "image_url": {"url": f"{web}/img_5terre.jpg"}}
    math = "다음 수학 문제를 풀어주세요: 3x + 7 = 22일 때, x의 값은?"
    audio_url = base64.b64encode(f"{web}/sample-3s.mp3".encode()).decode()  # `echo -n URL | base64`
    tts = f"{web}/translate_tts?ie=UTF-8&client=tw-ob&tl=ko&q=%EC%98%A4%EB%8A%98%20%EB%82%A0%EC%94%A8"
    draw_system = ("You are an AI assistant that generates images. When asked to draw or create an image, you MUST use "
                   "the t2i_model_generation tool to generate the image. Always respond by calling the tool.")  # fmt: skip
    edit_system = ("You are an AI assistant that transforms images. When asked to transform, edit, or stylize an "
                   "image, you MUST use the t2i_model_generation tool to generate the new image. Always respond by "
                   "calling the tool.")  # fmt: skip
    return [
        ("1 Track A - Image Input", "a", {
            "messages": [SYSTEM, {"role": "user", "content": [image, {"type": "text", "text": "이 사진에 무엇이 있나요? 한국어로 간단히 설명해주세요."}]}],
            "max_tokens": 512, "temperature": 0.7, "extra_body": {"chat_template_kwargs": {"thinking": False}}}, 5, "content"),
        ("2 Track A - Non-Reasoning", "a", {
            "messages": [SYSTEM, {"role": "user", "content": math}],
            "max_tokens": 512, "temperature": 0.7, "extra_body": {"chat_template_kwargs": {"thinking": False}}}, 5, "content"),
        ("3 Track A - Reasoning", "a", {
            "messages": [SYSTEM, {"role": "user", "content": math}], "max_tokens": 1024, "temperature": 0.7,
            "extra_body": {"thinking_token_budget": 50, "chat_template_kwargs": {"thinking": True}}}, 5, "content"),
        ("4 Track B - Audio Input", "b", {
            "messages": [SYSTEM, {"role": "user", "content": [
                {"type": "input_audio", "input_audio": {"data": audio_url, "format": "mp3"}},
                {"type": "text", "text": "이 오디오에서 무슨 말을 하나요?"}]}],
            "max_tokens": 256, "temperature": 0.5, **SKIP_REASONING}, 5, "content"),
        ("5 Track B - Image Input", "b", {
            "messages": [SYSTEM, {"role": "user", "content": [image, {"type": "text", "text": "이 사진에 무엇이 있나요? 한국어로 간단히 설명해주세요."}]}],
            "max_tokens": 256, "temperature": 0.5, **SKIP_REASONING}, 5, "content"),
        ("6 Track B - Image Output", "b", {
            "messages": [{"role": "system", "content": draw_system}, {"role": "user", "content": "강아지 그림을 그려줘"}],
            "tools": [IMAGE_TOOL], "max_tokens": 7000, "temperature": 0.7, **SKIP_REASONING, **DRAW}, 10, "image"),
        ("7 Track B - Image to Image", "b", {
            "messages": [{"role": "system", "content": edit_system}, {"role": "user", "content": [
                image, {"type": "text", "text": "Transform this image into cartoon style"}]}],
            "tools": [IMAGE_TOOL], "max_tokens": 7000, "temperature": 0.5, **SKIP_REASONING, **DRAW}, 10, "image"),
        ("8 Track B - Video Input", "b", {
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"{web}/sample-5s.mp4"}},
                                                      {"type": "text", "text": "이 영상에서 무엇이 보이나요? 자세히 설명해주세요."}]}],
            "max_tokens": 512, "temperature": 0.5, **SKIP_REASONING}, 5, "content"),
        ("9 Track B - Audio Output", "b", {
            "messages": [{"role": "user", "content": "입력 텍스트를 40대 여성의 슬픈 말투로 말해줘.\\n벌레를 갖다 주었다고 우쭐대다니, 참 이상해."}],
            "max_tokens": 1000, "temperature": 0.7, **SKIP_REASONING, **SPEAK}, 5, "audio"),
        ("10 Track B - Audio to Audio", "b", {
            "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": tts, "format": "mp3"}},
                                                      {"type": "text", "text": "이 음성을 듣고 음성으로 대답해줘"}]}],
            "max_tokens": 2000, "temperature": 0.7, **SKIP_REASONING, **SPEAK}, 5, "audio"),
    ]  # fmt: skip


def passes(body: dict, criterion: str) -> bool:
    """check_server.sh's criterion for one answer, made stricter: media must be there and decode."""
    if "error" in body:
        return False
    message = body["choices"][0]["message"]
    if criterion == "content":
        return bool(message.get("content"))
    if criterion == "image":
        token = json.loads(message["tool_calls"][0]["function"]["arguments"])["discrete_image_token"]
        if not token.startswith(("s3://", "http")):
            return False
        assert message["images"][0]["image_url"]["url"] == token  # OpenRouter's form too
        drawn(token)  # a PNG at its ratio's size; not a model's choice, so a failure here is not retried
        return True
    import soundfile

    samples, rate = soundfile.read(io.BytesIO(base64.b64decode(message["audio"]["data"])))
    return rate == 24000 and len(samples) > 0


def test_the_ten_checks_of_omniserve_pass(server, web):
    results = {}
    for name, track, body, attempts, criterion in checks(web):
        url = f"{server.url}/{track}/v1/chat/completions"
        request = {"model": MODELS[track], **body}
        for attempt in range(1, attempts + 1):
            response = httpx.post(url, json=request, headers=server.headers, timeout=600, trust_env=False)
            assert response.status_code < 500, (name, response.text)
            if passes(response.json(), criterion):
                results[name] = attempt
                break
    assert sorted(results, key=lambda n: int(n.split()[0])) == [c[0] for c in checks(web)], results
