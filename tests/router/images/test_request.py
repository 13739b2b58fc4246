"""Images in requests, before any decoding: a chat's image parts render as `<|image|>` and expand to the image's
tokens (which every prompt-length check counts); a relayed request's images keep their grids; every refusal (too
many images, too many bytes or pixels, zero-size, truncated or unsupported data, a network URL, a model without a
vision tower) is an InvalidRequest naming the image's field."""

from __future__ import annotations

import base64
import struct
import zlib

import pytest

from deploy.tiny.squares import square_png
from deploy.tiny.tokenizer import build_tokenizer
from router.images.data_url import data_url_bytes
from router.images.decode import ImageLimits
from router.images.header import PILLOW_MAX_PIXELS
from router.images.processor import ImageProcessor
from router.images.request import HARD_LIMITS, VisionPrompt
from router.images.tokens import ImageTokens, image_token_ids
from router.request.chat import chat_images, render_chat
from router.request.errors import InvalidRequest
from router.request.messages import ChatMessage, EngineRequest, ImageInput, ImagePart
from router.request.prepare import Limits, prepare_request
from router.request.sampling_params import SamplingParams
from router.request.tokenizer import Tokenizer

TOKENIZER = Tokenizer(build_tokenizer())
TOKENS = ImageTokens.from_tokenizer(TOKENIZER.token_id)
LIMITS = Limits(vocab_size=768, max_model_len=256, kv_tokens_alone=4096)
PNG = square_png("red", 40, 50)  # one 56-pixel tile: 3 + 4 tokens
GRID_PNG = square_png("blue", 100, 90)  # a 2 x 2 grid and the global tile: 3 + 4 * 5 + 4 tokens
GATEWAY = VisionPrompt(TOKENS, 4, ImageProcessor(56, 16, ImageLimits(max_bytes=16384, max_pixels=10_000)), max_images=2)


def png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))


def chat(*parts, role: str = "user") -> EngineRequest:
    content = tuple(ImagePart(p) if isinstance(p, bytes) else p for p in parts)
    return EngineRequest("r", SamplingParams(max_tokens=8), messages=(ChatMessage(role, content),))


def prepare(request: EngineRequest, vision: VisionPrompt | None = GATEWAY, limits: Limits = LIMITS):
    return prepare_request(request, TOKENIZER, {}, limits, vision)


def refusal(request: EngineRequest, vision: VisionPrompt | None = GATEWAY) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as err:
        prepare(request, vision)
    return err.value


def test_image_parts_render_as_placeholders_where_they_stand():
    text = render_chat(chat(" Is it ", PNG, " red? ").messages)
    assert text.endswith("user<|header_end|>\n\nIs it <|image|> red?<|eot|><|header_start|>assistant<|header_end|>\n\n")
    assert chat_images(chat("a", PNG, GRID_PNG).messages) == [
        ImageInput(PNG, "messages[0].parts[1].image"),
        ImageInput(GRID_PNG, "messages[0].parts[2].image"),
    ]


def test_each_placeholder_becomes_its_image_s_tokens_and_they_count():
    prepared = prepare(chat(PNG, "and", GRID_PNG, "?"))
    placeholders = TOKENIZER.encode(render_chat(chat(PNG, "and", GRID_PNG, "?").messages), False)
    at = [i for i, t in enumerate(placeholders) if t == TOKENS.image]
    expected = (
        placeholders[: at[0]]
        + image_token_ids((1, 1), 4, TOKENS)
        + placeholders[at[0] + 1 : at[1]]
        + image_token_ids((2, 2), 4, TOKENS)
        + placeholders[at[1] + 1 :]
    )
    assert list(prepared.prompt_ids) == expected
    assert [(im.field, im.grid) for im in prepared.images] == [
        ("messages[0].parts[0].image", (1, 1)),
        ("messages[0].parts[2].image", (2, 2)),
    ]
    short = Limits(768, len(expected) + 7, 4096)  # the prompt fits, 8 more tokens do not
    with pytest.raises(InvalidRequest, match=rf"^max_tokens: prompt \({len(expected)} tokens\)"):
        prepare(chat(PNG, "and", GRID_PNG, "?"), limits=short)


