"""Images on the router side: checking and decoding what a request sends, tiling, the prompt's image tokens, and
the features the engine merges (encoded in-process or by encoder actors)."""
