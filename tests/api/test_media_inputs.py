"""Images, videos and audio in a request: what the encoders are given, what reaches vLLM, and every limit and
refusal (status, `param`, nothing reaching the LLM)."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from hcxserve.protocol.payloads import AudioEncoding, VisionEncoding
from tests.api.harness import audio_encoding, gateway
from tests.conftest import data_url, make_audio, make_noise_png, make_png

PNG = make_png()
WAV = make_audio(0.5)
OTHER_WAV = make_audio(0.5, freq=660.0)


def user(*parts):
    return {"messages": [{"role": "user", "content": list(parts)}]}


def text(value="?"):
    return {"type": "text", "text": value}


def image_url(url):
    return {"type": "image_url", "image_url": {"url": url}}


def video_url(url, **options):
    return {"type": "video_url", "video_url": {"url": url}, **options}


def input_audio(data, fmt="wav"):
    return {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def refused(response, status, param, code=None):
    """A refusal: the status, an OpenAI error object naming `param`."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    assert error["type"] == ("upstream_error" if status == 502 else "invalid_request_error")
    return error


# ---------------------------------------------------------------------------------------------- images
def test_every_image_form_reaches_the_encoder_and_vllm_in_place():
    other = make_png(32, 32, (0, 200, 0))
    with gateway() as gw:
        gw.web.pages["https://img.test/red.png"] = PNG
        response = gw.chat(
            {
                "messages": [
                    {"role": "user", "content": [text("compare"), image_url("https://img.test/red.png")]},
                    {"role": "assistant", "content": "ok"},
                    {
                        "role": "user",
                        "content": [
                            image_url(data_url(other)),
                            {"type": "image", "image": data_url(PNG)},
                            {"type": "image_url", "image_url": "https://img.test/red.png"},  # a bare URL string
                            text("and?"),
                        ],
                    },
                ]
            }
        )
        assert response.status_code == 200, response.text
        # the same picture in three forms is encoded once, in one batched call for the request
        assert [item.data for item in gw.vision.images] == [PNG, other]
        assert gw.vision.calls == 1
        sent = gw.llm.body["messages"]
    assert sent[0]["content"] == [
        {"type": "text", "text": "compare"},
        {"type": "image_embeds", "image_embeds": {"image_embeds": "IMG0", "image_grid_thw": [1, 4, 4]}},
    ]
    assert sent[1] == {"role": "assistant", "content": "ok"}
    assert [p.get("image_embeds", {}).get("image_embeds") for p in sent[2]["content"]] == ["IMG1", "IMG0", "IMG0", None]
    assert sent[2]["content"][3] == {"type": "text", "text": "and?"}


def test_track_b_images_carry_their_discrete_codes():
    with gateway("b") as gw:
        gw.chat(user(image_url(data_url(PNG))))
        (part,) = gw.llm.body["messages"][0]["content"]
    assert part == {
        "type": "image_embeds",
        "image_embeds": {"image_embeds": "IMG0", "image_grid_thw": [1, 4, 4], "discrete_image_codes": [7, 8, 9]},
    }


def test_image_count_limit_counts_the_whole_conversation():
    image = image_url(data_url(PNG))
    with gateway(**{"media.max_images_per_request": 2}) as gw:
        assert gw.chat(user(image, image)).status_code == 200
        turns = {"messages": [{"role": "user", "content": [image, image]}, {"role": "user", "content": [image]}]}
        error = refused(gw.chat(turns), 400, "messages", "too_many_images")
        assert error["message"] == "too many images: 3 (at most 2 per request)"
        assert len(gw.llm.requests) == 1 and gw.vision.calls == 1


