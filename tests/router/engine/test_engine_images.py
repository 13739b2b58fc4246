"""The serving engine with images: an image chat generates what transformers' Llama4ForConditionalGeneration
generates; requests with and without images, and with several, share one continuous batch and each gets exactly
its solo result; a prefill chunk that splits an image's tokens changes nothing; a corrupt image or a model without
a vision tower fails only its own request, naming the image's field."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from cluster.checkpoint import CheckpointReader
from deploy.tiny.squares import QUESTION, square_image, square_png
from router.encoder.image_encoder import ImageEncoder
from router.engine.async_engine import AsyncEngine, collect
from router.engine.config import EngineConfig
from router.engine.engine import Engine
from router.images.features import VisionSettings, image_features_for
from router.images.positions import PromptImages
from router.request.errors import InvalidRequest
from router.request.messages import ChatMessage, Delta, EngineRequest, ImageInput, ImagePart
from router.request.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, top_p=0.9, seed=3, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    from deploy.tiny.model import write_tiny_model

    return str(write_tiny_model(tmp_path_factory.mktemp("vlm"), "scout", train_steps=0, vision=True))


@pytest.fixture(scope="module")
def encoder(vlm_dir):
    return ImageEncoder.from_checkpoint(vlm_dir)


def png(colour: str, height: int, width: int, seed: int) -> bytes:
    return square_png(colour, height, width, seed)


def chat(request_id: str, *parts, params: SamplingParams = GREEDY) -> EngineRequest:
    content = tuple(ImagePart(p) if isinstance(p, bytes) else p for p in parts)
    return EngineRequest(request_id, params, messages=(ChatMessage("user", content),))


def requests() -> list[EngineRequest]:
    return [
        chat("one-tile", png("red", 40, 50, 1), QUESTION),
        chat("text", "count from 17"),
        chat("grid", png("blue", 100, 90, 2), QUESTION, params=SEEDED),  # a 2 x 2 grid and the global tile
        chat("two-images", png("green", 30, 80, 3), "and", png("purple", 70, 20, 4), QUESTION),
        EngineRequest("prompt", GREEDY, prompt="<|image|>what is it", images=(ImageInput(png("red", 20, 20, 5), "x"),)),
    ]


def engine_for(vlm_dir, **config) -> Engine:
    cfg = dict(max_num_seqs=8, max_num_batched_tokens=2048, kv_cache_memory=8 << 20)
    return Engine.from_checkpoint(vlm_dir, config=EngineConfig(**{**cfg, **config}))


def features_of(engine: Engine, encoder: ImageEncoder, request: EngineRequest) -> tuple[torch.Tensor, ...]:
    return tuple(encoder.encode(image.data) for image in engine.prepare(request).images)


def run(engine: Engine, encoder: ImageEncoder, batch: list[EngineRequest]) -> dict[str, list[int]]:
    """Every request added at once (one continuous batch), stepped to the end; tokens per request."""
    tokens = {}
    for request in batch:
        engine.add(request, features_of(engine, encoder, request))
        tokens[request.request_id] = []
    finals = 0
    while finals < len(batch):
        for item in engine.step():
            if isinstance(item, Delta):
                tokens[item.request_id] += item.token_ids
            else:
                assert item.finish_reason == "length", item
                finals += 1
    return tokens


@torch.no_grad()
def transformers_greedy(vlm_dir: str, ids: list[int], pixels_T3SS: torch.Tensor, n: int) -> list[int]:
    """transformers' Llama4ForConditionalGeneration, composed as its forward would (reference/llama4-vision.md,
    "Pitfalls"), recomputing the whole sequence for each token: the simplest correct decode."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.Llama4ForConditionalGeneration.from_pretrained(vlm_dir, dtype=torch.float32).eval()
    ids_1T = torch.tensor([ids])
    embeds_1TD = hf.get_input_embeddings()(ids_1T)
    features_PD = hf.multi_modal_projector(hf.vision_model(pixels_T3SS).last_hidden_state.flatten(0, 1))
    mask_1TD = (ids_1T == hf.config.image_token_index)[..., None].expand_as(embeds_1TD)
    embeds_1TD = embeds_1TD.masked_scatter(mask_1TD, features_PD)
    out = []
    for _ in range(n):
        out.append(int(hf.language_model(inputs_embeds=embeds_1TD).logits[0, -1].argmax()))
        embeds_1TD = torch.cat([embeds_1TD, hf.get_input_embeddings()(torch.tensor([[out[-1]]]))], dim=1)
    return out


def test_an_image_chat_generates_what_transformers_generates(vlm_dir, encoder):
    engine = engine_for(vlm_dir)
    request = chat("grid", png("blue", 100, 90, 2), QUESTION)
    prepared = engine.prepare(request)
    (image,) = prepared.images
    assert image.grid == (2, 2) and prepared.prompt_ids.count(engine.vision.tokens.patch) == 5 * 4
    pixels_T3SS = encoder.processor.preprocess(image.data).pixels_T3SS.float()
    expected = transformers_greedy(vlm_dir, list(prepared.prompt_ids), pixels_T3SS, 12)
    assert run(engine, encoder, [request])["grid"] == expected


