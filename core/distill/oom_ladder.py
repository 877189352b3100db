"""The out-of-memory ladder of one layer's trainer: a pure policy, no torch calls.

Rung 0 is the configured caps. On each out-of-memory error of the layer's training step the caller
asks `on_oom()` and gets the next rung's caps, each halved towards its floor:

    query_cap     (the queries of a capture a step trains on)      floor 32
    query_chunk   (queries read out at once)                       floor 64
    key_chunk     (keys summarised at once)                        floor 256
    landmark_cap  (the landmark branch's image landmarks)          floor `landmark_floor`

and `clear_buffer=True`: the layer's replay captures were taken at the old caps (and their memory
is what the allocator needs back). When no cap can be halved any more, or after `max_rungs` rungs,
the layer stops training (`stopped`), sticky for the rest of the job: teacher sampling and the
other layers go on. Every rung is recorded (`record()`), for job.json.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

OOM_FORMAT = 1


@dataclass(frozen=True, kw_only=True)
class TrainCaps:
    query_cap: int
    query_chunk: int
    key_chunk: int
    landmark_cap: int

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value < 1:
                raise ValueError(f"oom caps.{name} must be >= 1, got {value}")


@dataclass(frozen=True, kw_only=True)
class OomRung:
    """One step of the ladder: rung 0 is the configured caps; `update` is the layer's update count."""

    rung: int
    update: int
    caps: TrainCaps
    clear_buffer: bool
    stopped: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "rung": self.rung,
            "update": self.update,
            **asdict(self.caps),
            "clear_buffer": self.clear_buffer,
            "stopped": self.stopped,
        }


FLOORS = {"query_cap": 32, "query_chunk": 64, "key_chunk": 256}


class OomLadder:
    """The ladder of one layer, starting at `caps`; `landmark_floor` is the student's landmark minimum."""

    def __init__(self, caps: TrainCaps, *, landmark_floor: int, max_rungs: int = 4) -> None:
        if landmark_floor < 1 or max_rungs < 1:
            raise ValueError(
                f"oom ladder needs landmark_floor >= 1 and max_rungs >= 1, got {landmark_floor}, {max_rungs}"
            )
        self.floors = TrainCaps(**FLOORS, landmark_cap=landmark_floor)
        self.max_rungs = max_rungs
        self._rungs = [OomRung(rung=0, update=0, caps=caps, clear_buffer=False, stopped=False)]

    @property
    def caps(self) -> TrainCaps:
        return self._rungs[-1].caps

    @property
    def stopped(self) -> bool:
        return self._rungs[-1].stopped

    def on_oom(self, update: int) -> OomRung:
        """The rung after an out-of-memory error at the layer's update `update`: halved caps, or stopped."""
        last = self._rungs[-1]
        if last.stopped:
            raise ValueError(
                f"oom ladder: the layer stopped training at update {last.update}; it cannot OOM again"
            )
        halved = {
            name: max(getattr(self.floors, name), value // 2) if value > getattr(self.floors, name) else value
            for name, value in asdict(last.caps).items()
        }
        caps = replace(last.caps, **halved)
        stop = caps == last.caps or len(self._rungs) > self.max_rungs
        rung = OomRung(
            rung=len(self._rungs),
            update=update,
            caps=last.caps if stop else caps,
            clear_buffer=True,
            stopped=stop,
        )
        self._rungs.append(rung)
        return rung

    def record(self) -> list[OomRung]:
        """Every rung so far, rung 0 first."""
        return list(self._rungs)

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": OOM_FORMAT,
            "floors": asdict(self.floors),
            "max_rungs": self.max_rungs,
            "rungs": [r.to_json() for r in self._rungs],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != OOM_FORMAT:
            raise ValueError(
                f"oom ladder state has format {state.get('format')!r}, this code reads {OOM_FORMAT}"
            )
        if TrainCaps(**state["floors"]) != self.floors or state["max_rungs"] != self.max_rungs:
            raise ValueError(
                f"oom ladder state has floors {state['floors']} / max_rungs {state['max_rungs']}, "
                f"this ladder "
                f"{asdict(self.floors)} / {self.max_rungs}"
            )
        rungs = []
        for r in state["rungs"]:
            caps = TrainCaps(**{k: r[k] for k in ("query_cap", "query_chunk", "key_chunk", "landmark_cap")})
            rungs.append(
                OomRung(
                    rung=r["rung"],
                    update=r["update"],
                    caps=caps,
                    clear_buffer=r["clear_buffer"],
                    stopped=r["stopped"],
                )
            )
        self._rungs = rungs