@pytest.mark.parametrize(
    ("data", "overrides", "status", "code"),
    [
        (b"definitely not an image", {}, 400, "invalid_media"),
        (make_png(3, 40), {}, 400, "invalid_media"),  # smaller than min_image_side
        (make_png(100, 100), {"media.max_image_pixels": 9999}, 413, "payload_too_large"),
        (make_png(100, 100), {"media.max_image_bytes": 100}, 413, "payload_too_large"),
    ],
)
@pytest.mark.parametrize("by_url", [False, True])
def test_bad_images_are_refused_before_any_encoder_work(data, overrides, status, code, by_url):
    with gateway(**overrides) as gw:
        gw.web.pages["https://img.test/x.png"] = data
        ref = "https://img.test/x.png" if by_url else data_url(data)
        refused(gw.chat(user(text(), image_url(ref))), status, "messages[0].content[1]", code)
        assert gw.vision.calls == 0 and gw.llm.requests == []


def test_minimum_image_side_is_inclusive():
    with gateway(**{"media.min_image_side": 4}) as gw:
        assert gw.chat(user(image_url(data_url(make_png(4, 4))))).status_code == 200
        refused(gw.chat(user(image_url(data_url(make_png(4, 3))))), 400, "messages[0].content[0]")


def test_pixel_limit_is_inclusive():
    with gateway(**{"media.max_image_pixels": 100 * 50}) as gw:
        assert gw.chat(user(image_url(data_url(make_png(100, 50))))).status_code == 200
        refused(gw.chat(user(image_url(data_url(make_png(101, 50))))), 413, "messages[0].content[0]")


@pytest.mark.parametrize(("status", "expected"), [(400, 400), (413, 413)])
def test_an_encoder_refusal_names_the_part_and_keeps_its_status(status, expected):
    with gateway() as gw:
        gw.vision.image_results = lambda items: [VisionEncoding(error="the image data is truncated", status=status)]
        error = refused(gw.chat(user(text(), image_url(data_url(PNG)))), expected, "messages[0].content[1]")
        assert "truncated" in error["message"] and gw.llm.requests == []


def test_an_encoder_result_without_embedding_or_error_is_a_client_error():
    with gateway() as gw:
        gw.vision.image_results = lambda items: [VisionEncoding() for _ in items]
        error = refused(gw.chat(user(image_url(data_url(PNG)))), 400, "messages[0].content[0]")
        assert error["message"] == "messages[0].content[0]: could not be encoded"


def test_encoder_failure_is_a_502_without_internals():
    with gateway() as gw:
        gw.vision.error = RuntimeError("CUDA error at /secret/path.py:12")
        error = refused(gw.chat(user(image_url(data_url(PNG)))), 502, None)
        assert error["message"] == "The vision encoder failed to process the request."
        error = refused(gw.chat(user(video_url(data_url(b"mp4", "video/mp4")))), 502, None)
        assert error["message"] == "The vision encoder (video) failed to process the request."
        assert gw.llm.requests == []


def test_wrong_number_of_encoder_results_is_a_502():
    with gateway() as gw:
        gw.vision.image_results = lambda items: []
        error = refused(gw.chat(user(image_url(data_url(PNG)))), 502, None)
        assert error["message"] == "The vision encoder returned a wrong number of results."
        assert gw.llm.requests == []


def _tamper(field, value):
    def results(items):
        from tests.api.harness import _vision_embedding

        out = [_vision_embedding(i, (1, 4, 4), None, "IMG") for i in range(len(items))]
        setattr(out[0].embedding, field, value(getattr(out[0].embedding, field)))
        return out

    return results


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rows", lambda rows: rows + 1),  # rows disagree with the grid: vLLM's engine would die
        ("rows", lambda rows: rows - 1),
        ("dim", lambda dim: dim + 1),  # the wrong width
        ("grid_thw", lambda grid: (1, 4, 8)),  # a grid that does not match the rows
        ("discrete_codes", lambda codes: [1, 2]),  # track A's encoder has no discrete codes
    ],
)
def test_malformed_encoder_output_never_reaches_the_llm(field, value):
    with gateway() as gw:
        gw.vision.image_results = _tamper(field, value)
        error = refused(gw.chat(user(image_url(data_url(PNG)))), 502, None)
        assert error["message"] == "The vision encoder returned malformed features."
        assert gw.llm.requests == []


def test_track_b_image_without_codes_never_reaches_the_llm():
    with gateway("b") as gw:
        gw.vision.image_results = _tamper("discrete_codes", lambda codes: None)
        refused(gw.chat(user(image_url(data_url(PNG)))), 502, None)
        assert gw.llm.requests == []


