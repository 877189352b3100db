"""The distillation plan: golden layer groups and run list, no repeated teacher run, every group sees
every prompt, swap sets and query subsamples keyed by the plan alone, and the same per-group plan for
1, 2 and 3 workers."""

from __future__ import annotations

import pytest
import torch

from core.distill.plan import DistillPlan, PlanConfig, layer_groups, query_subsample

pytestmark = pytest.mark.cpu

LAYERS = ("double:0", "double:1", "single:0", "single:1", "single:2", "single:3")


def plan(groups=3, prompts=2, seeds=(7, 9), resolutions=((64, 64), (96, 64)), **cfg) -> DistillPlan:
    return DistillPlan(
        LAYERS,
        PlanConfig(seed=5, groups=groups, **cfg),
        prompts=prompts,
        seeds=seeds,
        resolutions=resolutions,
    )


def test_layer_groups_golden():
    assert layer_groups(LAYERS, 4) == (
        ("double:0", "double:1"),
        ("single:0", "single:1"),
        ("single:2",),
        ("single:3",),
    )
    assert layer_groups(LAYERS, 1) == (LAYERS,)
    with pytest.raises(ValueError, match="distill.layer_groups must be in"):
        layer_groups(LAYERS, 7)


def test_run_list_golden():
    # G = 2; combinations (prompt, seed) in product order: (0,0) (0,1) (1,0) (1,1).
    # Run r: group r mod 2, round k = r div 2, combination m = 2k + (g + k) mod 2; m >= 4 is cycle 1.
    p = plan(groups=2, seeds=(7, 9), resolutions=((64, 64),))
    runs = [p.run(r) for r in range(6)]
    assert [(x.group, x.prompt_id, x.seed_id, x.cycle) for x in runs] == [
        (0, 0, 0, 0),
        (1, 0, 1, 0),
        (0, 1, 1, 0),
        (1, 1, 0, 0),
        (0, 0, 0, 1),
        (1, 0, 1, 1),
    ]
    assert [x.seed for x in runs[:4]] == [7, 9, 9, 7]  # cycle 0: the listed seeds
    assert runs[4].seed not in (7, 9) and runs[5].seed not in (7, 9, runs[4].seed)  # derived after


def test_no_teacher_run_repeats_and_every_group_sees_every_prompt():
    p = plan(groups=2, prompts=2, seeds=(7,), resolutions=((64, 64),))  # gcd(G, P) = 2
    runs = [p.run(r) for r in range(40)]
    keys = {(x.prompt_id, x.seed, x.height, x.width) for x in runs}
    assert len(keys) == 40
    for g in range(2):
        assert {x.prompt_id for x in runs if x.group == g} == {0, 1}


def test_swap_sets_are_seeded_subsets_of_the_runs_group():
    p = plan(groups=2, min_swap=1, max_swap=2)
    sets = [p.swap_set(run, step) for run in range(4) for step in range(6)]
    assert sets == [p.swap_set(run, step) for run in range(4) for step in range(6)]  # pure
    for run, s in zip([r for r in range(4) for _ in range(6)], sets, strict=True):
        group = p.groups[run % 2]
        assert 1 <= len(s) <= 2 and set(s) <= set(group) and list(s) == sorted(s, key=group.index)
    assert len({len(s) for s in sets}) == 2 and len(set(sets)) > 3  # sizes and choices vary
    assert all(len(p.swap_set(r, 0)) == 3 for r in range(4) for p in [plan(groups=2, min_swap=-1)])


def test_query_subsample_golden_and_keyed():
    assert query_subsample(10, 4, "even", seed=0).tolist() == [0, 3, 6, 9]
    assert query_subsample(10, 10, "random", seed=0).tolist() == list(range(10))
    r = query_subsample(100, 16, "random", seed=1)
    assert r.dtype == torch.int64 and r.tolist() == sorted(set(r.tolist())) and len(r) == 16
    p = plan(query_cap=16, query_mode="random")
    a = p.query_index(3, 2, "single:0", 100)
    assert torch.equal(a, p.query_index(3, 2, "single:0", 100))
    assert not torch.equal(a, p.query_index(3, 2, "single:1", 100))
    assert not torch.equal(a, p.query_index(3, 1, "single:0", 100))
    assert len(query_subsample(300, 128, "even", seed=0).unique()) == 128


def test_the_plan_of_each_group_is_the_same_for_one_two_and_three_workers():
    def per_group(workers: int) -> dict[int, list]:
        p = plan(groups=3, min_swap=1, max_swap=2, query_cap=8, query_mode="random")
        out: dict[int, list] = {g: [] for g in range(3)}
        executed = []
        for w in range(workers):  # each worker walks the run list and executes only its own runs
            for r in range(18):
                if p.worker_of_run(r, workers) != w:
                    continue
                executed.append(r)
                run = p.run(r)
                steps = [(s, p.swap_set(r, s)) for s in range(3)]
                queries = [p.query_index(r, s, layer, 40).tolist() for s, layers in steps for layer in layers]
                out[run.group].append((run, steps, queries))
        assert sorted(executed) == list(range(18))  # every run once, on exactly one worker
        return out

    one = per_group(1)
    assert per_group(2) == one and per_group(3) == one
    assert plan().assignment(2) == {
        "double:0": 0,
        "double:1": 0,
        "single:0": 1,
        "single:1": 1,
        "single:2": 0,
        "single:3": 0,
    }


@pytest.mark.parametrize(
    ("field", "value"),
    [("groups", 0), ("min_swap", 0), ("max_swap", -2), ("query_cap", 0), ("query_mode", "strided")],
)
def test_plan_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"distill.{field.replace('groups', 'layer_groups')}"):
        PlanConfig(seed=0, groups=2, **{field: value}) if field != "groups" else PlanConfig(
            seed=0, groups=value
        )
