"""Reading answers in end-to-end tests."""

from __future__ import annotations

# The same input sent twice, in another form, or through another implementation of the same fp32 network moves the
# first token's logprobs by float noise (measured: at most 1.3e-5 nats, the bento against the whole VLM); inputs that
# differ in content (another picture, another sound) move them by far more.
SAME_INPUT = 1e-3  # nats
CONTENT_CHANGE = 1e-2  # nats


def first_token_logprobs(response) -> dict[str, float]:
    """token -> logprob of the first generated token's top candidates (asked with `logprobs`, `top_logprobs`)."""
    return {t.token: t.logprob for t in response.choices[0].logprobs.content[0].top_logprobs}


def logprob_distance(a, b) -> float:
    """Largest logprob difference over the first token's top candidates of `a` (missing in `b`: infinite)."""
    first_a, first_b = first_token_logprobs(a), first_token_logprobs(b)
    return max(abs(value - first_b[token]) if token in first_b else float("inf") for token, value in first_a.items())
