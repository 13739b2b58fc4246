"""When the supervisor stops replacing a slot: after max_failures failed replacements within the window."""

from __future__ import annotations

from deploy.replacement_policy import ReplacementPolicy


def test_gives_up_after_max_failures_within_the_window_naming_the_last_cause():
    policy = ReplacementPolicy(max_failures=3, window_s=60)
    for t in (0, 10):
        policy.failed(1, t, "died while loading")
        assert policy.may_replace(1)
    policy.failed(1, 20, "OOM")
    assert not policy.may_replace(1) and "3 replacements failed within 60s (last: OOM)" in policy.given_up[1]
    assert policy.may_replace(0)


def test_failures_older_than_the_window_are_forgotten():
    policy = ReplacementPolicy(max_failures=2, window_s=60)
    policy.failed(0, 0, "x")
    policy.failed(0, 100, "y")
    assert policy.may_replace(0)


def test_a_success_clears_the_slot():
    policy = ReplacementPolicy(max_failures=2, window_s=60)
    policy.failed(0, 0, "x")
    policy.succeeded(0)
    policy.failed(0, 1, "y")
    assert policy.may_replace(0)
