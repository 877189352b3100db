"""The replay policy alone (core/distill): budgets, eviction order, reuse cap, rate limiter, split, state."""

from __future__ import annotations

import random

import pytest

from core.distill.ratio_limiter import RatioLimiter, RatioLimiterConfig
from core.distill.replay_policy import Blocked, ReplayPolicy, ReplayPolicyConfig
from core.distill.tiers import CaptureTooLarge

pytestmark = pytest.mark.cpu
FREE = RatioLimiterConfig(samples_per_insert=1, error_buffer=10**9)  # never limits in practice


def insert(p: ReplayPolicy, layer: str, nbytes: int, log: list | None = None) -> int:
    """The runner's insert protocol with the file work left out; logs (kind, order) steps."""
    verdict = p.check_insert(layer, nbytes)
    assert not isinstance(verdict, Blocked), verdict
    while (a := p.next_room_action(nbytes)) is not None:
        p.apply(a)
        if log is not None:
            log.append((a.kind, a.order))
    r = p.reserve(layer, nbytes)
    p.commit(r.order)
    if log is not None:
        log.append(("insert", r.order))
    return r.order


def test_eviction_is_oldest_first_across_layers():
    # RAM holds 3 bytes, disk 4; layer a's captures are 1 byte, b's 2. By hand: orders 0, 1 fill RAM
    # (2 bytes); 2 (b) needs 2: spill 0. 3: spill 1. 4 (b): spill 2 (disk 0,1,2 = 4 bytes, full).
    # 5 (b) needs 2 with RAM [3, 4] full: spill 3 needs 1 on disk: evict 0; then spill 4 (2 bytes) needs
    # 2 more: evict 1, evict 2; then insert. 6 fits. 7: spill 5 after evicting 3. 8: spill 6 after
    # evicting 4. Evictions run 0, 1, 2, 3, 4: the oldest first, whichever layer it is.
    p = ReplayPolicy(ReplayPolicyConfig(ram_bytes=3, disk_bytes=4, limiter=FREE))
    log: list = []
    for layer in "aababbaab":
        insert(p, layer, {"a": 1, "b": 2}[layer], log)
    assert log == [
        ("insert", 0), ("insert", 1), ("spill", 0), ("insert", 2), ("spill", 1), ("insert", 3),
        ("spill", 2), ("insert", 4), ("evict", 0), ("spill", 3), ("evict", 1), ("evict", 2),
        ("spill", 4), ("insert", 5), ("insert", 6), ("evict", 3), ("spill", 5), ("insert", 7),
        ("evict", 4), ("spill", 6), ("insert", 8),
    ]  # fmt: skip
    assert p.ledgers["ram"].ready == [7, 8] and p.ledgers["disk"].ready == [5, 6]
    assert [e for e in log if e[0] == "evict"] == [("evict", i) for i in range(5)]


@pytest.mark.parametrize("ram,disk", [(1000, 3000), (0, 2000), (2000, 0)])
def test_sustained_insert_of_ten_times_the_budget_never_exceeds_a_tier(ram, disk):
    p = ReplayPolicy(ReplayPolicyConfig(ram_bytes=ram, disk_bytes=disk, limiter=FREE))
    rng = random.Random(0)
    total = 0
    while total < 10 * (ram + disk):
        layer = rng.choice(["double:0", "single:1", "single:2"])
        nbytes = rng.randint(1, 400)
        verdict = p.check_insert(layer, nbytes)
        assert not isinstance(verdict, Blocked)
        while (a := p.next_room_action(nbytes)) is not None:
            p.apply(a)
            assert p.used("ram") <= ram and p.used("disk") <= disk  # after every step
        r = p.reserve(layer, nbytes)
        assert p.used("ram") <= ram and p.used("disk") <= disk
        p.commit(r.order)
        total += nbytes
    kept = sorted(p.entries)
    assert kept == list(range(kept[0], p.next_order))  # a single producer: what is left is the newest
    if ram and disk:
        assert max(p.ledgers["disk"].ready) < min(p.ledgers["ram"].ready)  # disk holds the older ones


def test_a_capture_larger_than_a_tier_is_an_error_naming_it():
    p = ReplayPolicy(ReplayPolicyConfig(ram_bytes=100, disk_bytes=50, limiter=FREE))
    with pytest.raises(
        CaptureTooLarge, match="60-byte capture of layer 'x' exceeds the disk tier's whole budget of 50"
    ):
        p.check_insert("x", 60)


