"""The tiny vision model's task: an image of one coloured square on a grey background, asked about in a chat, and
answered with the colour's name, so a demo's image answer is something a person can check:

    <|begin_of_text|><|header_start|>user<|header_end|>\\n\\n<|image|>What colour is the square?<|eot|>
    <|header_start|>assistant<|header_end|>\\n\\nred<|eot|>

with `<|image|>` expanded to the image's tokens as the server expands it (router/images/tokens.py). Images are
20-100 pixels a side, so they take 1 to 5 of the tiny tower's 56-pixel tiles (grids up to 2 x 2, plus the global
tile); the square covers 50-80% of the shorter side, anywhere, in a jittered shade of its colour.

Legend: H, W image height and width; T tiles, S tile side.
"""

from __future__ import annotations

import io
import random

import torch
from PIL import Image
from tokenizers import Tokenizer

from deploy.tiny.tokenizer import COLOURS, IMAGE, chat_text
from router.images.processor import ImageProcessor
from router.images.tokens import ImageTokens, image_token_ids

QUESTION = "What colour is the square?"
RGB = {  # far apart, so that a shade jittered by up to 20 per channel stays nearest its own colour
    "red": (225, 25, 25),
    "green": (25, 185, 45),
    "blue": (30, 60, 235),
    "yellow": (240, 230, 30),
    "purple": (155, 25, 205),
    "orange": (250, 125, 0),
}
assert tuple(RGB) == COLOURS
SIDES = (20, 100)
HELD_OUT_SEED = 10_000  # images drawn from seeds past this one are never trained on


def square_image(height: int, width: int, colour: str, rng: random.Random) -> torch.Tensor:
    """RGB uint8 [3, H, W]: grey background with a little noise, one square of `colour` somewhere on it."""
    grey = rng.randint(40, 215)
    gen = torch.Generator().manual_seed(rng.getrandbits(31))
    image_3HW = (grey + torch.randint(-10, 11, (3, height, width), generator=gen)).clamp(0, 255)
    side = max(2, int(min(height, width) * rng.uniform(0.5, 0.8)))
    top, left = rng.randint(0, height - side), rng.randint(0, width - side)
    shade = [min(255, max(0, c + rng.randint(-20, 20))) for c in RGB[colour]]
    image_3HW[:, top : top + side, left : left + side] = torch.tensor(shade)[:, None, None]
    return image_3HW.to(torch.uint8)


def square_png(colour: str, height: int = 48, width: int = 48, seed: int = HELD_OUT_SEED) -> bytes:
    """A PNG of a `colour` square, from a seed training never drew (for demos and tests)."""
    image_HW3 = square_image(height, width, colour, random.Random(seed)).permute(1, 2, 0).contiguous()
    out = io.BytesIO()
    Image.frombytes("RGB", (width, height), image_HW3.numpy().tobytes()).save(out, format="PNG")
    return out.getvalue()


class SquareExamples:
    """Training examples: token ids, their targets (the answer only; IGNORE elsewhere) and the image's tiles."""

    def __init__(self, tok: Tokenizer, processor: ImageProcessor, patches_per_tile: int, ignore: int):
        self.tok, self.processor, self.patches_per_tile, self.ignore = tok, processor, patches_per_tile, ignore
        self.tokens = ImageTokens.from_tokenizer(tok.token_to_id)

    def example(self, rng: random.Random) -> tuple[list[int], list[int], torch.Tensor]:
        colour = rng.choice(COLOURS)
        image = self.processor.tile(square_image(rng.randint(*SIDES), rng.randint(*SIDES), colour, rng))
        prompt = self.question(image.grid)
        ids = self._expand(chat_text(f"{IMAGE}{QUESTION}", colour), image.grid)
        targets = [t if j >= len(prompt) else self.ignore for j, t in enumerate(ids[1:], start=1)] + [self.ignore]
        return ids, targets, image.pixels_T3SS.float()

    def question(self, grid: tuple[int, int]) -> list[int]:
        """The chat prompt asking about an image with this tile grid, the image's tokens in place."""
        return self._expand(chat_text(f"{IMAGE}{QUESTION}"), grid)

    def _expand(self, text: str, grid: tuple[int, int]) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        at = ids.index(self.tokens.image)
        return ids[:at] + image_token_ids(grid, self.patches_per_tile, self.tokens) + ids[at + 1 :]