def test_images_beside_a_prompt_fill_its_placeholders():
    request = EngineRequest("r", SamplingParams(), prompt="<|image|>red?", images=(ImageInput(PNG, "images[0]"),))
    prepared = prepare(request)
    assert prepared.prompt_ids[1:8] == tuple(image_token_ids((1, 1), 4, TOKENS))
    missing = EngineRequest("r", SamplingParams(), prompt="red?", images=(ImageInput(PNG, "images[0]"),))
    assert str(refusal(missing)).startswith("prompt: has 0 image placeholders (<|image|>) but 1 images")


def test_a_relayed_request_keeps_its_expanded_ids_and_grids():
    prepared = prepare(chat(GRID_PNG, "?"))
    relayed = EngineRequest("r", SamplingParams(max_tokens=8), prompt_ids=prepared.prompt_ids, images=prepared.images)
    again = prepare(relayed, VisionPrompt(TOKENS, 4, ImageProcessor(56, 16, HARD_LIMITS)))
    assert (again.prompt_ids, again.images) == (prepared.prompt_ids, prepared.images)
    ids = list(prepared.prompt_ids)
    for _ in range(4):
        ids.remove(TOKENS.patch)
    wrong = EngineRequest("r", SamplingParams(), prompt_ids=tuple(ids), images=prepared.images)
    assert "holds 16 <|patch|> tokens but its images need 20" in str(refusal(wrong))


def test_a_patch_token_typed_in_the_text_is_refused():
    err = refusal(chat(PNG, "<|patch|>"))
    assert (err.field, err.problem.split(";")[0]) == ("messages", "holds 5 <|patch|> tokens but its images need 4")


PNG_TRUNCATED_HEADER = PNG[:20]
REFUSALS = [  # (parts, the field named, what the message says)
    ((PNG, PNG, PNG), "messages[0].parts[2].image", "is image 3 of 3; at most 2 images are allowed per request"),
    ((b"",), "messages[0].parts[0].image", "is empty"),
    ((PNG_TRUNCATED_HEADER,), "messages[0].parts[0].image", "is a truncated PNG image"),
    ((b"GIF89a",), "messages[0].parts[0].image", "is a truncated GIF image"),
    ((png_header(0, 10),), "messages[0].parts[0].image", "is 0x10 pixels; both sides must be at least 1 pixel"),
    ((png_header(200, 100),), "messages[0].parts[0].image", "is 200x100 = 20000 pixels; at most 10000"),
    ((png_header(60000, 60000),), "messages[0].parts[0].image", "at most 10000 pixels are allowed per image"),
    ((b"%PDF-1.7 hello",), "messages[0].parts[0].image", "is not a PNG, JPEG, WEBP or GIF image"),
    ((b"\x89PNG\r\n\x1a\n" + b"\x00" * 20000,), "messages[0].parts[0].image", "is 20008 bytes; at most 16384"),
]


@pytest.mark.parametrize("parts, field, message", REFUSALS, ids=[r[2][:32] for r in REFUSALS])
def test_each_bad_image_is_refused_naming_its_field(parts, field, message):
    err = refusal(chat(*parts, "what?"))
    assert err.field == field and message in err.problem, str(err)


def test_a_model_without_a_vision_tower_refuses_the_first_image():
    err = refusal(chat("look", PNG), vision=None)
    assert (err.field, err.problem) == ("messages[0].parts[1].image", "this model does not take images (its "
                                        "checkpoint has no vision tower); send text only")  # fmt: skip


def test_data_urls_give_their_bytes_and_nothing_is_fetched():
    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert data_url_bytes(url, "images[0].url") == PNG
    for bad, says in [
        ("https://example.com/cat.png", "only data: URLs are accepted"),
        ("file:///etc/passwd", "only data: URLs are accepted"),
        ("data:image/png,rawbytes", "must be a base64 data URL"),
        ("data:text/plain;base64,aGk=", "has media type 'text/plain'"),
        ("data:image/png;base64,not*base64", "holds invalid base64 data"),
    ]:
        with pytest.raises(InvalidRequest) as err:
            data_url_bytes(bad, "images[0].url")
        assert err.value.field == "images[0].url" and says in err.value.problem, bad


def test_the_hard_pixel_limit_is_pillow_s():
    from PIL import Image

    assert PILLOW_MAX_PIXELS == Image.MAX_IMAGE_PIXELS == HARD_LIMITS.max_pixels
