"""The attention side: gateway, router actor, scheduler, KV cache, model runner, sampler."""
