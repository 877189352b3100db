"""The tiers' directories: shard paths, spills, deletions, quarantine, free-space checks and the lock.

Layout of each tier directory (they belong to the store; it deletes what it does not know):
    <dir>/.lock                        held (flock) while a store uses the directory
    <dir>/<order:012d>.arrow           a committed capture, or one being written
    <dir>/<order:012d>.arrow.partial   a spill being copied in (renamed when complete)
    <dir>/quarantine/<order:012d>.arrow  a damaged capture, kept for inspection until its bytes are needed

Spill = copy to a `.partial` name on the disk tier (in the kernel: copy_file_range / sendfile),
rename it complete, then unlink the RAM file. The disk tier was checked to have room first, and the
RAM file is removed only after the copy exists, so neither tier is ever over budget, and a crash in
between leaves either the complete RAM file or both (the partial is swept at the next start).

A reader that has a shard mapped keeps reading it after a spill or an eviction unlinks it: POSIX
keeps an unlinked file's pages until the last mapping goes, so a consumer never sees a capture
change under it. Those pages (on tmpfs, RAM) outlive the budget's count until the consumer drops
its views, which is why consumers copy a capture out and let the map go.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
from pathlib import Path

from core.distill.tiers import Tier

SHARD_RE = re.compile(r"^(\d{12})\.arrow(\.partial)?$")


class TierFull(OSError):
    """A tier's filesystem cannot hold what its budget allows: the message names the path and budget."""


class TierDirs:
    """The store's directories on this node, created and locked for its lifetime."""

    def __init__(self, dirs: dict[Tier, Path], budgets: dict[Tier, int]) -> None:
        self.dirs = {t: d for t, d in dirs.items() if budgets[t] > 0}
        self.budgets = budgets
        self._locks: list[int] = []
        for tier, d in self.dirs.items():
            (d / "quarantine").mkdir(parents=True, exist_ok=True)
            fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as err:
                os.close(fd)
                self.close()
                raise RuntimeError(f"another replay store uses the {tier} tier directory {d}") from err
            self._locks.append(fd)

    def close(self) -> None:
        for fd in self._locks:
            os.close(fd)  # releases the flock
        self._locks = []

    def path(self, tier: Tier, order: int, *, quarantined: bool = False) -> Path:
        name = f"{order:012d}.arrow"
        return self.dirs[tier] / "quarantine" / name if quarantined else self.dirs[tier] / name

    def check_filesystem(self, tier: Tier, need: int, *, used: int = 0) -> None:
        """Raise TierFull unless the tier's filesystem has `need` bytes free (the budget cannot be kept
        otherwise: something else is filling the disk)."""
        free = shutil.disk_usage(self.dirs[tier]).free
        if free < need:
            raise TierFull(
                errno.ENOSPC,
                f"{tier} tier {self.dirs[tier]}: the filesystem has {free} bytes free, {need} are needed "
                f"(budget {self.budgets[tier]} bytes, the store holds {used})",
            )

    def spill(self, order: int, *, disk_used: int) -> None:
        """Move capture `order` from the RAM tier to the disk tier."""
        src, dst = self.path("ram", order), self.path("disk", order)
        partial = dst.with_name(dst.name + ".partial")
        self.check_filesystem("disk", src.stat().st_size, used=disk_used)
        try:
            shutil.copyfile(src, partial)
        except OSError as err:
            partial.unlink(missing_ok=True)
            if err.errno == errno.ENOSPC:
                raise TierFull(
                    errno.ENOSPC,
                    f"disk tier {self.dirs['disk']}: no space left spilling capture {order} "
                    f"(budget {self.budgets['disk']} bytes, the store holds {disk_used})",
                ) from err
            raise
        os.replace(partial, dst)
        src.unlink()

    def delete(self, tier: Tier, order: int, *, quarantined: bool = False) -> None:
        self.path(tier, order, quarantined=quarantined).unlink(missing_ok=True)

    def quarantine(self, tier: Tier, order: int) -> Path:
        """Rename a damaged shard aside (same filesystem, so its bytes stay in the tier's count)."""
        dst = self.path(tier, order, quarantined=True)
        os.replace(self.path(tier, order), dst)
        return dst

    def sweep(self, keep: set[Path]) -> list[Path]:
        """Delete every shard-named file of the tiers that is not in `keep`; returns what went."""
        gone = []
        for d in self.dirs.values():
            for folder in (d, d / "quarantine"):
                for entry in os.scandir(folder):
                    p = Path(entry.path)
                    if entry.is_file() and SHARD_RE.match(entry.name) and p not in keep:
                        p.unlink()
                        gone.append(p)
        return gone

    def measured_bytes(self) -> dict[Tier, int]:
        """Bytes of every shard file in each tier (committed, partial, quarantined), from the filesystem."""
        return {tier: dir_bytes(d) for tier, d in self.dirs.items()}


def dir_bytes(d: Path) -> int:
    """Bytes of the shard-named files in a tier directory and its quarantine folder."""
    total = 0
    for folder in (d, d / "quarantine"):
        if folder.is_dir():
            for entry in os.scandir(folder):
                if entry.is_file() and SHARD_RE.match(entry.name):
                    total += _size_if_present(entry)
    return total


def _size_if_present(entry: os.DirEntry) -> int:
    """A listed file's size, or 0 if it was deleted since the listing (measuring races the store)."""
    try:
        return entry.stat().st_size
    except FileNotFoundError:
        return 0
