"""Sample-to-insert ratio limiter, the semantics of Reverb's `SampleToInsertRatio` (Cassirer et al.
2021, "Reverb: A Framework For Experience Replay", arXiv 2102.04736, section 3.3).

It couples producers (teacher captures) to consumers (trainers) so that, on average, each capture is
sampled `samples_per_insert` times. With I inserts, S samples and D deletes so far (the current
size is I - D) and the band

    offset = samples_per_insert * min_size
    [min_diff, max_diff] = [offset - error_buffer, offset + error_buffer]

    an insert of 1 is allowed  iff  I + 1 - D <= min_size   or  (I + 1) * spi - S <= max_diff
    a sample of n is allowed   iff  I - D >= min_size      and  I * spi - S - n >= min_diff

Below `min_size` inserts are free and samples wait; above it the "error" I * spi - S stays in the
band. Deadlock freedom (Reverb's condition): if the band is at least 2 * max(1, spi) wide, i.e.
error_buffer >= max(1, spi), a producer and a consumer that each make one call at a time can never
both be refused. A refused insert means (I + 1) * spi - S > max_diff, so I * spi - S - 1 >
max_diff - spi - 1 >= min_diff and a sample of 1 is allowed (the refusal also implies the size is
>= min_size); symmetrically a refused sample leaves the insert allowed. Samples of n > 1 need
error_buffer >= max(n, spi) for the same argument.

Inserts in flight (admitted, not yet committed) count as inserts when admitting more, so several
producers cannot overshoot the band together. Deletes (evictions, captures retired at the reuse
cap, quarantines) shrink the size as Reverb's remover does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True, kw_only=True)
class RatioLimiterConfig:
    """samples_per_insert: mean samples per capture; min_size: captures before sampling starts;
    error_buffer: half-width of the allowed band (>= max(1, samples_per_insert))."""

    samples_per_insert: float = 4.0
    min_size: int = 1
    error_buffer: float = 8.0

    def __post_init__(self) -> None:
        if not self.samples_per_insert > 0:
            raise ValueError(f"samples_per_insert must be > 0, got {self.samples_per_insert}")
        if self.min_size < 1:
            raise ValueError(f"min_size must be >= 1, got {self.min_size}")
        if not 2 * self.error_buffer >= 2 * max(1.0, self.samples_per_insert):
            raise ValueError(
                f"error_buffer must be >= max(1, samples_per_insert) = {max(1.0, self.samples_per_insert):g} "
                f"(a band 2 * max(1, spi) wide cannot deadlock one producer and one consumer), "
                f"got {self.error_buffer}"
            )

    @property
    def min_diff(self) -> float:
        return self.samples_per_insert * self.min_size - self.error_buffer

    @property
    def max_diff(self) -> float:
        return self.samples_per_insert * self.min_size + self.error_buffer


@dataclass(kw_only=True)
class RatioLimiter:
    """The counters of one limiter (one per layer: each layer is its own "table")."""

    cfg: RatioLimiterConfig
    inserts: int = 0
    samples: int = 0
    deletes: int = 0
    pending: int = 0  # admitted inserts not yet committed

    @property
    def size(self) -> int:
        return self.inserts - self.deletes

    def can_insert(self) -> bool:
        future = self.inserts + self.pending + 1
        if future - self.deletes <= self.cfg.min_size:
            return True
        return future * self.cfg.samples_per_insert - self.samples <= self.cfg.max_diff

    def can_sample(self, n: int = 1) -> bool:
        if self.size < self.cfg.min_size:
            return False
        return self.inserts * self.cfg.samples_per_insert - self.samples - n >= self.cfg.min_diff

    def admit(self) -> None:
        self.pending += 1

    def abort(self) -> None:
        self.pending -= 1

    def commit(self) -> None:
        self.pending -= 1
        self.inserts += 1

    def sampled(self, n: int) -> None:
        self.samples += n

    def deleted(self) -> None:
        self.deletes += 1

    def state_dict(self) -> dict:
        """Counters only; inserts in flight are not state (a resumed store has none)."""
        return {"inserts": self.inserts, "samples": self.samples, "deletes": self.deletes}

    def load_state_dict(self, state: dict) -> None:
        self.inserts, self.samples, self.deletes = state["inserts"], state["samples"], state["deletes"]
        self.pending = 0

    def describe(self) -> dict:
        return {**asdict(self.cfg), **self.state_dict(), "pending": self.pending}