# ---------------------------------------------------------------------------------------------- videos
@pytest.mark.parametrize("track", ["a", "b"])
def test_video_file_by_url_and_data_url(track):
    with gateway(track, **{"media.video_sound": False}) as gw:
        gw.web.pages["https://vid.test/clip.mp4"] = b"mp4 bytes"
        response = gw.chat(
            user(video_url("https://vid.test/clip.mp4"), video_url(data_url(b"webm", "video/webm")), text())
        )
        assert response.status_code == 200, response.text
        assert [v.data for v in gw.vision.videos] == [b"mp4 bytes", b"webm"]
        assert all(v.frames is None for v in gw.vision.videos)
        parts = gw.llm.body["messages"][0]["content"]
    assert parts[0] == {"type": "video_embeds", "video_embeds": {"video_embeds": "VID0", "video_grid_thw": [2, 4, 4]}}
    assert parts[1]["video_embeds"]["video_embeds"] == "VID1" and parts[2] == {"type": "text", "text": "?"}


@pytest.mark.parametrize("track", ["a", "b"])
def test_a_video_in_an_image_url_part_is_a_video(track):
    # OmniServe's check 8 sends its mp4 as an image_url part
    with gateway(track, **{"media.video_sound": False}) as gw:
        gw.web.pages["https://vid.test/sample-5s.MP4?x=1"] = b"mp4 bytes"
        gw.web.pages["https://img.test/red.png"] = PNG
        parts = [image_url("https://vid.test/sample-5s.MP4?x=1"), image_url(data_url(b"webm", "video/webm"))]
        response = gw.chat(user(*parts, image_url("https://img.test/red.png")))
        assert response.status_code == 200, response.text
        assert [v.data for v in gw.vision.videos] == [b"mp4 bytes", b"webm"] and len(gw.vision.images) == 1
        parts = gw.llm.body["messages"][0]["content"]
        assert [p["type"] for p in parts] == ["video_embeds", "video_embeds", "image_embeds"]
        malformed = gw.chat(user(image_url("http://[::1/clip.mp4")))
    assert malformed.status_code == 400 and malformed.json()["error"]["param"] == "messages[0].content[0]"


@pytest.mark.parametrize(
    ("client", "expected_fps", "expected_pixels"),
    [
        ({}, 2.0, 12544),  # the server's budget
        ({"fps": 1.0, "max_pixels": 1000}, 1.0, 1000),  # a client may ask for less
        ({"fps": 20.0, "max_pixels": 10**9}, 2.0, 12544),  # never more
    ],
)
def test_video_options_are_capped_by_the_server(client, expected_fps, expected_pixels):
    with gateway(**{"media.video_fps": 2.0, "media.video_max_pixels": 12544}) as gw:
        frames = [data_url(PNG)] * 2
        gw.chat(user(video_url(data_url(b"mp4", "video/mp4"), **client), {"type": "video", "video": frames, **client}))
        assert [(v.fps, v.max_pixels) for v in gw.vision.videos] == [(expected_fps, expected_pixels)] * 2


def test_frame_list_video():
    frames = [make_png(16, 16, (k * 40, 0, 0)) for k in range(3)]
    with gateway() as gw:
        gw.web.pages["https://img.test/f0.png"] = frames[0]
        refs = ["https://img.test/f0.png", data_url(frames[1]), data_url(frames[2])]
        assert gw.chat(user({"type": "video", "video": refs})).status_code == 200
        (video,) = gw.vision.videos
    assert video.frames == frames and video.data is None
    assert gw.llm.body["messages"][0]["content"][0]["type"] == "video_embeds"


def test_a_video_given_as_a_url_string_in_a_video_part():
    with gateway() as gw:
        gw.chat(user({"type": "video", "video": data_url(b"mp4", "video/mp4")}))
        assert gw.vision.videos[0].data == b"mp4"


def test_a_bad_frame_is_named():
    with gateway() as gw:
        frames = [data_url(PNG), data_url(b"not an image")]
        refused(gw.chat(user(text(), {"type": "video", "video": frames})), 400, "messages[0].content[1].video[1]")
        assert gw.vision.calls == 0


