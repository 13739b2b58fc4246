"""The memory plan: what each actor of a deployment holds on its GPU, how much KV cache the routers have left, and
whether it fits, from config.json alone (no weights read). `moecluster plan` prints it; `serve` on CUDA refuses a
plan that does not fit before placing any actor.

Counting: router = the text model without routed experts (attention, gate, shared expert, dense MLPs, embeddings,
head) in bf16 (FP8 modules are dequantized there), plus every routed expert when there are no workers and the
vision tower when there are no encoders; worker = its slot's experts of every MoE layer (cluster/weight_bytes.py:
FP8 is 1 byte a weight plus fp32 scales per output channel); encoder = the vision tower in bf16. Every GPU keeps
RUNTIME_RESERVE for the CUDA context and activations. A router's KV capacity is the paged cache's own layout
(router/engine/paged_cache.py) of what is left, at the configured block size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from cluster.config import parse_model_config
from cluster.expert_map import PlacementError
from cluster.model import Llama4ForCausalLM
from cluster.quant_config import parse_quantization
from cluster.vision.config import parse_vision_config
from cluster.vision.model import VisionTower
from cluster.weight_bytes import expert_bytes
from deploy.cluster_config import ClusterConfig
from router.engine.paged_cache import plan_kv_layout

GIB = 2**30
GPUS = {"h100": 81559 * 2**20, "h200": 143771 * 2**20}  # total memory as the driver reports it (80 GB, 141 GB)
RUNTIME_RESERVE = 2 * GIB
BF16 = 2


@dataclass(frozen=True)
class Topology:
    gpu_bytes: int
    cluster: ClusterConfig  # routers, workers, expert_replicas, placement, vision_encoders
    expert_fp8: bool
    block_size: int = 16
    max_num_seqs: int = 64
    min_kv_tokens: int = 8192  # a router needs at least this much KV cache (one attention chunk) to fit


@dataclass(frozen=True)
class ActorPlan:
    role: str  # router | worker | encoder
    index: int
    weight_bytes: int
    kv_tokens: int | None  # routers only
    fits: bool


@dataclass(frozen=True)
class Plan:
    topology: Topology
    actors: tuple[ActorPlan, ...]
    model_bytes: int  # every weight once (experts in the plan's dtype), vision included
    problems: tuple[str, ...]  # what does not fit and what to change, naming the settings

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def gpus(self) -> int:
        return len(self.actors)


def memory_plan(raw: dict, topology: Topology, source: str = "config.json") -> Plan:
    """The plan for the model of config.json `raw` (parsed JSON) on `topology`."""
    cfg = parse_model_config(raw, source)
    has_vision = parse_vision_config(raw, source) is not None
    c = topology.cluster  # encoders asked for on a model without vision are refused at start-up, not here
    c = c.with_vision(has_vision) if has_vision else dataclasses.replace(c, vision_encoders=0)
    expert_map = c.expert_map(cfg)  # raises PlacementError naming the setting when experts cannot be placed
    per_expert = expert_bytes(cfg, topology.expert_fp8, BF16)
    all_experts = per_expert * cfg.num_local_experts * cfg.num_moe_layers
    router_weights, vision = _router_bytes(cfg), _vision_bytes(raw, source)
    usable = topology.gpu_bytes - RUNTIME_RESERVE
    on_router = router_weights + (all_experts if expert_map is None else 0) + (vision if c.encoders == 0 else 0)
    kv = plan_kv_layout(cfg, max(usable - on_router, 0), topology.block_size, topology.max_num_seqs, torch.bfloat16)
    kv_tokens = kv.token_capacity if usable > on_router else 0
    actors = [
        ActorPlan("router", r, on_router, kv_tokens, kv_tokens >= topology.min_kv_tokens) for r in range(c.routers)
    ]
    for slot in range(expert_map.num_workers if expert_map else 0):
        held = per_expert * sum(len(e) for e in expert_map.slot_experts(slot).values())
        actors.append(ActorPlan("worker", slot, held, None, held <= usable))
    actors += [ActorPlan("encoder", e, vision, None, vision <= usable) for e in range(c.encoders)]
    plan = Plan(dataclasses.replace(topology, cluster=c), tuple(actors), router_weights + vision + all_experts, ())
    return dataclasses.replace(plan, problems=tuple(_problems(plan, raw, source)))


def _router_bytes(cfg) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Llama4ForCausalLM(cfg).parameters()) * BF16


def _vision_bytes(raw: dict, source: str) -> int:
    vision = parse_vision_config(raw, source)
    if vision is None:
        return 0
    with torch.device("meta"):
        return sum(p.numel() for p in VisionTower(vision).parameters()) * BF16


def _problems(plan: Plan, raw: dict, source: str) -> list[str]:
    t, out = plan.topology, []
    usable = t.gpu_bytes - RUNTIME_RESERVE
    for role in ("router", "worker", "encoder"):
        failing = [a for a in plan.actors if a.role == role and not a.fits]
        if not failing:
            continue
        a = max(failing, key=lambda a: a.weight_bytes)
        of = (
            f" ({len(failing)} of {sum(x.role == role for x in plan.actors)} {role}s do not fit)"
            if len(failing) > 1
            else ""
        )
        what = f"{a.role} {a.index} needs {a.weight_bytes / GIB:.1f} GiB of weights{of}"
        if a.role == "router" and a.weight_bytes < usable:
            what = f"router {a.index} has room for {a.kv_tokens} KV tokens, under the {t.min_kv_tokens} it needs"
        out.append(
            f"{what}, with {usable / GIB:.1f} GiB usable per GPU ({_gib(t.gpu_bytes)} less "
            f"{RUNTIME_RESERVE / GIB:.0f} GiB reserved): {_remedy(a, plan, raw, source)}"
        )
    return out


def _remedy(actor: ActorPlan, plan: Plan, raw: dict, source: str) -> str:
    t, c = plan.topology, plan.topology.cluster
    if actor.role == "encoder":
        return "a larger GPU (cluster.gpu_memory)"
    if actor.role == "router" and (c.workers == 0 or c.encoders == 0):
        moves = ["cluster.workers >= 1 (experts off the router)"] if c.workers == 0 else []
        moves += ["cluster.vision_encoders: 1"] if c.encoders == 0 and _vision_bytes(raw, source) else []
        return "set " + " or ".join(moves) if moves else "a larger GPU (cluster.gpu_memory)"
    if actor.role == "router":
        return "a larger GPU (cluster.gpu_memory) or a smaller scheduler.max_num_seqs"
    hints = []
    for fp8 in sorted({t.expert_fp8, True}, reverse=True):
        workers = _fewest_workers(raw, t, fp8, source)
        if workers is not None:
            dtype = "" if fp8 == t.expert_fp8 else " with model.expert_dtype: fp8"
            hints.append(f"cluster.workers >= {workers}{dtype}")
    if c.expert_replicas > 1:
        hints.append("cluster.expert_replicas: 1")
    return "set " + " or ".join(hints) if hints else "a larger GPU (cluster.gpu_memory)"


def _fewest_workers(raw: dict, t: Topology, fp8: bool, source: str, most: int = 512) -> int | None:
    """The fewest workers (an even split) whose every slot fits, or None."""
    cfg = parse_model_config(raw, source)
    per_expert, usable = expert_bytes(cfg, fp8, BF16), t.gpu_bytes - RUNTIME_RESERVE
    copies = cfg.num_local_experts * t.cluster.expert_replicas
    for workers in range(max(t.cluster.workers, t.cluster.expert_replicas), min(most, copies) + 1):
        if -(-copies // workers) * cfg.num_moe_layers * per_expert <= usable:
            return workers
    return None


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def serve_plan(spec, cfg_raw: dict, source: str) -> Plan | None:
    """The plan `serve` checks (a DeploymentSpec on CUDA): GPU size from cluster.gpu_memory, else this process's
    first GPU; None on CPU or when neither is known."""
    c = spec.cluster
    if c.device != "cuda":
        return None
    gpu = c.gpu_memory or (torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None)
    if gpu is None:
        return None
    fp8 = spec.expert_dtype == "fp8" or (spec.expert_dtype == "auto" and stored_fp8_experts(cfg_raw, source))
    return memory_plan(cfg_raw, Topology(gpu, c, fp8, spec.engine.block_size, spec.engine.max_num_seqs), source)


def stored_fp8_experts(raw: dict, source: str) -> bool:
    """Whether config.json's quantization_config makes the routed experts FP8."""
    fp8 = parse_quantization(raw, source)
    cfg = parse_model_config(raw, source)
    return (
        fp8 is not None
        and bool(cfg.moe_layers)
        and fp8.quantizes(f"model.layers.{cfg.moe_layers[0]}.feed_forward.experts.0.gate_proj")
    )


def check_plan(plan: Plan) -> None:
    """Raise PlacementError with every problem (each names the settings to change) when the plan does not fit."""
    if not plan.fits:
        raise PlacementError("the memory plan does not fit (moecluster plan shows it): " + "; ".join(plan.problems))
