"""The chat pipeline with a recorded LLM (httpx mock transport) and a fake encoder: what reaches vLLM, and
what the client gets back. The real components are exercised in tests/e2e."""

import asyncio
import json

import httpx
import pytest

from hcxserve.config import load_track_config
from hcxserve.llm_client import LLMClient
from hcxserve.media import MediaFetcher
from hcxserve.models.vision_spec import VisionTowerSpec
from hcxserve.protocol.errors import APIError, InvalidRequestError, MediaError, NotFoundError, UpstreamError
from hcxserve.protocol.openai import ChatCompletionRequest
from hcxserve.protocol.payloads import VisionEmbedding, VisionEncoding
from hcxserve.serving import ChatCompletionServing
from hcxserve.visual_inputs import VisualInputs
from tests.conftest import data_url, make_png

SPEC = VisionTowerSpec(out_hidden_size=8, spatial_merge_size=2)

VLLM_RESPONSE = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "track_a_model",
    "choices": [
        {
            "index": 0,
            "finish_reason": "stop",
            "message": {"role": "assistant", "content": "Paris.", "reasoning": "capital of France"},
        }
    ],
    "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
}


def stream_body(*events):
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def chunk(**delta):
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
    }


class Recorder:
    def __init__(self, status=200, body=None, stream=None):
        self.requests = []
        self.status, self.body, self.stream = status, body or VLLM_RESPONSE, stream

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(json.loads(request.content))
        if self.stream is not None:
            return httpx.Response(200, text=self.stream, headers={"content-type": "text/event-stream"})
        return httpx.Response(self.status, json=self.body)


async def fake_encoder(items, grid=(1, 4, 4)):
    rows = SPEC.rows_for_grid(grid)
    return [
        VisionEncoding(
            embedding=VisionEmbedding(
                embeds_b64=f"EMB{i}", rows=rows, dim=SPEC.out_hidden_size, dtype="torch.float32", grid_thw=grid
            )
        )
        for i in range(len(items))
    ]


async def fake_video_encoder(items):
    return await fake_encoder(items, grid=(2, 4, 4))


def serving(recorder, encoder=fake_encoder, video_encoder=fake_video_encoder, **overrides):
    config = load_track_config("a", env={"HCX_OVERRIDES": " ".join(f"{k}={v}" for k, v in overrides.items())})
    client = httpx.AsyncClient(base_url="http://llm", transport=httpx.MockTransport(recorder))
    visual_inputs = VisualInputs(
        config.media, fetcher=MediaFetcher(config.media), spec=SPEC, encode_images=encoder, encode_videos=video_encoder
    )
    return ChatCompletionServing(config, llm=LLMClient(client), visual_inputs=visual_inputs)


def run(svc, body):
    async def go():
        result = await svc.create(ChatCompletionRequest.model_validate(body))
        if hasattr(result, "__aiter__"):
            return [event async for event in result]
        return result

    return asyncio.run(go())


def user(*parts):
    return {"role": "user", "content": list(parts)}


IMAGE = {"type": "image_url", "image_url": {"url": data_url(make_png())}}


def test_text_request_maps_sampling_and_reasoning_fields():
    recorder = Recorder()
    response = run(
        serving(recorder),
        {
            "model": "track_a_model",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": "Capital of France?"},
            ],
            "max_completion_tokens": 20,
            "max_tokens": 99,
            "temperature": 0.2,
            "top_k": 5,
            "seed": 7,
            "stop": ["\n\n"],
            "extra_body": {"chat_template_kwargs": {"thinking": True}, "thinking_token_budget": 30},
        },
    )
    sent = recorder.requests[0]
    assert sent["model"] == "track_a_model"
    assert sent["messages"][0] == {"role": "system", "content": "be brief"}
    assert sent["max_tokens"] == 20  # max_completion_tokens wins
    assert (sent["temperature"], sent["top_k"], sent["seed"], sent["stop"]) == (0.2, 5, 7, ["\n\n"])
    assert sent["chat_template_kwargs"] == {"thinking": True}
    assert sent["thinking_token_budget"] == 30
    assert response.choices[0].message.content == "Paris."
    assert response.choices[0].message.reasoning_content == "capital of France"
    assert response.usage.total_tokens == 13


def test_thinking_is_sent_explicitly_off_by_default():
    recorder = Recorder()
    run(serving(recorder), {"messages": [{"role": "user", "content": "hi"}]})
    assert recorder.requests[0]["chat_template_kwargs"] == {"thinking": False}


def test_images_become_validated_embedding_parts_in_order():
    recorder = Recorder()
    run(
        serving(recorder),
        {
            "messages": [
                user(
                    {"type": "text", "text": "compare"}, IMAGE, {"type": "image", "image": data_url(make_png(32, 32))}
                )
            ]
        },
    )
    parts = recorder.requests[0]["messages"][0]["content"]
    assert parts[0] == {"type": "text", "text": "compare"}
    assert [p["type"] for p in parts[1:]] == ["image_embeds", "image_embeds"]
    assert [p["image_embeds"]["image_embeds"] for p in parts[1:]] == ["EMB0", "EMB1"]
    assert parts[1]["image_embeds"]["image_grid_thw"] == [1, 4, 4]


def test_malformed_encoder_output_never_reaches_the_llm():
    async def bad_rows(items):
        good = await fake_encoder(items)
        good[0].embedding.rows += 1
        return good

    recorder = Recorder()
    with pytest.raises(UpstreamError):
        run(serving(recorder, bad_rows), {"messages": [user(IMAGE)]})
    assert recorder.requests == []


