"""The attention side. Three processes' code lives here, one folder each:
router_actor.py + engine/, request/, images/, experts/: the router actor (attention, KV cache, sampling);
gateway/: the serve process's front doors; encoder/: the vision encoder actor."""