def test_frame_list_length_limit():
    with gateway(**{"media.max_video_frames_given": 3}) as gw:
        assert gw.chat(user({"type": "video", "video": [data_url(PNG)] * 3})).status_code == 200
        error = refused(
            gw.chat(user({"type": "video", "video": [data_url(PNG)] * 4})),
            400,
            "messages[0].content[0]",
            "too_many_frames",
        )
        assert "4 frames" in error["message"]
        assert len(gw.llm.requests) == 1


def test_a_frame_lists_pixels_are_counted_before_any_frame_is_decoded():
    frame = data_url(make_png(100, 100))  # 10,000 pixels
    with gateway(**{"media.max_image_pixels": 30_000}) as gw:
        assert gw.chat(user({"type": "video", "video": [frame] * 3})).status_code == 200
        error = refused(gw.chat(user({"type": "video", "video": [frame] * 4})), 413, "messages[0].content[0]",
                        "payload_too_large")  # fmt: skip
        assert error["message"] == (
            "messages[0].content[0]: the frames hold 40000 pixels together, over the limit of 30000"
        )
        assert len(gw.vision.videos) == 1 and len(gw.llm.requests) == 1


def test_remote_media_off_refuses_urls_and_takes_inline_data():
    with gateway(**{"media.allow_remote_media": False}) as gw:
        gw.web.pages["http://example.test/x.png"] = PNG
        refused(gw.chat(user(image_url("http://example.test/x.png"))), 400, "messages[0].content[0]",
                "remote_media_disabled")  # fmt: skip
        assert gw.chat(user(image_url(data_url(PNG)))).status_code == 200
        assert gw.web.fetched == [] and len(gw.llm.requests) == 1


def test_video_count_limit():
    video = video_url(data_url(b"mp4", "video/mp4"))
    with gateway(**{"media.max_videos_per_request": 2}) as gw:
        assert gw.chat(user(video, video)).status_code == 200
        error = refused(gw.chat(user(video, video, video)), 400, "messages", "too_many_videos")
        assert error["message"] == "too many videos: 3 (at most 2 per request)"
        assert gw.vision.calls == 1 and len(gw.llm.requests) == 1


def test_images_and_videos_are_counted_apart():
    with gateway(**{"media.max_images_per_request": 1, "media.max_videos_per_request": 1}) as gw:
        body = user(image_url(data_url(PNG)), video_url(data_url(b"mp4", "video/mp4")))
        assert gw.chat(body).status_code == 200


def test_video_file_byte_limit():
    with gateway(**{"media.max_video_bytes": 10, "media.max_image_bytes": 1000}) as gw:
        refused(gw.chat(user(video_url(data_url(b"x" * 11, "video/mp4")))), 413, "messages[0].content[0]")
        assert gw.chat(user(video_url(data_url(b"x" * 10, "video/mp4")))).status_code == 200


@pytest.mark.parametrize("status", [400, 413])
def test_a_video_refusal_keeps_its_status(status):
    with gateway() as gw:
        gw.vision.video_results = lambda items: [
            VisionEncoding(error="video is too long", status=status) for _ in items
        ]
        error = refused(gw.chat(user(video_url(data_url(b"mp4", "video/mp4")))), status, "messages[0].content[0]")
        assert "too long" in error["message"]


def test_videos_never_carry_codes():
    def with_codes(items):
        from tests.api.harness import _vision_embedding

        return [_vision_embedding(i, (2, 4, 4), [1], "VID") for i in range(len(items))]

    with gateway("b") as gw:
        gw.vision.video_results = with_codes
        refused(gw.chat(user(video_url(data_url(b"mp4", "video/mp4")))), 502, None)
        assert gw.llm.requests == []