def test_encoder_refusal_is_a_client_error_naming_the_part():
    async def refuse(items):
        return [VisionEncoding(error="the image data is truncated or corrupt") for _ in items]

    with pytest.raises(MediaError) as info:
        run(serving(Recorder(), refuse), {"messages": [user({"type": "text", "text": "x"}, IMAGE)]})
    assert info.value.param == "messages[0].content[1]"


@pytest.mark.parametrize(
    ("body", "error", "code"),
    [
        ({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}, NotFoundError, "model_not_found"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 99}, InvalidRequestError, None),
        (
            {"messages": [user({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}})]},
            InvalidRequestError,
            "unsupported_content_type",
        ),
        ({"messages": [user(*[IMAGE] * 9)]}, InvalidRequestError, "too_many_images"),
        (
            {"messages": [user({"type": "image_url", "image_url": {"url": data_url(b"not an image")}})]},
            MediaError,
            "invalid_media",
        ),
    ],
)
def test_bad_requests_fail_before_the_llm(body, error, code):
    recorder = Recorder()
    with pytest.raises(error) as info:
        run(serving(recorder), body)
    assert info.value.status_code < 500 and (code is None or info.value.code == code)
    assert recorder.requests == []


def test_llm_400_is_passed_on_and_500_is_hidden():
    with pytest.raises(InvalidRequestError, match="too long"):
        run(
            serving(Recorder(400, {"error": {"message": "prompt too long", "code": 400}})),
            {"messages": [{"role": "user", "content": "x"}]},
        )
    with pytest.raises(UpstreamError) as info:
        run(
            serving(Recorder(500, {"error": {"message": "CUDA error at /secret/path.py"}})),
            {"messages": [{"role": "user", "content": "x"}]},
        )
    assert "secret" not in info.value.message


def test_stream_renames_reasoning_and_ends_with_done():
    recorder = Recorder(
        stream=stream_body(chunk(role="assistant", content=""), chunk(reasoning="hmm"), chunk(content="Paris"))
    )
    events = run(
        serving(recorder),
        {"messages": [{"role": "user", "content": "x"}], "stream": True, "stream_options": {"include_usage": True}},
    )
    assert recorder.requests[0]["stream_options"]["include_usage"] is True
    assert events[-1] == "data: [DONE]\n\n"
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert payloads[1]["choices"][0]["delta"] == {"reasoning_content": "hmm"}
    assert payloads[2]["choices"][0]["delta"] == {"content": "Paris"}
    assert all(p["model"] == "track_a_model" and p["object"] == "chat.completion.chunk" for p in payloads)


def test_mid_stream_failure_becomes_an_error_event():
    recorder = Recorder(
        stream="data: " + json.dumps(chunk(content="Pa")) + '\n\ndata: {"error": '
        '{"message": "engine died", "code": 500}}\n\n'
    )
    events = run(serving(recorder), {"messages": [{"role": "user", "content": "x"}], "stream": True})
    assert json.loads(events[0][6:])["choices"][0]["delta"]["content"] == "Pa"
    error = json.loads(events[1][6:])["error"]
    assert error["type"] == "upstream_error" and "engine died" not in error["message"]
    assert events[-1] == "data: [DONE]\n\n"


def test_error_before_first_chunk_raises_for_a_proper_status():
    with pytest.raises(APIError) as info:
        run(
            serving(Recorder(400, {"error": {"message": "bad"}})),
            {"messages": [{"role": "user", "content": "x"}], "stream": True},
        )
    assert info.value.status_code == 400


@pytest.mark.parametrize(
    ("failure", "status"), [(httpx.ConnectError("refused"), 503), (httpx.ReadTimeout("slow"), 504)]
)
@pytest.mark.parametrize("stream", [False, True])
def test_transport_failures_map_to_503_and_504(failure, status, stream):
    def broken(request):
        raise failure

    with pytest.raises(APIError) as info:
        run(serving(broken), {"messages": [{"role": "user", "content": "x"}], "stream": stream})
    assert info.value.status_code == status


def test_videos_become_video_embedding_parts_with_client_options_capped():
    seen = []

    async def video_encoder(items):
        seen.extend(items)
        return await fake_video_encoder(items)

    recorder = Recorder()
    frames = [data_url(make_png(32, 32)) for _ in range(3)]
    run(
        serving(recorder, video_encoder=video_encoder),
        {
            "messages": [
                user(
                    {
                        "type": "video_url",
                        "video_url": {"url": data_url(b"fake mp4 bytes", "video/mp4")},
                        "fps": 100 / 7,
                    },
                    {"type": "video", "video": frames, "max_pixels": 10**9},
                    {"type": "text", "text": "what happens?"},
                )
            ]
        },
    )
    parts = recorder.requests[0]["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["video_embeds", "video_embeds", "text"]
    assert parts[0]["video_embeds"]["video_grid_thw"] == [2, 4, 4]
    assert seen[0].data == b"fake mp4 bytes" and seen[0].fps == 2.0  # capped at the server's fps
    assert len(seen[1].frames) == 3
    assert seen[1].max_pixels == load_track_config("a", env={}).media.video_max_pixels  # capped too


def test_video_refusal_keeps_its_status():
    async def too_long(items):
        return [VisionEncoding(error="video is longer than 600 s", status=413) for _ in items]

    with pytest.raises(APIError) as info:
        run(
            serving(Recorder(), video_encoder=too_long),
            {"messages": [user({"type": "video_url", "video_url": {"url": data_url(b"x", "video/mp4")}})]},
        )
    assert info.value.status_code == 413 and info.value.param == "messages[0].content[0]"
