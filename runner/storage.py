"""Where a job's results live: a folder on this machine or a shared volume, or an object store.

In the style of Ray Train's `storage_path`: a job whose `output` is a URI (`file:///shared/runs/x`,
`s3://bucket/runs/x`, `gs://...`, `hdfs://...`) writes to a local staging folder, and
`StagedOutput` copies the folder's new and changed files to the URI every `interval_s` seconds
while the job runs (so checkpoints reach storage soon after they are written) and once more at the
end, failed or not. Before the job starts it pulls what the URI already holds, so a re-run on any
node finds the previous run's checkpoints and resumes. Files go through `pyarrow.fs`.

Parsing a URI needs no network (`parse_location`); the first call that touches the store
(`check_reachable`, at submit and before a job starts) turns an unreachable one into a
`StorageError` naming the URI, within the store's own retry limits (about 6 s for S3 without a
network; GCS is given 15 s).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
OBJECT_STORES = ("s3", "gs", "gcs", "abfs", "abfss")
SYNC_INTERVAL_S = 30.0
GCS_RETRY_LIMIT_S = 15
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class StorageError(RuntimeError):
    """A storage location that cannot be parsed, reached, read or written; names the location."""


def is_uri(text: str) -> bool:
    return bool(_URI.match(text))


@dataclass(frozen=True)
class Location:
    """A storage folder. uri: as written (local paths as file:// URIs); path: the folder's path in
    its filesystem (no scheme, no query)."""

    uri: str
    scheme: str
    path: str

    def join(self, *parts: str) -> Location:
        rel = "/".join(p.strip("/") for p in parts if p.strip("/"))
        if not rel:
            return self
        split = urlsplit(self.uri)
        path = f"{split.path.rstrip('/')}/{rel}"
        query = f"?{split.query}" if split.query else ""
        return Location(f"{split.scheme}://{split.netloc}{path}{query}", self.scheme, f"{self.path}/{rel}")

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]


def parse_location(text: str) -> Location:
    """A path or URI as a Location, without touching the network; StorageError on a bad one."""
    if not is_uri(text):
        path = Path(text).expanduser().resolve()
        return Location(path.as_uri(), "file", str(path))
    split = urlsplit(text)
    scheme = split.scheme.lower()
    if scheme not in SCHEMES:
        raise StorageError(f"storage URI {text!r}: scheme {scheme!r} is not one of {SCHEMES}")
    if scheme == "file":
        if split.netloc not in ("", "localhost") or not split.path.startswith("/"):
            raise StorageError(f"storage URI {text!r}: a file URI needs an absolute path (file:///...)")
        return Location(text, scheme, split.path.rstrip("/") or "/")
    if not split.netloc:
        raise StorageError(f"storage URI {text!r} names no bucket or host")
    if ".." in split.path.split("/"):
        raise StorageError(f"storage URI {text!r} may not contain '..'")
    path = split.netloc + split.path.rstrip("/") if scheme in OBJECT_STORES else split.path.rstrip("/")
    return Location(text, scheme, path)


def open_fs(loc: Location) -> pafs.FileSystem:
    """The location's folder as a filesystem rooted there (paths inside it are relative)."""
    fs, path = _base_fs(loc)
    return pafs.SubTreeFileSystem(path, fs)


def _base_fs(loc: Location) -> tuple[pafs.FileSystem, str]:
    if loc.is_local:
        return pafs.LocalFileSystem(), loc.path
    uri = loc.uri
    if loc.scheme in ("gs", "gcs") and "retry_limit_seconds" not in uri:
        uri += ("&" if "?" in uri else "?") + f"retry_limit_seconds={GCS_RETRY_LIMIT_S}"
    try:
        return pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as err:  # pyarrow.ArrowInvalid is a ValueError
        raise StorageError(f"storage {loc.uri!r} cannot be opened: {_first_line(err)}") from None


def create_folder(loc: Location) -> None:
    """Make the location's folder (object stores have none to make)."""
    if loc.scheme in OBJECT_STORES:
        return
    fs, path = _base_fs(loc)
    try:
        fs.create_dir(path, recursive=True)
    except OSError as err:
        raise StorageError(f"storage {loc.uri!r}: cannot create the folder: {_first_line(err)}") from None


def check_reachable(loc: Location) -> bool:
    """Whether the location already holds something; StorageError when the store cannot be reached."""
    fs = open_fs(loc)
    try:
        return fs.get_file_info("").type != pafs.FileType.NotFound
    except OSError as err:
        raise StorageError(f"storage {loc.uri!r} is unreachable: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _local_files(folder: Path) -> dict[str, tuple[int, int]]:
    """Relative path -> (size, mtime_ns) of every file under folder, skipping dot-names (the
    temporary files of atomic writes)."""
    out = {}
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        st = path.stat()
        out[rel.as_posix()] = (st.st_size, st.st_mtime_ns)
    return out


def _upload(fs: pafs.FileSystem, src: Path, rel: str, atomic: bool) -> None:
    parent, _, name = rel.rpartition("/")
    if parent:
        fs.create_dir(parent, recursive=True)
    target = (f"{parent}/.{name}.part" if parent else f".{name}.part") if atomic else rel
    with src.open("rb") as f, fs.open_output_stream(target) as out:
        shutil.copyfileobj(f, out, 1 << 20)
    if atomic:
        fs.move(target, rel)  # a reader never sees half a file on a shared volume


def _download(fs: pafs.FileSystem, rel: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.part"
    with fs.open_input_stream(rel) as f, tmp.open("wb") as out:
        shutil.copyfileobj(f, out, 1 << 20)
    tmp.replace(dest)


def pull(loc: Location, dest: Path) -> list[str]:
    """Copy every file under the location into dest; returns their relative paths ([] if none)."""
    fs = open_fs(loc)
    try:
        infos = fs.get_file_info(pafs.FileSelector("", recursive=True, allow_not_found=True))
        files = sorted(
            i.path
            for i in infos
            if i.type == pafs.FileType.File and not any(p.startswith(".") for p in i.path.split("/"))
        )
        for rel in files:
            _download(fs, rel, dest / rel)
    except OSError as err:
        raise StorageError(f"reading {loc.uri!r} failed: {_first_line(err)}") from None
    return files


class StagedOutput:
    """A local staging folder kept in sync with a storage location (see the module docstring).

    with StagedOutput(loc) as staged: ... run the job with output=staged.folder ...

    The staging folder belongs to the location (runner-owned, under the temporary directory or
    `root`) and is emptied before the pull.
    """

    def __init__(
        self,
        loc: Location,
        *,
        root: Path | None = None,
        interval_s: float = SYNC_INTERVAL_S,
        stream=None,
    ) -> None:
        self.location = loc
        self.folder = staging_folder(loc, root)
        self.interval_s = interval_s
        self.stream = stream or sys.stdout
        self.pulled: list[str] = []
        self.uploads = 0
        self.sync_failures = 0
        self._pushed: dict[str, tuple[int, int]] = {}
        self._fs: pafs.FileSystem | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> StagedOutput:
        check_reachable(self.location)
        create_folder(self.location)
        self._fs = open_fs(self.location)
        # storage holds the truth: a previous run's leftovers on this node are not sent back to it
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        self.pulled = pull(self.location, self.folder)
        self._pushed = _local_files(self.folder)  # what storage already holds is not sent back
        if self.pulled:
            print(f"[storage] pulled {len(self.pulled)} files from {self.location.uri}", file=self.stream)
        self._thread = threading.Thread(target=self._loop, name="tessera-storage-sync", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.push()  # raises StorageError when the final copy fails: the staging folder keeps it all

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.push()
            except StorageError as err:  # designed: the next sync or the final one retries
                self.sync_failures += 1
                print(f"[storage] {err}; retrying at the next sync", file=self.stream, flush=True)

    @property
    def files(self) -> list[str]:
        """The files the location holds from this staging folder (pulled or pushed)."""
        with self._lock:
            return sorted(self._pushed)

    def push(self) -> int:
        """Upload the files that are new or changed since the last push; returns how many."""
        with self._lock:
            current = _local_files(self.folder)
            changed = [rel for rel, stamp in sorted(current.items()) if self._pushed.get(rel) != stamp]
            try:
                for rel in changed:
                    _upload(
                        self._fs, self.folder / rel, rel, atomic=self.location.scheme not in OBJECT_STORES
                    )
                    self._pushed[rel] = current[rel]
            except OSError as err:
                raise StorageError(
                    f"copying results to {self.location.uri!r} failed ({_first_line(err)}); "
                    f"they are in {self.folder}"
                ) from None
            self.uploads += len(changed)
            return len(changed)


def staging_folder(loc: Location, root: Path | None = None) -> Path:
    """The local folder a location stages into: <root>/<hash of the URI>/<its last name>, under the
    temporary directory by default."""
    digest = hashlib.sha256(loc.uri.encode()).hexdigest()[:12]
    root = root or Path(tempfile.gettempdir()) / "tessera-staging"
    return root / digest / (loc.name or "output")
