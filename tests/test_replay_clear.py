"""Clearing one layer's captures from the replay store (an OOM ladder's rung): its training and
held-out captures and their files are gone, its budget is free, the other layers are untouched, the
layer's next captures and draws go on from its own counters, and a checkpoint keeps the result."""

from __future__ import annotations

import pytest
from test_replay_helpers import make_capture, ram_tmpdir, remove, same_bits

from core.distill.ratio_limiter import RatioLimiterConfig
from core.distill.replay_policy import Blocked, ReplayPolicyConfig
from runner.replay import ClearedLayer, ReplayClient, ReplayConfig, ReplayStore

pytestmark = pytest.mark.cpu
FREE = RatioLimiterConfig(samples_per_insert=1, error_buffer=10**9)


@pytest.fixture
def store(tmp_path):
    ram = ram_tmpdir("tsr-replay-clear-")
    cfg = ReplayConfig(
        ram_dir=str(ram),
        disk_dir=str(tmp_path / "disk"),
        policy=ReplayPolicyConfig(
            ram_bytes=10**6, disk_bytes=10**6, limiter=FREE, validation_fraction=0.25, seed=7
        ),
    )
    s = ReplayStore(cfg, "node0")
    yield s
    s.close(delete_files=True)
    remove(ram)


def test_clear_layer_drops_its_captures_and_files_only(store):
    client = ReplayClient.local(store)
    for i in range(8):
        client.insert(make_capture(i, "single:0"))
        client.insert(make_capture(100 + i, "single:1"))
    held = client.sample("single:0", 2)  # kept maps of single:0 in this process
    other_before = store.policy.summary()["layers"]["single:1"]
    files_before = sorted(p.name for p in store.dirs.dirs["ram"].glob("*.arrow"))
    used_before = store.policy.used("ram")

    cleared = client.clear_layer("single:0")

    assert cleared == ClearedLayer("single:0", 8, cleared.nbytes) and cleared.nbytes > 0
    layer = store.policy.summary()["layers"]["single:0"]
    assert layer["eligible"] == 0 and layer["validation"] == 0
    assert store.policy.summary()["layers"]["single:1"] == other_before
    assert store.policy.used("ram") == used_before - cleared.nbytes
    files = sorted(p.name for p in store.dirs.dirs["ram"].glob("*.arrow"))
    assert len(files) == len(files_before) - 8
    assert store.audit()["ram"][0] == store.audit()["ram"][1]  # the files on disk are what is counted
    assert (store.counters.cleared, store.counters.cleared_bytes) == (8, cleared.nbytes)
    assert client._mapped_bytes == sum(m.size() for m in client._maps.values())
    assert all(ref.layer != "single:0" for ref in (s.ref for s in client.sample("single:1", 2)))
    assert not any(key[0] == s.ref.order for s in held for key in client._maps)  # maps let go
    assert isinstance(store.sample("single:0", 1), Blocked)  # nothing left to train on
    assert client.sample_validation("single:0", 4) == []

    client.insert(make_capture(50, "single:0"))  # the layer's next capture, after the clear
    state = store.state_dict()
    (got,) = client.sample("single:0", 1)
    assert same_bits(got.capture, make_capture(50, "single:0"))
    store.load_state_dict(state)  # a checkpoint after the clear holds the cleared layer as it was
    (again,) = client.sample("single:0", 1)
    assert again.ref.order == got.ref.order
    assert store.policy.summary()["layers"]["single:0"]["eligible"] == 1


def test_clear_layer_of_an_unknown_layer_clears_nothing(store):
    assert ReplayClient.local(store).clear_layer("double:9") == ClearedLayer("double:9", 0, 0)