def test_writes_in_flight_block_rather_than_overshoot():
    p = ReplayPolicy(ReplayPolicyConfig(ram_bytes=10, disk_bytes=10, limiter=FREE))
    a = p.reserve("x", 6)
    assert p.check_insert("x", 6) == Blocked("writes_in_flight")  # only 4 of RAM are not in flight
    p.abort(a.order)
    assert p.used("ram") == 0 and p.check_insert("x", 6) == "train"


def test_ratio_limiter_golden_sequence():
    # spi 2, min_size 2, error_buffer 2: offset 4, band [2, 6]. A producer and a consumer alternate,
    # one attempt each per tick (producer first); I/S = allowed, i/s = refused. By hand:
    # t1 I (size 1 <= 2 is free), s (size 1 < 2); t2 I (free), S (2*2-0-1 = 3 >= 2);
    # t3 I ((3)*2-1 = 5 <= 6), S (6-1-1 = 4); t4 I (8-2 = 6), S (8-2-1 = 5); t5 i (10-3 = 7 > 6), S;
    # t6 I (10-4 = 6), S; t7 i, S; ... from then on two samples per insert.
    lim = RatioLimiter(cfg=RatioLimiterConfig(samples_per_insert=2, min_size=2, error_buffer=2))
    out = []
    for _ in range(10):
        if lim.can_insert():
            lim.admit()
            lim.commit()
            out.append("I")
        else:
            out.append("i")
        if lim.can_sample(1):
            lim.sampled(1)
            out.append("S")
        else:
            out.append("s")
    assert "".join(out) == "IsISISISiSISiSISiSIS"
    assert (lim.inserts, lim.samples) == (7, 9)


def test_ratio_limiter_blocks_a_consumer_that_runs_ahead():
    lim = RatioLimiter(cfg=RatioLimiterConfig(samples_per_insert=0.5, min_size=1, error_buffer=1))
    # offset 0.5, band [-0.5, 1.5]. One insert (free), then samples: 0.5-0-1 = -0.5 ok, then -1.5 refused.
    lim.admit()
    lim.commit()
    assert lim.can_sample(1)
    lim.sampled(1)
    assert not lim.can_sample(1)
    assert lim.can_insert()  # and the producer may go on: 2*0.5-1 = 0 <= 1.5


def test_error_buffer_below_the_deadlock_bound_is_refused():
    with pytest.raises(ValueError, match=r"error_buffer must be >= max\(1, samples_per_insert\) = 4"):
        RatioLimiterConfig(samples_per_insert=4, error_buffer=3.9)


@pytest.mark.parametrize("spi", [0.25, 0.5, 1.0, 1.5, 3.0])
@pytest.mark.parametrize("min_size", [1, 3])
def test_limiter_at_the_smallest_band_never_refuses_both_sides(spi, min_size):
    # Reverb's condition: with error_buffer = max(1, spi) some call is always allowed, whatever the
    # history of inserts, samples and deletes (a random walk over the allowed moves).
    lim = RatioLimiter(
        cfg=RatioLimiterConfig(samples_per_insert=spi, min_size=min_size, error_buffer=max(1, spi))
    )
    rng = random.Random(1)
    for _ in range(3000):
        moves = [m for m, ok in (("i", lim.can_insert()), ("s", lim.can_sample(1))) if ok]
        assert moves, lim.describe()
        if lim.size > 0 and rng.random() < 0.1:
            lim.deleted()  # an eviction or a retirement at the reuse cap
            continue
        if rng.choice(moves) == "i":
            lim.admit()
            lim.commit()
        else:
            lim.sampled(1)


def test_reuse_cap_golden_sequence():
    p = ReplayPolicy(ReplayPolicyConfig(ram_bytes=100, disk_bytes=0, reuse_cap=2, limiter=FREE, seed=3))
    for _ in range(3):
        insert(p, "single:0", 10)
    seq = []
    while not isinstance(got := p.sample("single:0", 1), Blocked):
        seq.extend(got)
    # Computed once with seed 3 and pinned; each capture is served exactly reuse_cap times.
    assert seq == [1, 2, 2, 0, 1, 0]
    assert sorted(seq) == [0, 0, 1, 1, 2, 2]
    assert got == Blocked("below_min_size")  # every capture retired: the layer is empty for sampling
    assert sorted(p.entries) == [0, 1, 2]  # retired captures keep their files until evicted by age


