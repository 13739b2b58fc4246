"""The engine's settings: the `scheduler:` section of the serve config, used as it is. No torch here, so the
command line can show the defaults without loading it."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.settings import SettingError, Settings, byte_size, integer, optional, setting


@dataclass(frozen=True)
class EngineConfig(Settings):
    """The `scheduler:` section of the serve config; the engine's batching and KV-cache budget."""

    max_num_seqs: int = setting(64, integer(1))  # sequences in one step's batch
    max_num_batched_tokens: int = setting(2048, integer(1))  # tokens per step: prefill pieces + one per decode
    max_model_len: int | None = setting(None, optional(integer(1)))  # None: the model's max_position_embeddings
    block_size: int = setting(16, integer(1))  # tokens per KV-cache block
    kv_cache_memory: int | None = setting(None, optional(byte_size()))  # bytes; None: 256 MiB on CPU, on CUDA
    # half the GPU memory left free after loading
    micro_batches: int | None = setting(None, optional(integer(1, 8)))  # micro-batches per step, run ping-pong
    # so that attention overlaps the remote experts; None: 2 on a CUDA router with expert workers and 8+
    # sequences, else 1 (on CPU they measured slower)

    def check_across(self) -> None:
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise SettingError(
                "max_num_batched_tokens",
                "every running sequence needs one token per step: expected "
                f"an integer >= max_num_seqs ({self.max_num_seqs}), got {self.max_num_batched_tokens}",
            )
