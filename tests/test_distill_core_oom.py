"""The OOM ladder: halving towards the floors rung by rung, the sticky stop, the record, state round trip."""

from __future__ import annotations

import json

import pytest

from core.distill.oom_ladder import OomLadder, TrainCaps

pytestmark = pytest.mark.cpu

CAPS = TrainCaps(query_cap=128, query_chunk=256, key_chunk=1024, landmark_cap=512)


def caps_tuple(c: TrainCaps) -> tuple[int, int, int, int]:
    return (c.query_cap, c.query_chunk, c.key_chunk, c.landmark_cap)


def test_ladder_halves_to_the_floors_then_stops_sticky():
    ladder = OomLadder(CAPS, landmark_floor=64, max_rungs=10)
    assert caps_tuple(ladder.caps) == (128, 256, 1024, 512) and not ladder.stopped
    seen = [caps_tuple(ladder.on_oom(update=u).caps) for u in (3, 5, 9)]
    assert seen == [(64, 128, 512, 256), (32, 64, 256, 128), (32, 64, 256, 64)]
    last = ladder.on_oom(update=11)  # nothing left to halve
    assert last.stopped and last.clear_buffer and caps_tuple(last.caps) == (32, 64, 256, 64)
    assert ladder.stopped
    with pytest.raises(ValueError, match="stopped training at update 11"):
        ladder.on_oom(update=12)
    record = [r.to_json() for r in ladder.record()]
    assert [(r["rung"], r["update"], r["stopped"], r["clear_buffer"]) for r in record] == [
        (0, 0, False, False),
        (1, 3, False, True),
        (2, 5, False, True),
        (3, 9, False, True),
        (4, 11, True, True),
    ]


def test_ladder_stops_after_max_rungs():
    ladder = OomLadder(CAPS, landmark_floor=64, max_rungs=1)
    assert not ladder.on_oom(update=0).stopped
    assert ladder.on_oom(update=1).stopped


def test_caps_below_a_floor_are_left_alone():
    ladder = OomLadder(
        TrainCaps(query_cap=16, query_chunk=64, key_chunk=2048, landmark_cap=8), landmark_floor=64
    )
    assert caps_tuple(ladder.on_oom(update=0).caps) == (16, 64, 1024, 8)


def test_ladder_state_round_trip_through_json():
    a = OomLadder(CAPS, landmark_floor=64)
    a.on_oom(update=7)
    b = OomLadder(CAPS, landmark_floor=64)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.record() == a.record() and b.on_oom(update=8) == a.on_oom(update=8)
    with pytest.raises(ValueError, match="floors"):
        OomLadder(CAPS, landmark_floor=32).load_state_dict(a.state_dict())
