"""The vision encoder actor: a process of its own (its own GPU when it has one) that turns image bytes into image
features for every router."""
