"""The scheduler with fake model outputs (no torch): budgets, chunked prefill, chunk-aligned pieces,
preemption by recompute, abort, and every block returned."""

from __future__ import annotations

from router.engine.block_manager import KVBlockManager
from router.engine.scheduler import Scheduler, StopReason
from router.engine.sequence import SeqStatus, Sequence
from router.request.sampling_params import SamplingParams


def make(full_blocks=64, chunk_blocks=16, block=4, chunk=8, seqs=8, budget=16, max_len=1000):
    blocks = KVBlockManager(block, full_blocks, chunk_blocks, chunk, uses_full=True, uses_chunk=True)
    return Scheduler(blocks, seqs, budget, max_len, chunk), blocks


def request(request_id, prompt_ids, max_tokens, stop_token_ids=frozenset(), min_tokens=0) -> Sequence:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=min_tokens)
    return Sequence(request_id, prompt_ids, params, seed=0, stop_ids=frozenset(stop_token_ids))


def run_to_end(sched, fake_token=7, max_steps=500):
    """Drive with a fake model that always samples `fake_token`; returns finished reasons and all plans."""
    finished, plans = {}, []
    for _ in range(max_steps):
        if not sched.has_work():
            break
        plan = sched.schedule()
        plans.append(plan)
        sampled = {p.request_id: fake_token for p in plan.pieces if p.samples}
        finished.update({f.request_id: f.reason.value for f in sched.update(plan, sampled)})
    return finished, plans


def test_prefill_is_chunked_by_the_token_budget_and_chunk_boundaries():
    sched, _ = make(budget=6, chunk=8)
    sched.add(request("a", list(range(20)), max_tokens=1))
    plans = [sched.schedule()]
    sched.update(plans[0], {})
    plans.append(sched.schedule())
    assert [(p.pos0, len(p.token_ids), p.samples) for p in plans[0].pieces] == [(0, 6, False)]
    assert [(p.pos0, len(p.token_ids)) for p in plans[1].pieces] == [(6, 2)]  # stops at the chunk boundary 8


def test_running_requests_decode_one_token_per_step_and_finish_on_length():
    sched, blocks = make()
    sched.add(request("a", [1, 2, 3], max_tokens=4))
    finished, plans = run_to_end(sched)
    assert finished == {"a": "length"}
    assert [len(p.pieces[0].token_ids) for p in plans] == [3, 1, 1, 1]
    assert blocks.blocks_used == 0


def test_stop_token_finishes_but_not_before_min_tokens():
    sched, _ = make()
    sched.add(request("a", [1], max_tokens=10, stop_token_ids=frozenset({7}), min_tokens=3))
    finished, plans = run_to_end(sched, fake_token=7)
    assert finished == {"a": "stop"} and len(plans) == 3


def test_new_requests_join_a_running_batch():
    sched, _ = make(budget=64)
    sched.add(request("a", [1, 2], max_tokens=5))
    first = sched.schedule()
    sched.update(first, {"a": 7})
    sched.add(request("b", [3, 4, 5], max_tokens=5))
    second = sched.schedule()
    assert [(p.request_id, len(p.token_ids)) for p in second.pieces] == [("a", 1), ("b", 3)]


def test_max_num_seqs_bounds_the_running_batch():
    sched, _ = make(seqs=2, budget=64)
    for name in "abc":
        sched.add(request(name, [1, 2], max_tokens=3))
    plan = sched.schedule()
    assert [p.request_id for p in plan.pieces] == ["a", "b"] and len(sched.waiting) == 1


def test_out_of_blocks_preempts_the_newest_and_recomputes_it_later():
    sched, blocks = make(full_blocks=6, chunk_blocks=16, block=4, budget=64)  # 24 tokens of context in all
    sched.add(request("old", list(range(8)), max_tokens=8))
    sched.add(request("new", list(range(8)), max_tokens=8))
    finished, plans = run_to_end(sched)
    assert finished == {"old": "length", "new": "length"}
    assert sched.preemptions >= 1
    assert any("new" in p.preempted for p in plans) and not any("old" in p.preempted for p in plans)
    recompute = [pc for p in plans for pc in p.pieces if pc.request_id == "new" and pc.pos0 == 0]
    assert len(recompute) >= 2  # first admission, then at least one recompute from position 0
    assert blocks.blocks_used == 0


def test_chunk_layers_never_hold_more_than_one_chunk_per_sequence():
    sched, blocks = make(full_blocks=200, chunk_blocks=20, block=4, chunk=8, budget=64)
    for name in "abc":
        sched.add(request(name, list(range(13)), max_tokens=40))
    for _ in range(200):
        if not sched.has_work():
            break
        plan = sched.schedule()
        for seq in blocks.seqs.values():
            assert len(seq.chunk) <= 8 // 4
        sched.update(plan, {p.request_id: 7 for p in plan.pieces if p.samples})
    assert not sched.has_work() and blocks.blocks_used == 0


def test_abort_waiting_or_running_frees_everything():
    sched, blocks = make()
    sched.add(request("a", [1, 2, 3], max_tokens=9))
    sched.add(request("b", [1, 2, 3], max_tokens=9))
    sched.update(sched.schedule(), {"a": 7, "b": 7})
    assert sched.abort("a") and sched.abort("b") and not sched.abort("b")
    assert not sched.has_work() and blocks.blocks_used == 0


def test_abort_during_a_step_is_ignored_by_update():
    sched, _ = make()
    sched.add(request("a", [1, 2, 3], max_tokens=9))
    plan = sched.schedule()
    sched.abort("a")
    assert sched.update(plan, {"a": 7}) == []


def test_a_sequence_moves_waiting_running_finished_and_back_to_waiting_when_preempted():
    sched, _ = make(full_blocks=6, chunk_blocks=16, block=4, budget=64)
    old, new = request("old", list(range(8)), max_tokens=8), request("new", list(range(8)), max_tokens=8)
    sched.add(old)
    sched.add(new)
    assert old.status is new.status is SeqStatus.WAITING
    seen = set()
    for _ in range(100):
        if not sched.has_work():
            break
        plan = sched.schedule()
        seen |= {(s.request_id, s.status) for s in (old, new)}
        finished = sched.update(plan, {p.request_id: 7 for p in plan.pieces if p.samples})
        assert all(f.reason is StopReason.LENGTH for f in finished)
    assert ("new", SeqStatus.RUNNING) in seen and new.num_preemptions >= 1
    assert old.status is new.status is SeqStatus.FINISHED
    assert old.output_ids == new.output_ids == (7,) * 8
