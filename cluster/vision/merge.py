"""Puts image features into a prompt's embeddings: row i of the features replaces the embedding of the i-th
`<|patch|>` token, in order over the flat batch. Every other image token (`<|image_start|>`, separators, `<|image|>`,
`<|image_end|>`) keeps its text embedding (reference/llama4-vision.md, "Prompt layout").

Legend: T tokens, D text hidden, P `<|patch|>` tokens (= image feature rows).
"""

from __future__ import annotations

import torch

from cluster.model import Llama4ForCausalLM


def merge_image_features(
    embeds_TD: torch.Tensor, ids_T: torch.Tensor, features_PD: torch.Tensor, patch_id: int
) -> torch.Tensor:
    """A new [T, D] tensor: `embeds_TD` with the `<|patch|>` rows replaced by `features_PD`, in order."""
    patch_T = ids_T == patch_id
    n = int(patch_T.sum())
    if n != features_PD.shape[0]:
        raise ValueError(
            f"the tokens hold {n} <|patch|> (id {patch_id}) positions but {features_PD.shape[0]} image "
            f"feature rows were given"
        )
    merged_TD = embeds_TD.clone()
    merged_TD[patch_T] = features_PD.to(merged_TD.dtype)
    return merged_TD


def embed_with_images(
    model: Llama4ForCausalLM, ids_T: torch.Tensor, features_PD: torch.Tensor, patch_id: int
) -> torch.Tensor:
    """The `embeds_TD` to pass to `model.forward` for tokens `ids_T` whose `<|patch|>` rows take `features_PD`."""
    return merge_image_features(model.model.embed_tokens(ids_T), ids_T, features_PD, patch_id)


def scatter_rows(embeds_TD: torch.Tensor, rows_R: torch.Tensor, features_RD: torch.Tensor) -> torch.Tensor:
    """A new [T, D] tensor: `embeds_TD` with rows `rows_R` replaced by `features_RD` (the router's step: the rows are
    the image positions of each sequence's piece, chosen by position, so a generated token never takes features)."""
    merged_TD = embeds_TD.clone()
    merged_TD[rows_R] = features_RD.to(merged_TD.dtype)
    return merged_TD
