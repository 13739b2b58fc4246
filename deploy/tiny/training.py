"""Brief CPU training of a tiny Llama 4 on a counting task, so a demo's output is text a person can check.

The task, in Llama 4's chat format and as plain continuation:

    <|begin_of_text|><|header_start|>user<|header_end|>\\n\\ncount from 37<|eot|>
    <|header_start|>assistant<|header_end|>\\n\\n38 39 40 41 42 43 44 45<|eot|>
    <|begin_of_text|>37 38 39 40  ->  41 42 43 ...

Numbers stay in 0..99 (one token each), so a chat start is at most 91. Every start is trained in at least one
phrasing, so a demo works for any of them; the prompts in `held_out_prompts()` (a start in the other phrasing)
are never trained, so answering them checks that the model learned the task rather than memorised prompts.

With a vision tower, each batch also holds IMAGE_BATCH_SIZE images of a coloured square asked about in a chat
(deploy/tiny/squares.py), and the tower trains with the text model (about a sixth more tokens per step).

Training runs our own model code (cluster.model with a LocalTransport over trainable ExpertShards and a fresh
ContiguousKVCache per step; cluster.vision for the tower), which is plain differentiable torch.

Legend: T tokens in the flat batch, V vocab, D hidden, I expert width, E experts.
"""

from __future__ import annotations

import logging
import math
import random
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from cluster.batch import ForwardBatch, SeqSlice
from cluster.config import ModelConfig
from cluster.experts import ExpertShard
from cluster.model import Llama4ForCausalLM
from cluster.transport import LocalTransport
from cluster.vision.merge import merge_image_features
from cluster.vision.model import VisionTower
from deploy.tiny.squares import SquareExamples
from deploy.tiny.tokenizer import chat_text
from router.images.processor import ImageProcessor
from router.reference.contiguous_cache import ContiguousKVCache

log = logging.getLogger(__name__)

DEFAULT_TRAIN_STEPS = 800  # 400 learnt "count from 76" on one CPU but not on another; 800 learns it there too
COUNT_LENGTH = 8  # numbers in a chat answer
MAX_NUMBER = 99
CHAT_PROMPTS = ("count from {n}", "Count from {n}.")
HELD_OUT_STARTS = {CHAT_PROMPTS[0]: (7, 23, 42, 58, 76, 91), CHAT_PROMPTS[1]: (15, 33, 50, 64, 88)}
BATCH_SIZE = 24
IMAGE_BATCH_SIZE = 4  # per batch, beside BATCH_SIZE text examples, when the model has a vision tower
LEARNING_RATE = 3e-3
WARMUP_STEPS = 20
# Fixed, so a seed gives the same weights on any core count. Tiny matmuls gain ~10% from a second thread, and
# multi-threaded OpenMP slows down many-fold when other processes share the cores.
TRAIN_THREADS = 1
IGNORE = -100


def count_answer(start: int, length: int = COUNT_LENGTH) -> str:
    """'count from 37' -> '38 39 40 41 42 43 44 45'."""
    return " ".join(str(n) for n in range(start + 1, start + 1 + length))


def held_out_prompts() -> list[tuple[str, str]]:
    """(user message, expected answer) pairs that training never shows."""
    return [(p.format(n=n), count_answer(n)) for p, starts in HELD_OUT_STARTS.items() for n in starts]


def _chat_prompts() -> list[tuple[str, int]]:
    """Every (user message, start) that training uses."""
    return [
        (p.format(n=n), n)
        for p in CHAT_PROMPTS
        for n in range(MAX_NUMBER - COUNT_LENGTH + 1)
        if n not in HELD_OUT_STARTS.get(p, ())
    ]


def init_tiny_model(cfg: ModelConfig, seed: int) -> tuple[Llama4ForCausalLM, dict[int, ExpertShard]]:
    """Random fp32 weights: embeddings N(0, 1), norms 1, every matrix N(0, 1/fan_in); experts as trainable
    leaf tensors in the checkpoint's fused layout."""
    torch.manual_seed(seed)
    model = Llama4ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            elif name == "model.embed_tokens.weight":
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, p.shape[1] ** -0.5)  # nn.Linear [out, in]
    e, d, i = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    shards = {
        layer: ExpertShard(
            tuple(range(e)),
            (torch.randn(e, d, 2 * i) * d**-0.5).requires_grad_(),  # [E, D, 2I]
            (torch.randn(e, i, d) * i**-0.5).requires_grad_(),  # [E, I, D]
        )
        for layer in cfg.moe_layers
    }
    return model, shards


