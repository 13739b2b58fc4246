"""The engine core, in the router actor: scheduler, paged KV cache, model runner, sampler, and the thread that
drives them."""
