"""Where one request's image features go: the prompt positions of its `<|patch|>` tokens, in order, with one
feature row each. A step's piece covers some positions of the prompt; `rows(pos0, n)` gives the features of the
patch positions among them, so a prefill chunk that splits an image takes exactly its share (and a preempted request
recomputed from position 0 takes them again). Tokens the model generates never take features, whatever their id.

Legend: P `<|patch|>` positions (= feature rows), D text hidden, R rows in one piece.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from router.request.errors import InvalidRequest


class PromptImages:
    def __init__(self, positions: list[int], features_PD: torch.Tensor):
        assert len(positions) == features_PD.shape[0], (len(positions), tuple(features_PD.shape))
        self.positions, self.features_PD = positions, features_PD

    @classmethod
    def of(
        cls, prompt_ids: Sequence[int], patch_id: int, features: Sequence[torch.Tensor], device: torch.device
    ) -> PromptImages:
        """InvalidRequest when the features do not fill the prompt's `<|patch|>` positions exactly."""
        positions = [i for i, t in enumerate(prompt_ids) if t == patch_id]
        rows = sum(f.shape[0] for f in features)
        if rows != len(positions):
            raise InvalidRequest(
                "images", f"the images give {rows} feature rows but the prompt holds {len(positions)} <|patch|> tokens"
            )
        return cls(positions, torch.cat(list(features)).to(device))

    def rows(self, pos0: int, n: int) -> tuple[list[int], torch.Tensor]:
        """(offsets within the piece [pos0, pos0 + n), their features [R, D]) of the patch positions in it."""
        lo, hi = bisect.bisect_left(self.positions, pos0), bisect.bisect_left(self.positions, pos0 + n)
        return [p - pos0 for p in self.positions[lo:hi]], self.features_PD[lo:hi]
