"""The expert side: the expert worker actor and its per-layer loop."""