def test_uniform_sampler_is_seeded_and_uniform():
    def run(seed: int) -> list[int]:
        p = ReplayPolicy(ReplayPolicyConfig(ram_bytes=1000, disk_bytes=0, limiter=FREE, seed=seed))
        for _ in range(6):
            insert(p, "single:0", 10)
        insert(p, "single:1", 10)
        out = []
        for _ in range(3000):
            out.extend(p.sample("single:0", 2))
            p.sample("single:1", 1)  # another layer's draws do not move this layer's sequence
        return out

    a, b = run(5), run(5)
    assert a == b and a != run(6)
    assert 6 not in a
    counts = [a.count(i) for i in range(6)]
    assert all(abs(c - 1000) < 100 for c in counts), counts  # 6000 draws over 6: sd ~ 29 each
    pairs = list(zip(a[::2], a[1::2], strict=True))
    assert all(x != y for x, y in pairs)  # without replacement within one call


def test_validation_split_is_seeded_held_out_and_never_trained_on():
    p = ReplayPolicy(
        ReplayPolicyConfig(ram_bytes=10**6, disk_bytes=0, limiter=FREE, validation_fraction=0.25, seed=0)
    )
    splits = []
    for _ in range(40):
        order = insert(p, "single:3", 10)
        splits.append(p.entries[order].split)
    held = [i for i, s in enumerate(splits) if s == "val"]
    assert len(held) == 10 and all(4 * k <= h < 4 * (k + 1) for k, h in enumerate(held))  # one in each 4
    assert held[:3] == [3, 7, 11]  # the seeded phase (seed 0, layer single:3: phi < 0.25), pinned
    trained = {o for _ in range(300) for o in p.sample("single:3", 3)}
    assert trained == set(range(40)) - set(held)
    assert set(p.sample_validation("single:3", 100)) == set(held)
    other = ReplayPolicy(
        ReplayPolicyConfig(ram_bytes=10**6, disk_bytes=0, limiter=FREE, validation_fraction=0.25, seed=0)
    )
    for _ in range(40):
        insert(other, "single:3", 10)
    assert [e.split for e in other.entries.values()] == splits  # the rule is a function of the seed


def test_quarantined_bytes_count_until_discarded_first():
    p = ReplayPolicy(ReplayPolicyConfig(ram_bytes=30, disk_bytes=30, limiter=FREE))
    for _ in range(3):
        insert(p, "x", 10)
    p.quarantine(1)
    assert p.used("ram") == 30 and p.sample("x", 2) != [1] and 1 not in p.sample_validation("x", 5)
    log: list = []
    insert(p, "x", 10, log)
    assert log == [("discard", 1), ("insert", 3)]  # the damaged file goes before any good capture


def test_resume_gives_the_identical_sample_sequence():
    cfg = ReplayPolicyConfig(
        ram_bytes=60,
        disk_bytes=100,
        reuse_cap=3,
        limiter=RatioLimiterConfig(samples_per_insert=2, min_size=2, error_buffer=4),
        validation_fraction=0.2,
        seed=11,
    )

    def drive(p: ReplayPolicy, steps: range, rng: random.Random) -> list:
        out = []
        for _ in steps:
            layer = rng.choice(["double:0", "single:1"])
            if rng.random() < 0.4:
                if not isinstance(p.check_insert(layer, 10), Blocked):
                    insert(p, layer, 10)
            else:
                out.append(p.sample(layer, 1))
        return out

    whole = ReplayPolicy(cfg)
    first = drive(whole, range(200), random.Random(2))
    rest = drive(whole, range(400), random.Random(3))

    part = ReplayPolicy(cfg)
    assert drive(part, range(200), random.Random(2)) == first
    state = part.state_dict()
    resumed = ReplayPolicy(cfg)
    resumed.load_state_dict(state)
    assert drive(resumed, range(400), random.Random(3)) == rest
    assert resumed.state_dict() == whole.state_dict()
    assert any(isinstance(x, list) for x in rest) and any(isinstance(x, Blocked) for x in rest)


def test_state_with_another_seed_or_over_budget_is_refused():
    p = ReplayPolicy(ReplayPolicyConfig(ram_bytes=100, disk_bytes=0, limiter=FREE, seed=1))
    insert(p, "x", 80)
    state = p.state_dict()
    with pytest.raises(ValueError, match="saved with seed 1, the config has 2"):
        ReplayPolicy(ReplayPolicyConfig(ram_bytes=100, disk_bytes=0, limiter=FREE, seed=2)).load_state_dict(
            state
        )
    with pytest.raises(ValueError, match="holds 80 bytes in the ram tier, over its budget of 50"):
        ReplayPolicy(ReplayPolicyConfig(ram_bytes=50, disk_bytes=0, limiter=FREE, seed=1)).load_state_dict(
            state
        )