# ---------------------------------------------------------------------------------------------- audio (track B)
def test_every_audio_form_resolves_to_the_same_bytes():
    url = "https://snd.test/tone.wav"
    forms = [
        input_audio(b64(WAV)),  # OpenAI: base64 bytes
        input_audio(data_url(WAV, "audio/wav")),
        input_audio(url),
        input_audio(base64.b64encode(url.encode()).decode()),  # OmniServe's clients: base64 of the URL
        input_audio(base64.urlsafe_b64encode(url.encode()).decode().rstrip("=")),
        input_audio(b64(WAV), fmt=None),
        input_audio(b64(WAV), fmt="WAV"),
        {"type": "audio_url", "audio_url": {"url": url}},
        {"type": "audio_url", "audio_url": url},
    ]
    with gateway("b", **{"media.max_audios_per_request": len(forms)}) as gw:
        gw.web.pages[url] = WAV
        assert gw.chat(user(*forms)).status_code == 200
        # one clip encoded: every form gave the same bytes (the encoder cache keys them by content)
        assert [clip.data for clip in gw.audio.clips] == [WAV]
        assert gw.audio.clips[0].max_seconds == gw.config.media.max_audio_seconds
        parts = gw.llm.body["messages"][0]["content"]
    assert parts[0] == {
        "type": "audio_embeds",
        "audio_embeds": {"audio_embeds": "AUD0", "discrete_audio_codes": [4, 5, 6]},
    }
    assert [p["audio_embeds"]["audio_embeds"] for p in parts] == ["AUD0"] * len(forms)


def test_images_videos_and_audio_in_one_request_keep_their_places():
    with gateway("b") as gw:
        body = {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [input_audio(b64(WAV)), text("a"), image_url(data_url(PNG))]},
                {"role": "user", "content": [video_url(data_url(b"mp4", "video/mp4")), input_audio(b64(OTHER_WAV))]},
            ]
        }
        assert gw.chat(body).status_code == 200
        sent = gw.llm.body["messages"]
    assert [p["type"] for p in sent[1]["content"]] == ["audio_embeds", "text", "image_embeds"]
    # the video's sound track right after it (encoded after the clips: AUD2), then the clip
    assert [p["type"] for p in sent[2]["content"]] == ["video_embeds", "audio_embeds", "audio_embeds"]
    assert [p["audio_embeds"]["audio_embeds"] for p in sent[2]["content"][1:]] == ["AUD2", "AUD1"]


def test_a_video_files_sound_track_is_heard_as_well_as_seen():
    with gateway("b") as gw:
        gw.web.pages["https://vid.test/a.mp4"] = b"video with sound"
        gw.web.pages["https://img.test/f0.png"] = PNG
        frames = {"type": "video", "video": ["https://img.test/f0.png"] * 4}
        body = user(video_url("https://vid.test/a.mp4"), frames, text())
        assert gw.chat(body).status_code == 200
        parts = gw.llm.body["messages"][0]["content"]
        # the file's sound goes to the audio encoder as a video's (it compresses it); a frame list has none
        assert [p["type"] for p in parts] == ["video_embeds", "audio_embeds", "video_embeds", "text"]
        assert [c.data for c in gw.audio.clips] == [b"video with sound"]
        # a second turn with the same video: both encodings come from the caches
        assert gw.chat(body).status_code == 200 and len(gw.audio.clips) == 1 and len(gw.vision.videos) == 2


@pytest.mark.parametrize("overrides, option", [({}, {"sound": False}), ({"media.video_sound": False}, {})])
def test_sound_is_switched_off_per_video_or_per_deployment(overrides, option):
    with gateway("b", **overrides) as gw:
        gw.web.pages["https://vid.test/a.mp4"] = b"video with sound"
        assert gw.chat(user(video_url("https://vid.test/a.mp4", **option))).status_code == 200
        assert [p["type"] for p in gw.llm.body["messages"][0]["content"]] == ["video_embeds"]
        assert gw.audio.clips == []


def test_a_video_without_sound_is_seen_only():
    with gateway("b") as gw:
        gw.web.pages["https://vid.test/mute.mp4"] = b"silent film"
        gw.audio.results = lambda items: [AudioEncoding(error="the video file has no sound track")] * len(items)
        assert gw.chat(user(video_url("https://vid.test/mute.mp4"))).status_code == 200
        assert [p["type"] for p in gw.llm.body["messages"][0]["content"]] == ["video_embeds"]


