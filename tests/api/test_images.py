"""Generated images (track B): what the LLM is asked for, and how its image blocks become `message.images`, the
original's tool call, and `delta.images`."""

from __future__ import annotations

import base64
import json

import pytest

from hcxserve.protocol.payloads import GeneratedImage
from tests.api.harness import chunk, completion, gateway, sse

CODES = [(13 * i) % 1024 for i in range(729)]
BLOCK = (
    "<|discrete_image_start|><|vision_ratio_4:3|>"
    + "".join(f"<|vision{c:05d}|>" for c in CODES)
    + "<|discrete_image_end|>"
)
TOOL = {
    "type": "function",
    "function": {
        "name": "t2i_model_generation",
        "description": "Generates an RGB image based on the provided discrete image representation.",
        "parameters": {"type": "object", "required": ["discrete_image_token"],
                       "properties": {"discrete_image_token": {"type": "string", "minLength": 1}}},
    },
}  # fmt: skip
DRAW = {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "t2i_model_generation"}}}


def ask(**fields):
    return {"messages": [{"role": "user", "content": "Draw a puppy."}], **fields}


def png_url(ratio="4:3", codes=729, steps=None, seed=None) -> str:
    return "data:image/png;base64," + base64.b64encode(f"png:{ratio}:{codes}:{steps}:{seed}".encode()).decode()


def test_the_llm_is_asked_for_an_image_and_its_block_is_drawn():
    with gateway("b") as gw:
        gw.llm.reply = completion("Here it is. " + BLOCK)
        response = gw.chat(ask(**DRAW, image={"steps": 8, "seed": 3}))
        assert response.status_code == 200, response.text
        body = gw.llm.body
        (request,) = gw.tracks["b"].drawing.requests
    # the template still shows the tool, vLLM's tool parser is off (it would take the image tokens in a stream)
    assert body["tool_choice"] == "none" and body["tools"] == [TOOL]
    assert body["vllm_xargs"] == {"hcx_output": "image"} and body["skip_special_tokens"] is False
    assert body["chat_template_kwargs"] == {"thinking": False, "skip_reasoning": True}
    assert (request.ratio, request.codes, request.steps, request.seed) == ("4:3", CODES, 8, 3)
    choice = response.json()["choices"][0]
    message = choice["message"]
    assert message["content"] == "Here it is."
    assert message["images"] == [{"index": 0, "type": "image_url", "image_url": {"url": png_url(steps=8, seed=3)}}]
    # the original's form: the tool call with the image's URL
    (call,) = message["tool_calls"]
    assert call["function"]["name"] == "t2i_model_generation" and call["id"].startswith("call_")
    assert json.loads(call["function"]["arguments"]) == {"discrete_image_token": png_url(steps=8, seed=3)}
    assert choice["finish_reason"] == "tool_calls"


def test_each_block_is_drawn_in_order_with_the_requests_sampling_options():
    with gateway("b") as gw:
        gw.llm.reply = completion("One: " + BLOCK + " two: " + BLOCK.replace("4:3", "16:9"))
        message = gw.chat(ask(image={"steps": 4, "guidance_scale": 2.5}, seed=5)).json()["choices"][0]["message"]
        requests = gw.tracks["b"].drawing.requests
    assert [(r.ratio, r.steps, r.guidance_scale, r.seed) for r in requests] == [("4:3", 4, 2.5, 5), ("16:9", 4, 2.5, 5)]
    assert [(i["index"], i["image_url"]["url"]) for i in message["images"]] == [
        (0, png_url(steps=4, seed=5)), (1, png_url("16:9", steps=4, seed=5))
    ]  # fmt: skip


def test_a_block_without_its_ratio_token_is_not_drawn():
    with gateway("b") as gw:
        gw.llm.reply = completion(BLOCK.replace("<|vision_ratio_4:3|>", ""))
        message = gw.chat(ask()).json()["choices"][0]["message"]
        assert gw.tracks["b"].drawing.requests == []
    assert "images" not in message


def test_an_image_the_model_draws_unasked_comes_back_without_a_tool_call_unless_declared():
    with gateway("b") as gw:
        gw.llm.reply = completion(BLOCK)
        message = gw.chat(ask(seed=11)).json()["choices"][0]["message"]
        assert message["images"][0]["image_url"]["url"] == png_url(seed=11) and message["tool_calls"] == []
        assert message["content"] == ""
        message = gw.chat(ask(tools=[TOOL])).json()["choices"][0]["message"]  # OmniServe's checks 6 and 7
    assert json.loads(message["tool_calls"][0]["function"]["arguments"])["discrete_image_token"] == png_url()


