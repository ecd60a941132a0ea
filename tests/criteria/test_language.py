"""The criteria language, part 2 (SPEC §3.4): nodes, operators, validation, builder, fingerprint.

No database needed here; the executors are compared by ``test_differential.py``.
"""

from __future__ import annotations

from buckets import b, define_bucket

# --- existing definitions keep their hash (pinned before part 2 changed the model) -----------


def test_part_one_fingerprints_are_pinned():
    """Hashes computed with the code before part 2: upgrading must redeploy nothing."""
    before = {
        "34892e05643034f6295c5beb590e9fe0dc32183f112f1da236bcf588b96e1c9b": b.prop("a.b").exists(),
        "7995cd2a1f8eddacc62a0d3d91a9bfce942c59194961cb99726da5ff7151058c": b.all(
            b.prop("p").not_exists(),
            b.event("e").where(b.prop("k").eq(None)).within("1h").exactly(2),
        ),
        "632829264bbb329326496f888a1038e183a7e7b747a749dc6fa7d2a40e886ab2": b.any(
            b.prop("n").gte(2**63 + 1),
            b.prop("t").neq(""),
            b.event("x").within("7d").less_than(3),
        ),
    }
    for fingerprint, criteria in before.items():
        assert define_bucket(id="x", criteria=criteria).fingerprint == fingerprint