@pytest.mark.parametrize(
    ("part", "param", "code"),
    [
        (
            input_audio(base64.b64encode(b"s3://bucket/embedding.pt").decode()),
            "messages[0].content[0]",
            "invalid_media",
        ),
        (input_audio("s3://bucket/embedding.pt"), "messages[0].content[0]", "invalid_media"),
        (input_audio("file:///etc/passwd"), "messages[0].content[0]", "invalid_media"),
        (input_audio(base64.b64encode(b"file:///etc/passwd").decode()), "messages[0].content[0]", "invalid_media"),
        (input_audio("%%% not audio %%%"), "messages[0].content[0]", "invalid_media"),
        (input_audio(b64(WAV), fmt="midi"), "messages[0].content[0].input_audio.format", "unsupported_audio_format"),
        (
            {"type": "audio_url", "audio_url": {"url": "ftp://snd.test/a.wav"}},
            "messages[0].content[0]",
            "invalid_media",
        ),
    ],
)
def test_refused_audio_references(part, param, code):
    with gateway("b") as gw:
        refused(gw.chat(user(part)), 400, param, code)
        assert gw.audio.calls == 0 and gw.llm.requests == [] and gw.web.fetched == []


def test_audio_count_and_size_limits():
    clip = input_audio(b64(WAV))
    with gateway("b", **{"media.max_audios_per_request": 2}) as gw:
        assert gw.chat(user(clip, clip)).status_code == 200
        error = refused(gw.chat(user(clip, clip, clip)), 400, "messages", "too_many_audios")
        assert error["message"] == "too many audio clips: 3 (at most 2 per request)"
    with gateway("b", **{"media.max_audio_bytes": len(WAV) - 1}) as gw:
        refused(gw.chat(user(text(), clip)), 413, "messages[0].content[1]")
        assert gw.audio.calls == 0


def test_audio_encoder_refusals_keep_their_status_and_name_the_part():
    clip = input_audio(b64(WAV))
    with gateway("b") as gw:
        gw.audio.results = lambda clips: [
            audio_encoding(),
            AudioEncoding(error="audio is 700.0 s long, over the limit of 120 s", status=413),
        ]
        error = refused(gw.chat(user(clip, input_audio(b64(OTHER_WAV)))), 413, "messages[0].content[1]")
        assert "700.0 s" in error["message"]
        gw.audio.results = lambda clips: [AudioEncoding(error="cannot decode the audio")]
        refused(gw.chat(user(input_audio(b64(make_audio(0.5, freq=880.0))))), 400, "messages[0].content[0]")
        assert gw.llm.requests == []


@pytest.mark.parametrize(
    "bad", [audio_encoding(dim=9), audio_encoding(rows=0), audio_encoding(codes=[])], ids=["width", "rows", "codes"]
)
def test_malformed_audio_encoder_output_never_reaches_the_llm(bad):
    with gateway("b") as gw:
        gw.audio.results = lambda clips: [bad]
        error = refused(gw.chat(user(input_audio(b64(WAV)))), 502, None)
        assert error["message"] == "The audio encoder returned malformed features."
        assert gw.llm.requests == []


def test_audio_encoder_failure_is_a_502():
    with gateway("b") as gw:
        gw.audio.error = ConnectionError("encoder at 10.0.0.3 down")
        error = refused(gw.chat(user(input_audio(b64(WAV)))), 502, None)
        assert error["message"] == "The audio encoder failed to process the request."


def test_track_a_refuses_audio_and_says_what_it_takes():
    with gateway("a") as gw:
        error = refused(
            gw.chat(user(text(), input_audio(b64(WAV)))), 400, "messages[0].content[1]", "unsupported_content_type"
        )
        assert error["message"] == (
            "messages[0].content[1]: content type 'input_audio' is not supported by track A "
            "(supported: text, image_url, image, video_url, video)"
        )
        assert gw.audio.calls == 0 and gw.llm.requests == []


