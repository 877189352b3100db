"""The distillation plan: which layers form groups, which teacher runs exist, which run captures which
layers at which step and which queries, and which worker owns what. Pure functions of the job's
configuration and seed; nothing depends on the number of workers except the owner of each group.

- Layer groups: the eligible layers in order, cut into G contiguous blocks (sizes differ by at most
  one, larger blocks first). G is a configuration value, not the worker count.
- Teacher runs r = 0, 1, 2, ...: run r captures group g = r mod G only. Its (prompt, seed,
  resolution) is combination m of the job's prompts x seeds x resolutions (itertools.product order)
  in cycle c, where m runs over the naturals as r does but rotated within each round of G runs:
  m = k G + (g + k) mod G for round k = r div G. Over the runs every combination and cycle appears
  exactly once (no teacher run repeats), and each group sees every residue of m mod G, so a group
  never sees only a fixed subset of the prompts (plain m = r would give group g only the prompts
  with m = g mod gcd(G, P)). Cycle 0 uses the listed seeds; cycle c > 0 derives new ones from them.
- Group g is owned by worker g mod W; run r executes on the owner of its group.
- Swap set of run r at step s: n ~ U{min_swap, max_swap} of the group's layers, chosen uniformly,
  from a generator keyed by (job seed, r, s).
- Query subsample of (r, s, layer) at N tokens: `cap` evenly spaced indices round(linspace(0, N - 1,
  cap)) over the whole sequence (text included), or `cap` uniformly drawn ones from a generator keyed
  by (job seed, r, s, layer); all of them when cap >= N.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from core.flow.seeds import cpu_generator, derive_seed

QUERY_MODES = ("even", "random")
QueryMode = Literal["even", "random"]
DEFAULT_MAX_GROUPS = 8


def default_group_count(n_layers: int) -> int:
    return max(1, min(n_layers, DEFAULT_MAX_GROUPS))


def layer_groups(layers: Sequence[str], groups: int) -> tuple[tuple[str, ...], ...]:
    """`layers` in order, cut into `groups` contiguous blocks whose sizes differ by at most one."""
    if not 1 <= groups <= len(layers):
        raise ValueError(
            f"distill.layer_groups must be in [1, {len(layers)}] (the layer count), got {groups}"
        )
    if len(set(layers)) != len(layers):
        raise ValueError(f"distill layers must be distinct, got {list(layers)}")
    size, extra = divmod(len(layers), groups)
    out, start = [], 0
    for g in range(groups):
        stop = start + size + (g < extra)
        out.append(tuple(layers[start:stop]))
        start = stop
    return tuple(out)


@dataclass(frozen=True, kw_only=True)
class PlanConfig:
    """seed: the job seed; groups: G; min_swap, max_swap: layers captured per step (-1: the whole group);
    query_cap and query_mode: the query subsample of a capture."""

    seed: int
    groups: int
    min_swap: int = 1
    max_swap: int = -1
    query_cap: int = 128
    query_mode: QueryMode = "even"

    def __post_init__(self) -> None:
        if self.groups < 1:
            raise ValueError(f"distill.layer_groups must be >= 1, got {self.groups}")
        if self.min_swap < 1 and self.min_swap != -1:
            raise ValueError(f"distill.min_swap must be >= 1 or -1 (all), got {self.min_swap}")
        if self.max_swap < 1 and self.max_swap != -1:
            raise ValueError(f"distill.max_swap must be >= 1 or -1 (all), got {self.max_swap}")
        if self.max_swap != -1 and (self.min_swap == -1 or self.min_swap > self.max_swap):
            raise ValueError(f"distill.min_swap must be <= max_swap ({self.max_swap}), got {self.min_swap}")
        if self.query_cap < 1:
            raise ValueError(f"distill.query_cap must be >= 1, got {self.query_cap}")
        if self.query_mode not in QUERY_MODES:
            raise ValueError(f"distill.query_mode must be one of {QUERY_MODES}, got {self.query_mode!r}")


@dataclass(frozen=True, kw_only=True)
class TeacherRun:
    """Run `index`: group `group` captures; prompt `prompt_id`, listed seed `seed_id` (its value in
    cycle 0, a derived one after: `seed`), at height x width pixels."""

    index: int
    group: int
    prompt_id: int
    seed_id: int
    seed: int
    height: int
    width: int
    cycle: int


class DistillPlan:
    """The plan of one job over `layers` (its eligible layers, in model order)."""

    def __init__(
        self,
        layers: Sequence[str],
        cfg: PlanConfig,
        *,
        prompts: int,
        seeds: Sequence[int],
        resolutions: Sequence[tuple[int, int]],
    ) -> None:
        if prompts < 1 or not seeds or not resolutions:
            raise ValueError(
                f"a distill plan needs prompts, seeds and resolutions, got {prompts} prompts, "
                f"seeds {list(seeds)}, resolutions {list(resolutions)}"
            )
        self.cfg = cfg
        self.layers = tuple(layers)
        self.groups = layer_groups(self.layers, cfg.groups)
        self._group_of = {layer: g for g, group in enumerate(self.groups) for layer in group}
        self._combos = list(itertools.product(range(prompts), range(len(seeds)), range(len(resolutions))))
        self.seeds = tuple(seeds)
        self.resolutions = tuple(tuple(r) for r in resolutions)

    def group_of(self, layer: str) -> int:
        return self._group_of[layer]

    def run(self, index: int) -> TeacherRun:
        if index < 0:
            raise ValueError(f"teacher run index must be >= 0, got {index}")
        g_count = len(self.groups)
        group, round_ = index % g_count, index // g_count
        m = round_ * g_count + (group + round_) % g_count
        cycle, combo = divmod(m, len(self._combos))
        prompt_id, seed_id, res_id = self._combos[combo]
        listed = self.seeds[seed_id]
        seed = listed if cycle == 0 else derive_seed(listed, "distill-cycle", cycle)
        height, width = self.resolutions[res_id]
        return TeacherRun(
            index=index,
            group=group,
            prompt_id=prompt_id,
            seed_id=seed_id,
            seed=seed,
            height=height,
            width=width,
            cycle=cycle,
        )

    @staticmethod
    def worker_of_group(group: int, workers: int) -> int:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        return group % workers

    def worker_of_run(self, index: int, workers: int) -> int:
        return self.worker_of_group(index % len(self.groups), workers)

    def assignment(self, workers: int) -> dict[str, int]:
        """{layer: worker} for job.json."""
        return {layer: self.worker_of_group(self._group_of[layer], workers) for layer in self.layers}

    def swap_set(self, run: int, step: int) -> tuple[str, ...]:
        """The layers of run `run`'s group captured at sampler step `step`, in model order."""
        group = self.groups[run % len(self.groups)]
        lo = len(group) if self.cfg.min_swap == -1 else min(self.cfg.min_swap, len(group))
        hi = len(group) if self.cfg.max_swap == -1 else min(self.cfg.max_swap, len(group))
        gen = cpu_generator(derive_seed(self.cfg.seed, "swap", run, step))
        n = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        chosen = torch.randperm(len(group), generator=gen)[:n].sort().values.tolist()
        return tuple(group[i] for i in chosen)

    def query_index(self, run: int, step: int, layer: str, tokens: int) -> torch.Tensor:
        """The kept query positions [min(cap, tokens)] int64, sorted, for a capture of `tokens` tokens."""
        return query_subsample(
            tokens,
            self.cfg.query_cap,
            self.cfg.query_mode,
            seed=derive_seed(self.cfg.seed, "query", run, step, layer),
        )


def query_subsample(tokens: int, cap: int, mode: QueryMode, *, seed: int) -> torch.Tensor:
    """cap positions of 0..tokens-1 (all of them when cap >= tokens), sorted int64: evenly spaced
    (round half to even of linspace, distinct because the spacing is >= 1) or seeded uniform."""
    if tokens < 1 or cap < 1:
        raise ValueError(f"query subsample needs tokens >= 1 and cap >= 1, got {tokens}, {cap}")
    if cap >= tokens:
        return torch.arange(tokens)
    if mode == "even":
        return torch.linspace(0, tokens - 1, cap, dtype=torch.float64).round().long()
    if mode == "random":
        return torch.randperm(tokens, generator=cpu_generator(seed))[:cap].sort().values
    raise ValueError(f"query mode must be one of {QUERY_MODES}, got {mode!r}")