def test_an_image_cut_short_is_not_drawn():
    with gateway("b") as gw:
        gw.llm.reply = completion(BLOCK[:2000])
        gw.llm.reply["choices"][0]["finish_reason"] = "length"
        choice = gw.chat(ask(**DRAW)).json()["choices"][0]
        assert gw.tracks["b"].drawing.requests == []
    assert "images" not in choice["message"] and choice["finish_reason"] == "length"


def test_a_streamed_image_arrives_as_one_chunk_with_its_tool_call_before_the_finish():
    text = "Here. " + BLOCK
    pieces = [text[i : i + 50] for i in range(0, len(text), 50)]
    with gateway("b") as gw:
        gw.llm.stream = sse(chunk({"role": "assistant", "content": ""}), *(chunk({"content": p}) for p in pieces),
                            chunk({}, finish_reason="stop"))  # fmt: skip
        events = gw.stream(ask(**DRAW))
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert "".join(d.get("content") or "" for d in deltas) == "Here. "  # no image token as text
    (with_image,) = [d for d in deltas if "images" in d]
    assert with_image["images"] == [{"index": 0, "type": "image_url", "image_url": {"url": png_url()}}]
    assert with_image["tool_calls"][0]["function"]["name"] == "t2i_model_generation"
    assert with_image["tool_calls"][0]["index"] == 0
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert all(not e["choices"][0].get("finish_reason") for e in events[:-2])


@pytest.mark.parametrize(
    "track, fields, param, message",
    [
        ("a", DRAW, "tool_choice", "track A does not draw images"),
        ("b", {**DRAW, "modalities": ["text", "audio"]}, "tool_choice",
         "ask for speech or for an image, not both in one answer"),
        ("b", {**DRAW, "image": {"steps": 51}}, "image.steps", "51"),  # the embedded profile's max_steps: 50
        ("b", {**DRAW, "image": {"guidance_scale": 11}}, "image.guidance_scale", "less than or equal to 10"),
    ],
)  # fmt: skip
def test_what_cannot_be_drawn_is_refused_before_the_llm(track, fields, param, message):
    with gateway(track) as gw:
        response = gw.chat(ask(**fields))
        assert gw.llm.requests == []
    assert response.status_code == 400 and response.json()["error"]["param"] == param
    assert message in response.json()["error"]["message"]


def test_as_many_steps_as_the_deployment_allows_are_taken():
    with gateway("b") as gw:
        gw.llm.reply = completion(BLOCK)
        assert gw.chat(ask(**DRAW, image={"steps": 50})).status_code == 200
        assert gw.tracks["b"].drawing.requests[0].steps == 50


def test_a_refused_drawing_is_a_502_without_internals():
    with gateway("b") as gw:
        gw.llm.reply = completion(BLOCK)
        gw.tracks["b"].drawing.results = lambda items: [GeneratedImage(error="unknown ratio '4:3'", status=400)]
        response = gw.chat(ask(**DRAW))
    assert response.status_code == 502 and response.json()["error"]["message"] == (
        "The vision decoder could not draw the model's image."
    )


def tool_call(id_: str, arguments: str) -> dict:
    return {"id": id_, "type": "function", "function": {"name": "t2i_model_generation", "arguments": arguments}}


def test_the_models_own_tool_call_is_drawn_and_its_arguments_name_the_image():
    # the real model calls the tool (vLLM's tool parser turns its output into the call), as in OmniServe's check 6
    call = tool_call("chatcmpl-tool-1", json.dumps({"discrete_image_token": BLOCK}))
    with gateway("b") as gw:
        gw.llm.reply = completion(None, tool_calls=[call])
        gw.llm.reply["choices"][0]["finish_reason"] = "tool_calls"
        choice = gw.chat(ask(tools=[TOOL])).json()["choices"][0]
        assert gw.llm.body["skip_special_tokens"] is False  # the tokens in the call reach the gateway
        assert "vllm_xargs" not in gw.llm.body  # not asked: the model decides
    (only,) = choice["message"]["tool_calls"]
    assert only["id"] == "chatcmpl-tool-1"
    assert json.loads(only["function"]["arguments"]) == {"discrete_image_token": png_url()}
    assert choice["message"]["images"][0]["image_url"]["url"] == png_url() and choice["finish_reason"] == "tool_calls"


def test_a_tool_call_without_an_image_block_is_left_as_written():
    calls = [tool_call("c1", "not json"), tool_call("c2", json.dumps({"discrete_image_token": "a dog"}))]
    with gateway("b") as gw:
        gw.llm.reply = completion(None, tool_calls=calls)
        message = gw.chat(ask(tools=[TOOL])).json()["choices"][0]["message"]
        assert gw.tracks["b"].drawing.requests == []
    assert [c["function"]["arguments"] for c in message["tool_calls"]] == [c["function"]["arguments"] for c in calls]