def init_tiny_tower(tower: VisionTower, seed: int) -> VisionTower:
    """Random fp32 weights in place: layer norms 1 and 0, biases 0, embeddings N(0, 0.02), matrices N(0, 1/fan_in)."""
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if "layernorm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1 or "embedding_vlm" in name:
                p.normal_(0.0, 0.02)
            else:
                p.normal_(0.0, p.shape[1] ** -0.5)
    return tower


def train(
    model: Llama4ForCausalLM,
    shards: dict[int, ExpertShard],
    tok: Tokenizer,
    steps: int,
    seed: int,
    tower: VisionTower | None = None,
) -> float:
    """AdamW on the counting task (and the squares, with a tower) for `steps` steps, in place; returns the last
    step's loss."""
    rng = random.Random(seed)
    params = list(model.parameters()) + [t for s in shards.values() for t in (s.gate_up_EDI2, s.down_EID)]
    params += list(tower.parameters()) if tower is not None else []
    squares = _squares(tok, tower)
    opt = torch.optim.AdamW(params, lr=LEARNING_RATE, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: _lr_factor(step, steps))
    transport = LocalTransport(shards)
    model.train()
    loss_value, t0 = float("nan"), time.monotonic()
    with _fixed_threads(TRAIN_THREADS):
        for step in range(steps):
            examples = [_example(tok, rng) for _ in range(BATCH_SIZE)]
            examples += [squares.example(rng) for _ in range(IMAGE_BATCH_SIZE if squares else 0)]
            loss = _loss(model, transport, examples, tower, squares)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_value = loss.item()
            if step % 50 == 0 or step == steps - 1:
                log.info("step %d/%d loss %.4f (%.1f s)", step + 1, steps, loss_value, time.monotonic() - t0)
    model.eval()
    if tower is not None:
        tower.eval()
    log.info("trained %d steps in %.1f s, final loss %.4f", steps, time.monotonic() - t0, loss_value)
    return loss_value


_CHAT_PROMPTS = _chat_prompts()


def _lr_factor(step: int, steps: int) -> float:
    if step < WARMUP_STEPS:
        return (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))  # cosine from 1 down to 0.1


def _squares(tok: Tokenizer, tower: VisionTower | None) -> SquareExamples | None:
    if tower is None:
        return None
    cfg = tower.config
    return SquareExamples(tok, ImageProcessor(cfg.image_size), cfg.patches_per_tile, IGNORE)


def _example(tok: Tokenizer, rng: random.Random) -> tuple[list[int], list[int], None]:
    """Token ids and their targets (the next token, or IGNORE where nothing is predictable); no image."""
    if rng.random() < 0.5:
        user, start = rng.choice(_CHAT_PROMPTS)
        ids = tok.encode(chat_text(user, count_answer(start)), add_special_tokens=False).ids
        learn_from = len(tok.encode(chat_text(user), add_special_tokens=False).ids)  # train the answer only
    else:
        start = rng.randint(0, MAX_NUMBER - 3)
        stop = min(MAX_NUMBER, start + rng.randint(3, 40))
        ids = tok.encode(" ".join(str(n) for n in range(start, stop + 1))).ids  # BOS added
        learn_from = 2  # the first number is a free choice
    targets = [t if j >= learn_from else IGNORE for j, t in enumerate(ids[1:], start=1)] + [IGNORE]
    return ids, targets, None


def _loss(model: Llama4ForCausalLM, transport: LocalTransport, examples: list, tower=None, squares=None):
    """Cross-entropy over a flat batch of (ids, targets, tiles or None) examples; image rows take the tower's
    features at their `<|patch|>` positions."""
    seqs, start = [], 0
    for slot, (ids, _, _) in enumerate(examples):
        seqs.append(SeqSlice(start=start, length=len(ids), pos0=0, slot=slot))
        start += len(ids)
    ids_T = torch.tensor([t for ids, _, _ in examples for t in ids])
    targets_T = torch.tensor([t for _, targets, _ in examples for t in targets])
    tiles = [pixels for _, _, pixels in examples if pixels is not None]
    embeds_TD = None
    if tiles:
        features_PD = tower(torch.cat(tiles))
        embeds_TD = merge_image_features(model.model.embed_tokens(ids_T), ids_T, features_PD, squares.tokens.patch)
    batch = ForwardBatch(tuple(seqs))
    logits_TV = model(ids_T, batch, ContiguousKVCache(), transport, all_logits=True, embeds_TD=embeds_TD)
    return F.cross_entropy(logits_TV, targets_T, ignore_index=IGNORE)


@contextmanager
def _fixed_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
