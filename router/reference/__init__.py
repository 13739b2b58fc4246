"""The single-process reference: a plain decode loop over a contiguous KV cache, one sequence at a time. The
serving engine (paged cache, continuous batching) is tested against it."""
