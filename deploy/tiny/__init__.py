"""The tiny Llama 4 checkpoints (Scout-like, Maverick-like) the demo, tests and benchmarks make for themselves."""