def test_an_unsupported_audio_format_lists_the_supported_ones():
    with gateway("b", **{"media.audio_formats": ["wav", "flac"]}) as gw:
        error = refused(
            gw.chat(user(input_audio(b64(WAV), fmt="mp3"))), 400, "messages[0].content[0].input_audio.format"
        )
    assert error["message"] == "messages[0].content[0]: audio format 'mp3' is not supported (supported: wav, flac)"


def test_track_b_lists_audio_among_its_part_types():
    with gateway("b") as gw:
        error = refused(gw.chat(user({"type": "hologram"})), 400, "messages[0].content[0]")
    assert "hologram" in error["message"]
    with gateway("b", **{"llm.modalities": ["image"]}) as gw:
        error = refused(gw.chat(user(input_audio(b64(WAV)))), 400, "messages[0].content[0]", "unsupported_content_type")
    assert error["message"].endswith("by track B (supported: text, image_url, image)")


def test_an_audio_clip_of_one_row_is_accepted():
    with gateway("b") as gw:
        gw.audio.results = lambda clips: [audio_encoding(rows=1)]
        assert gw.chat(user(input_audio(b64(WAV)))).status_code == 200


def test_a_url_inside_base64_is_recognised_up_to_2048_characters():
    def wrapped_url(length: int) -> str:
        prefix = "https://snd.test/"
        raw_length = length * 3 // 4
        return base64.b64encode((prefix + "a" * (raw_length - len(prefix))).encode()).decode()

    with gateway("b") as gw:
        at_limit, over = wrapped_url(2048), wrapped_url(2052)
        assert (len(at_limit), len(over)) == (2048, 2052)
        gw.web.pages[base64.b64decode(at_limit).decode()] = WAV
        assert gw.chat(user(input_audio(at_limit))).status_code == 200
        # longer: taken as audio bytes, which these are not (the encoder is the one to say so)
        gw.audio.results = lambda clips: [AudioEncoding(error="cannot decode the audio")]
        refused(gw.chat(user(input_audio(over))), 400, "messages[0].content[0]")
        assert gw.audio.clips[-1].data == base64.b64decode(over)


# ---------------------------------------------------------------------------------------------- large inline media
# bodies over 256 KiB leave their long base64 strings in the body's bytes (`hcxserve.gateway.inline_media`)
LARGE_PNG = make_noise_png(300, 300)
LARGE_WAV = make_audio(6.0)


def post_raw(gw, raw: bytes):
    return gw.http.post(f"{gw.prefix}/chat/completions", content=raw, headers={"content-type": "application/json"})


def escaped(raw: bytes, data: bytes) -> bytes:
    """`raw` with `data`'s base64 written with every slash escaped, as some JSON encoders do."""
    return raw.replace(b64(data).encode(), b64(data).replace("/", "\\/").encode())


@pytest.mark.parametrize(
    ("track", "part", "sent", "rewrite"),
    [
        ("a", image_url(data_url(LARGE_PNG)), "images", None),
        ("a", image_url(data_url(LARGE_PNG)), "images", lambda raw: escaped(raw, LARGE_PNG)),
        ("a", image_url(data_url(LARGE_PNG) + "  "), "images", None),
        ("a", image_url(data_url(LARGE_PNG).upper()[:22] + b64(LARGE_PNG).rstrip("=")), "images", None),
        ("a", {"type": "image", "image": b64(LARGE_PNG)}, "images", None),
        ("a", image_url(data_url(LARGE_PNG, "video/mp4")), "videos", None),  # told a video by its header
        ("b", input_audio(b64(LARGE_WAV)), "clips", None),
        ("b", input_audio(b64(LARGE_WAV)), "clips", lambda raw: escaped(raw, LARGE_WAV)),
        ("b", input_audio(b64(LARGE_WAV) + "  "), "clips", None),
        ("b", {"type": "audio_url", "audio_url": data_url(LARGE_WAV, "audio/wav")}, "clips", None),
    ],
    ids=["data-url", "escaped-slashes", "trailing-spaces", "unpadded-upper-case", "bare-base64",
         "video-in-image-part", "input-audio", "input-audio-escaped", "input-audio-trailing-spaces", "audio-url"],
)  # fmt: skip
def test_large_inline_media_reaches_the_encoder_byte_for_byte(track, part, sent, rewrite):
    raw = json.dumps(user(part, text())).encode()
    assert len(raw) > 256 << 10
    with gateway(track, **{"media.video_sound": False}) as gw:
        response = post_raw(gw, rewrite(raw) if rewrite else raw)
        assert response.status_code == 200, response.text
        encoder = gw.audio if sent == "clips" else gw.vision
        assert [item.data for item in getattr(encoder, sent)] == [LARGE_WAV if sent == "clips" else LARGE_PNG]