def test_images_and_text_in_one_batch_each_get_their_solo_result(vlm_dir, encoder):
    engine = engine_for(vlm_dir)
    solo = {}
    for request in requests():
        solo |= run(engine, encoder, [request])
    assert run(engine, encoder, requests()) == solo
    assert engine.blocks.blocks_used == 0 and not engine.live


def test_a_prefill_chunk_that_splits_an_image_changes_nothing(vlm_dir, encoder):
    whole = run(engine_for(vlm_dir), encoder, requests())
    engine = engine_for(vlm_dir, max_num_seqs=4, max_num_batched_tokens=8)  # 8 tokens a step: images split
    pieces = []
    engine.runner.forward = _recording(engine.runner.forward, pieces)
    assert run(engine, encoder, requests()) == whole
    rows = sum(engine.prepare(r).prompt_ids.count(engine.vision.tokens.patch) for r in requests())
    assert sum(pieces) == rows and max(pieces) <= 8  # the grid image's 20 rows were spread over several steps


@pytest.mark.parametrize("micro_batches", [2, 3])
def test_images_in_micro_batches_give_the_tokens_of_one_batch(vlm_dir, encoder, micro_batches):
    """Ping-pong micro-batches slice the step's input embeddings, image features included, by rows."""
    whole = run(engine_for(vlm_dir), encoder, requests())
    assert run(engine_for(vlm_dir, micro_batches=micro_batches), encoder, requests()) == whole


def _recording(forward, pieces: list[int]):
    def record(ids_T, batch, cache, all_logits=False, micro_batches=1, embeds_TD=None):
        if embeds_TD is not None:
            pieces.append(int((embeds_TD != forward.__self__.embed(ids_T)).any(dim=1).sum()))
        return forward(ids_T, batch, cache, all_logits, micro_batches, embeds_TD)

    return record


def test_image_features_go_only_to_prompt_positions():
    images = PromptImages([3, 4, 9], torch.arange(3.0)[:, None])
    offsets, features = images.rows(4, 6)  # positions 4..9
    assert offsets == [0, 5] and features[:, 0].tolist() == [1.0, 2.0]
    assert images.rows(10, 5)[0] == []  # generated tokens (past the prompt) never take features


def test_a_corrupt_image_fails_its_own_request_naming_the_field(vlm_dir):
    reader = CheckpointReader(vlm_dir)
    engine = AsyncEngine(engine_for(vlm_dir), image_features_for(vlm_dir, VisionSettings(), "cpu", "auto", reader))
    truncated = png("red", 40, 40, 1)[:-40]  # its header is whole: only decoding finds the damage
    batch = [chat("bad", "look", truncated, QUESTION), chat("good", png("red", 40, 50, 1), QUESTION), chat("t", "hi")]
    try:
        bad, good, text = asyncio.run(_gather(engine, batch))
    finally:
        engine.shutdown()
    assert bad["finish_reason"] == "error" and bad["error"].startswith("messages[0].parts[1].image: is a truncated")
    assert (good["finish_reason"], text["finish_reason"]) == ("length", "length")


async def _gather(engine: AsyncEngine, batch: list[EngineRequest]) -> list[dict]:
    return list(await asyncio.gather(*(collect(engine.generate(r)) for r in batch)))


def test_a_model_without_a_vision_tower_refuses_an_image_naming_the_field(tmp_path):
    from deploy.tiny.model import write_tiny_model

    engine = Engine.from_checkpoint(str(write_tiny_model(tmp_path, "scout", train_steps=0)))
    with pytest.raises(InvalidRequest, match=r"^messages\[0\]\.parts\[1\]\.image: this model does not take images"):
        engine.add(chat("r", "see", png("red", 40, 40, 1)))


def test_the_prompt_counts_each_image_s_tokens_against_the_context(vlm_dir):
    request = chat("r", png("red", 100, 100, 7), QUESTION)  # a 2 x 2 grid + global: 3 + 4 * 5 + 4 = 27 tokens
    placeholder = engine_for(vlm_dir).tokenizer.encode(f"{_chat_text('<|image|>' + QUESTION)}", False)
    n = len(placeholder) - 1 + 27
    assert len(engine_for(vlm_dir).prepare(request).prompt_ids) == n
    engine = engine_for(vlm_dir, max_model_len=n + 11)  # room for the prompt, not for 12 more tokens
    with pytest.raises(InvalidRequest, match=rf"^max_tokens: prompt \({n} tokens\) \+ max_tokens \(12\) exceeds"):
        engine.add(request)


def _chat_text(user: str) -> str:
    from deploy.tiny.tokenizer import chat_text

    return chat_text(user)


def test_features_that_do_not_fill_the_patch_positions_are_refused(vlm_dir, encoder):
    engine = engine_for(vlm_dir)
    request = chat("r", png("red", 40, 40, 1), QUESTION)
    (features,) = features_of(engine, encoder, request)
    with pytest.raises(InvalidRequest, match="feature rows"):
        engine.add(request, (features[:-1],))
    assert not engine.live


def test_training_images_and_the_demo_image_are_decoded_alike():
    """square_png is square_image written losslessly: what the demo sends is what training saw."""
    from router.images.decode import decode_image
    from router.images.request import HARD_LIMITS

    assert torch.equal(decode_image(png("red", 30, 40, 9), HARD_LIMITS), square_image(30, 40, "red", random.Random(9)))
