"""The replay store's configuration: where its two tiers live, and the policy's budgets and limits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.distill.replay_policy import ReplayPolicyConfig

NODE_FIELD = "{node}"


@dataclass(frozen=True, kw_only=True)
class ReplayConfig:
    """ram_dir: the RAM tier, a directory on a tmpfs (default /dev/shm: its files are page cache that
      the budget counts exactly and that every process of the node can memory-map);
    disk_dir: the disk tier, a directory on a local disk;
    policy: budgets in bytes, reuse cap, sample-to-insert ratio, validation fraction, seed.

    Either directory may contain "{node}", replaced by the Ray node id, for several Ray nodes on one
    host (tests). Leave it out on a cluster of one node per machine, so that a restarted cluster
    (new node ids) finds the shards of the checkpoint it resumes where the last one left them.
    """

    ram_dir: str = "/dev/shm/tessera-replay"
    disk_dir: str
    policy: ReplayPolicyConfig

    def __post_init__(self) -> None:
        for name in ("ram_dir", "disk_dir"):
            value = getattr(self, name)
            if not value or not Path(value.replace(NODE_FIELD, "x")).is_absolute():
                raise ValueError(f"replay {name} must be an absolute path, got {value!r}")
        if self.policy.ram_bytes and self.policy.disk_bytes and self._same(self.ram_dir, self.disk_dir):
            raise ValueError(f"replay ram_dir and disk_dir must differ, both are {self.ram_dir!r}")

    @staticmethod
    def _same(a: str, b: str) -> bool:
        return Path(a).resolve() == Path(b).resolve()

    def tier_dirs(self, node_id: str) -> dict[str, Path]:
        """The tier directories of the store on `node_id`."""
        return {
            "ram": Path(self.ram_dir.replace(NODE_FIELD, node_id)),
            "disk": Path(self.disk_dir.replace(NODE_FIELD, node_id)),
        }
