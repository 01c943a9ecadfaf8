"""The real encoder services behind a thin entry, for benchmarks/bench_encoders.py:
`bentoml serve benchmarks.encoder_bento:VisionBench` (or `AudioBench`).

The entry takes one item per request as JSON (`{"data_b64": ...}`) and calls the real `VisionEncoder` /
`AudioEncoder` (built from the track config by `services/`) as a BentoML dependency, exactly as the gateway does:
its own worker process, BentoML's pickle wire format, one `encode([item])` call per request, so adaptive batching
merges concurrent requests. (The encoders cannot be the entry themselves: BentoML refuses the pickle format at the
entry, and their `bytes` fields have no JSON form.) The entry answers the embedding's shape, not the embedding.

`HCX_BENCH_TRACK` (a or b, default a) picks the track; `HCX_PROFILE` and the `HCX_TRACKS__...` variables apply as
for the bentos (`HCX_TRACKS__A__COMPONENTS__VISION_ENCODER__MAX_BATCH_SIZE=1` turns adaptive batching off).

Classes are built on first access, so serving track A's vision encoder never loads track B's config.

Track B's decoders the same way, for benchmarks/bench_decoders.py (`HCX_BENCH_TRACK=b`): `AudioDecoderBench` /
`VisionDecoderBench` take one `SpeechRequest` / `ImageRequest` as JSON (`{"request": {...}}`) at `POST /decode`, call
the real decoder's `decode([request])` / `generate([request])` and answer the result's size, not the audio or PNG.
"""

from __future__ import annotations

import os

from hcxserve.config import load_track

TRACK = os.environ.get("HCX_BENCH_TRACK", "a")


# service class name -> component kind
_KINDS = {"VisionEncoder": "vision_encoder", "AudioEncoder": "audio_encoder", "AudioDecoder": "audio_decoder",
          "VisionDecoder": "vision_decoder"}  # fmt: skip


def _component(name: str) -> type:
    """The real service class of a component ("VisionEncoder", "AudioDecoder", ...) of the benchmarked track."""
    from services.components import COMPONENT_SERVICES

    return COMPONENT_SERVICES[_KINDS[name]](load_track(TRACK))


def _bench(encoder: type) -> type:
    import base64

    import bentoml

    from hcxserve.protocol.payloads import AudioInput, ImageInput
    from services.dependencies import call_dependency

    config = load_track(TRACK)
    vision = encoder.name.endswith("VisionEncoder")

    @bentoml.service(name=f"{encoder.name}Bench", traffic={"timeout": 600})
    class Bench:
        target = bentoml.depends(encoder)

        @bentoml.api
        async def encode(self, data_b64: str) -> dict:
            data = base64.b64decode(data_b64)
            if vision:
                item = ImageInput(data=data)
            else:
                item = AudioInput(data=data, max_seconds=config.media.max_audio_seconds)
            (result,) = await call_dependency(self.target, "encode", [item], what=encoder.name)
            if result.embedding is None:
                return {"error": result.error, "status": result.status}
            return {"rows": result.embedding.rows, "dim": result.embedding.dim, "dtype": result.embedding.dtype}

    return Bench


def _decoder_bench(decoder: type) -> type:
    import bentoml

    from hcxserve.protocol.payloads import ImageRequest, SpeechRequest
    from services.dependencies import call_dependency

    audio = decoder.name.endswith("AudioDecoder")

    @bentoml.service(name=f"{decoder.name}Bench", traffic={"timeout": 600})
    class Bench:
        target = bentoml.depends(decoder)

        @bentoml.api
        async def decode(self, request: dict) -> dict:
            item = SpeechRequest(**request) if audio else ImageRequest(**request)
            method = "decode" if audio else "generate"
            (result,) = await call_dependency(self.target, method, [item], what=decoder.name)
            data = result.data if audio else result.png
            if data is None:
                return {"error": result.error, "status": result.status}
            if audio:
                return {"bytes": len(data), "samples": result.samples, "sample_rate": result.sample_rate}
            return {"bytes": len(data), "width": result.width, "height": result.height}

    return Bench


def __getattr__(name: str):
    if name in _KINDS:
        service = _component(name)
    elif name in ("AudioDecoderBench", "VisionDecoderBench"):
        service = _decoder_bench(_component(name.removesuffix("Bench")))
    elif name in ("VisionBench", "AudioBench"):
        service = _bench(_component(name.replace("Bench", "Encoder")))
    else:
        raise AttributeError(name)
    globals()[name] = service  # the import string must resolve to the same class on every access
    return service