def streamed_call(index: int, id_: str, name: str, arguments: str, size: int = 40) -> list[dict]:
    """A tool call as vLLM's tool parser streams it: its id and name, then its arguments piece by piece."""
    first = {"index": index, "id": id_, "type": "function", "function": {"name": name, "arguments": ""}}
    pieces = [arguments[i : i + size] for i in range(0, len(arguments), size)]
    return [chunk({"tool_calls": [first]}), *(chunk({"tool_calls": [{"index": index, "function": {"arguments": p}}]})
                                              for p in pieces)]  # fmt: skip


def test_the_models_own_streamed_tool_call_is_drawn_and_comes_with_its_image():
    """Streamed, the image tool's call is held back (its arguments are image tokens), drawn at the choice's end, and
    sent once with the image, its arguments naming the image's URL; another tool's call streams as it comes."""
    image_args = json.dumps({"discrete_image_token": BLOCK})
    with gateway("b") as gw:
        gw.llm.stream = sse(chunk({"role": "assistant", "content": ""}),
                            *streamed_call(0, "call-weather", "get_weather", '{"city": "Seoul"}', size=8),
                            *streamed_call(1, "call-image", "t2i_model_generation", image_args),
                            chunk({}, finish_reason="tool_calls"))  # fmt: skip
        events = gw.stream(ask(tools=[TOOL]))
        (drawn,) = gw.tracks["b"].drawing.requests
    assert drawn.ratio == "4:3" and list(drawn.codes) == CODES
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    calls = [c for d in deltas for c in d.get("tool_calls") or []]
    assert [c.get("id") for c in calls if c["index"] == 0][0] == "call-weather"
    assert "".join(c["function"].get("arguments", "") for c in calls if c["index"] == 0) == '{"city": "Seoul"}'
    (image_call,) = [c for c in calls if c["index"] == 1]  # once, whole, with the image
    assert image_call["id"] == "call-image" and image_call["function"]["name"] == "t2i_model_generation"
    assert json.loads(image_call["function"]["arguments"]) == {"discrete_image_token": png_url()}
    (with_image,) = [d for d in deltas if "images" in d]
    assert with_image["tool_calls"] == [image_call] and with_image["images"][0]["image_url"]["url"] == png_url()
    assert [e["choices"][0].get("finish_reason") for e in events[:-1]][-1] == "tool_calls"
    assert sum(bool(e["choices"][0].get("finish_reason")) for e in events[:-1]) == 1
    # nothing held back leaves an empty chunk behind
    assert all(d.get("content") or d.get("tool_calls") or d.get("images") for d in deltas[1:-1]), deltas


def test_a_streamed_image_tool_call_without_a_drawable_image_is_passed_on_as_written():
    written = ['{"discrete_image_token": "a dog"}', "not json", json.dumps({"discrete_image_token": BLOCK[:900]})]
    with gateway("b") as gw:
        gw.llm.stream = sse(chunk({"role": "assistant", "content": ""}),
                            *(c for i, args in enumerate(written)
                              for c in streamed_call(i, f"call-{i}", "t2i_model_generation", args)),
                            chunk({}, finish_reason="tool_calls"))  # fmt: skip
        events = gw.stream(ask(tools=[TOOL]))
        assert gw.tracks["b"].drawing.requests == []  # the last one is cut short
    calls = [c for e in events[:-1] for c in e["choices"][0]["delta"].get("tool_calls") or []]
    assert calls == [tool_call(f"call-{i}", args) | {"index": i} for i, args in enumerate(written)]
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_stream_cut_without_a_finish_still_gets_what_was_held_back():
    """The LLM's stream ends with no finish_reason: the text the parser held (a possible marker) and an image-tool
    call with nothing to draw still reach the client."""
    with gateway("b") as gw:
        gw.llm.stream = sse(chunk({"role": "assistant", "content": ""}), chunk({"content": "Hi <|disc"}),
                            *streamed_call(0, "call-1", "t2i_model_generation", "not json"))  # fmt: skip
        events = gw.stream(ask(tools=[TOOL]))
    deltas = [e["choices"][0]["delta"] for e in events[:-1] if e.get("choices")]
    assert "".join(d.get("content") or "" for d in deltas) == "Hi <|disc"
    assert [c for d in deltas for c in d.get("tool_calls") or []] == [tool_call("call-1", "not json") | {"index": 0}]
