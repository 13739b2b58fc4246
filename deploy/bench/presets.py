"""The checkpoints the benchmarks can generate (`--bench-model`): overrides of the tiny Scout preset. No torch
here, so the command line can list them without loading it."""

from __future__ import annotations

BENCH_MODELS: dict[str, dict] = {
    "tiny": {},  # hidden 64, 4 layers: every layer MoE, 16 experts, top-1
    # the fast-path benchmark (issue 12): hidden 256, 8 MoE layers of 16 experts 512 wide, top-1
    "moe-256": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "intermediate_size_mlp": 1024,
        "num_hidden_layers": 8,
        "moe_layers": list(range(8)),
        "no_rope_layers": [1, 1, 1, 0] * 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
    },
}