@pytest.mark.parametrize("byte", [b"\x01", b"\xff"], ids=["control-character", "bad-utf8"])
def test_a_large_payload_that_is_not_json_text_makes_the_body_invalid_json(byte):
    raw = json.dumps(user(image_url(data_url(LARGE_PNG)))).encode()
    middle = len(raw) // 2
    with gateway() as gw:
        error = refused(post_raw(gw, raw[:middle] + byte + raw[middle:]), 400, None, "invalid_json")
        assert error["message"] == "the request body is not valid JSON"
        assert gw.vision.calls == 0 and gw.llm.requests == []


@pytest.mark.parametrize(
    ("url", "overrides", "status", "code"),
    [
        (data_url(LARGE_PNG), {"media.max_image_bytes": len(LARGE_PNG) - 1}, 413, "payload_too_large"),
        (data_url(LARGE_PNG), {"media.max_image_bytes": len(LARGE_PNG)}, 200, None),
        ("data:image/png;base64," + "!" * 300_000, {}, 400, "invalid_media"),
        (data_url(LARGE_PNG)[:-3] + "=A==", {}, 400, "invalid_media"),
        (b64(LARGE_PNG)[:100_000] + "!" + b64(LARGE_PNG)[100_000:], {}, 400, "invalid_media"),
    ],
    ids=["over-the-limit", "at-the-limit", "not-base64", "padding-inside", "bare-not-base64"],
)
def test_large_inline_media_is_refused_as_any_other(url, overrides, status, code):
    with gateway(**overrides) as gw:
        response = gw.chat(user(image_url(url)))
        if status == 200:
            assert response.status_code == 200, response.text
            return
        refused(response, status, "messages[0].content[0]", code)
        assert gw.vision.calls == 0 and gw.llm.requests == []


# ---------------------------------------------------------------------------------------------- the event loop
def test_large_payloads_are_worked_on_off_the_event_loop(monkeypatch):
    """Parsing a large body, decoding its inline media, hashing it for the encoder cache and serialising the LLM's
    request run in threads: one large upload must not stall the worker's other requests."""
    offloaded = []
    to_thread = asyncio.to_thread

    async def recording(fn, *args, **kwargs):
        # module and name, not __qualname__: mutmut renames the functions it mutates (and what they define)
        offloaded.append(f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}")
        return await to_thread(fn, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", recording)
    large = make_noise_png(1024, 1024)
    assert len(large) > 1 << 20
    with gateway(**{"media.max_image_bytes": 8 << 20}) as gw:
        assert gw.chat(user(image_url(data_url(large)))).status_code == 200
        assert gw.vision.images[0].data == large
    assert offloaded == [
        "body.parse_request", "fetch._decode_inline", "encoder_cache.<lambda>", "llm_client.<lambda>"
    ]  # fmt: skip
    offloaded.clear()
    with gateway() as gw:
        assert gw.chat(user(image_url(data_url(PNG)), text("small"))).status_code == 200
    assert offloaded == ["llm_client.<lambda>"]  # small ones stay on the loop, but for the LLM's request
    offloaded.clear()
    medium = make_noise_png(150, 150)  # left in a large body's bytes, but decoded on the loop: ~90 KB of base64
    with gateway() as gw:
        assert gw.chat(user(text("a long question " * 20_000), image_url(data_url(medium)))).status_code == 200
        assert gw.vision.images[0].data == medium
    assert offloaded == ["body.parse_request", "llm_client.<lambda>"]
