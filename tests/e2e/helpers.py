"""Talking to the served bento in end-to-end tests, and reading its answers."""

from __future__ import annotations

import secrets

import openai

MODELS = {"a": "track_a_model", "b": "track_b_model"}
GREEDY = {"temperature": 0.0, "seed": 0}
# answer directly: track A reasons only when asked, track B unless told not to
PLAIN = {"a": {}, "b": {"extra_body": {"chat_template_kwargs": {"skip_reasoning": True}}}}
# reason first
REASONING = {"a": {"extra_body": {"chat_template_kwargs": {"thinking": True}}}, "b": {}}

# The same input sent twice, in another form, or through another implementation of the same fp32 network moves the
# first token's logprobs by float noise (measured: at most 1.3e-5 nats, the bento against the whole VLM); inputs that
# differ in content (another picture, another sound) move them by far more.
SAME_INPUT = 1e-3  # nats
CONTENT_CHANGE = 1e-2  # nats


COMPONENTS = ("TrackA-LLM", "TrackA-VisionEncoder", "TrackB-LLM", "TrackB-VisionEncoder", "TrackB-AudioEncoder",
              "TrackB-AudioDecoder", "TrackB-VisionDecoder")  # fmt: skip
HEALTHY = {"status": "ok", "tracks": {"a": "ok", "b": "ok"}, "components": dict.fromkeys(COMPONENTS, "ok")}

# the served bento requires this key (tests/e2e/conftest.py sets it)
API_KEY = "sk-e2e-" + secrets.token_hex(8)


def client_for(base_url: str, api_key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=300)


def ask(client, messages, *, model: str, **kwargs):
    """A greedy chat completion; `extra_body` entries merge."""
    extra = {**kwargs.pop("extra_body", {})}
    return client.chat.completions.create(
        model=model, messages=messages, extra_body=extra or None, **{"max_tokens": 24, **GREEDY, **kwargs}
    )


def user(*parts):
    return {"role": "user", "content": list(parts)}


def text(value):
    return {"type": "text", "text": value}


def image_url(url):
    return {"type": "image_url", "image_url": {"url": url}}


def merged(*option_sets: dict) -> dict:
    """Request options combined, `extra_body` and its `chat_template_kwargs` merged rather than replaced."""
    out: dict = {}
    for options in option_sets:
        for key, value in options.items():
            if key == "extra_body":
                body = {**out.get("extra_body", {})}
                for k, v in value.items():
                    body[k] = {**body.get(k, {}), **v} if isinstance(v, dict) else v
                out["extra_body"] = body
            else:
                out[key] = value
    return out


def first_token_logprobs(response) -> dict[str, float]:
    """token -> logprob of the first generated token's top candidates (asked with `logprobs`, `top_logprobs`)."""
    return {t.token: t.logprob for t in response.choices[0].logprobs.content[0].top_logprobs}


def logprob_distance(a, b) -> float:
    """Largest logprob difference over the first token's top candidates of `a` (missing in `b`: infinite)."""
    first_a, first_b = first_token_logprobs(a), first_token_logprobs(b)
    return max(abs(value - first_b[token]) if token in first_b else float("inf") for token, value in first_a.items())


def reasoning_of(message) -> str | None:
    return (message.model_extra or {}).get("reasoning_content")


def metric(server, name: str, **labels: str) -> float:
    """A sample of the gateway's Prometheus `/metrics` (0 when it has not been recorded yet)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics", headers=server.headers, timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def drawn(url: str):
    """The PNG behind a generated image's URL (presigned, in the tests' S3-compatible store on loopback), checked to
    be at the exact size of one of the ratio table's entries: the size its ratio token asked for."""
    import io

    import httpx
    from PIL import Image

    from hcxserve.models.vision_decoder import VISION_RATIOS, size_for_ratio

    assert url.startswith("http://127.0.0.1:") and "X-Amz-Signature=" in url
    assert url.split("?")[0].endswith(".png")  # the stored object's key
    response = httpx.get(url, timeout=30, trust_env=False)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    picture = Image.open(io.BytesIO(response.content))
    assert picture.format == "PNG"
    assert picture.size in {size_for_ratio(ratio) for ratio in VISION_RATIOS}, picture.size
    picture.load()  # the pixels decode, not just the header
    return picture
