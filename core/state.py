"""Stateful: what must survive a restart is a typed object with state_dict() / load_state_dict().

The pattern of torch modules and optimizers (and of torchtitan's and lingua's TrainState): a state
dict is a plain nested structure of tensors, numbers, strings, lists and dicts, so the runner can
write it atomically and read it back with `torch.load(weights_only=True)`; the object, not the file
format, decides what it holds. A resumed job rebuilds its objects from their configs, then loads
their state, and continues exactly where it stopped (docs/state.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...
