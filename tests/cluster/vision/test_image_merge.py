"""Image features replace exactly the `<|patch|>` rows of the embeddings, in order; counts must agree."""

from __future__ import annotations

import pytest
import torch

from cluster.vision.merge import merge_image_features

PATCH = 7


def test_features_fill_patch_rows_in_order_and_nothing_else():
    ids_T = torch.tensor([1, PATCH, 3, PATCH, PATCH, 4])
    embeds_TD = torch.arange(12.0).reshape(6, 2)
    features_PD = -torch.arange(1.0, 7.0).reshape(3, 2)
    merged = merge_image_features(embeds_TD, ids_T, features_PD, PATCH)
    assert torch.equal(merged[[1, 3, 4]], features_PD)
    assert torch.equal(merged[[0, 2, 5]], embeds_TD[[0, 2, 5]])
    assert torch.equal(embeds_TD, torch.arange(12.0).reshape(6, 2))  # the input is left as it was


def test_feature_count_must_equal_patch_count():
    with pytest.raises(ValueError, match=r"2 <\|patch\|> \(id 7\) positions but 3 image feature rows"):
        merge_image_features(torch.zeros(4, 2), torch.tensor([PATCH, 0, PATCH, 0]), torch.zeros(3, 2), PATCH)
