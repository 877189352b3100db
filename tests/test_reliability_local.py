"""`tessera run` without RAY_ADDRESS, as a user runs it on a machine where a `ray start` cluster is
recorded: the job must start a private Ray of its own, on loopback only, with token authentication,
say so, and end within seconds of a Ctrl-C with its checkpoints kept (docs/reliability.md).

One job runs for the whole module: two phases of the tiny model, the second long enough to look at
the running Ray (its listening sockets, read from /proc; an unauthenticated `ray status`) before
SIGINT goes to the job's process group, as a terminal's Ctrl-C does. The same command then resumes.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import ray
import yaml
from PIL import Image

pytestmark = pytest.mark.cpu
REPO = Path(__file__).resolve().parents[1]
POOL = "rel-local"
WAIT_S = 300


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _ip(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as /proc/net/tcp{,6} writes it (32-bit words in host order, little-endian here)."""
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    ip = ipaddress.IPv6Address(b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
    return ip.ipv4_mapped or ip


def listening(pids: list[int]) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket in LISTEN state that the processes hold."""
    owner: dict[str, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # the process has ended
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                owner[target[8:-1]] = pid
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in owner:  # 0A: TCP_LISTEN
                addr, port = fields[1].split(":")
                name = Path(f"/proc/{owner[fields[9]]}/comm").read_text().strip()
                out.append((str(_ip(addr)), int(port, 16), name))
    return out


class Job:
    """`python -m runner run` in its own process group, its output collected as it comes."""

    def __init__(self, args: list[str], env: dict) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runner", "run", *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            # as a terminal starts it: SIGINT at its default. An ignored SIGINT is inherited through
            # exec (Python then leaves it ignored), and a test earlier in the session can leave this
            # process ignoring it: the Ctrl-C would then never reach the job.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str) -> re.Match:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text)
            if found:
                return found
            if self.proc.poll() is not None:
                self.reader.join(5)
                return re.search(pattern, self.text) or pytest.fail(
                    f"exited before {pattern!r}:\n{self.text[-4000:]}"
                )
            time.sleep(0.2)
        pytest.fail(f"no {pattern!r} in {WAIT_S} s:\n{self.text[-4000:]}")

    def interrupt(self, wait_s: float = 120) -> float:
        """SIGINT to the job's process group, as Ctrl-C in a terminal; seconds until it exited (a job
        still running after wait_s fails the test with its output and where its processes wait)."""
        start = time.monotonic()
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            where = stacks(self.proc.pid)
            pytest.fail(f"the job did not exit within {wait_s} s of Ctrl-C:\n{self.text[-3000:]}\n{where}")
        self.reader.join(10)
        return time.monotonic() - start

    def end(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


def stacks(pid: int) -> str:
    """py-spy dumps of a stuck process and its descendants (what they wait on), where py-spy exists."""
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        return "(no py-spy to show where it waits)"
    out = []
    for p in [pid, *descendants(pid)]:
        dump = subprocess.run([str(spy), "dump", "--pid", str(p)], capture_output=True, text=True, timeout=60)
        out.append(f"--- pid {p}\n{dump.stdout[-3000:]}{dump.stderr[-500:]}")
    return "\n".join(out)


def ray_status(address: str, auth: str) -> subprocess.CompletedProcess:
    """`ray status` against the job's Ray, from this machine (a private Ray is reached on loopback only
    by a client that keeps 127.0.0.1 as it is: runner/ray_init.py)."""
    env = {**os.environ, "RAY_AUTH_MODE": auth, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "status", f"--address={address}"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def local_run(ray_cluster, assets, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("local")
    image = root / "crop.png"
    Image.open(assets / "images/eval/set5/bird.png").convert("RGB").crop((100, 100, 180, 164)).save(image)
    job = {
        "task": "upscale",
        "pool": {"name": POOL, "workers": 1},
        "model": {"kind": "random", "shape": "tiny"},
        "image": str(image),
        "scale": 2.0,
        "phases": 2,
        "steps": 20000,
        "denoise": [0.0005, 0.9],  # phase 1: 10 steps; phase 2: 18 000, ended by the Ctrl-C
        "tiling": {"method": "multidiffusion", "tile": 64, "overlap": 16},
        "outputs": {"phase_images": False, "latent_stats": False, "compare_bicubic": False},
    }
    (root / "job.yaml").write_text(yaml.safe_dump(job))
    args = [str(root / "job.yaml"), f"output={root / 'out'}"]
    # The machine's "recorded" cluster: the session's head, in the file `ray start` writes and a bare
    # ray.init() reads (<RAY_TMPDIR>/ray/ray_current_cluster). The job must not join it.
    tmp = tempfile.mkdtemp(prefix="tsr-", dir="/tmp")
    (Path(tmp) / "ray").mkdir()
    (Path(tmp) / "ray" / "ray_current_cluster").write_text(ray_cluster.address)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": tmp}
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE"):  # Ray's defaults, as a user's shell has them
        env.pop(name, None)
    run = Job(args, env)
    try:
        gcs = run.wait_for(r"started a private local Ray at (\S+) ").group(1)
        run.wait_for(r"\[phase2\] 1/")
        facts = {
            "running_record": json.loads((root / "out" / "job.json").read_text()),
            "gcs": gcs,
            "sockets": listening(descendants(run.proc.pid)),
            "status_without_token": ray_status(gcs, "disabled"),
            "status_with_token": ray_status(gcs, "token"),
            "phase2_reached": time.monotonic(),
        }
        facts["exit_s"] = run.interrupt()
    finally:
        run.end()
        shutil.rmtree(tmp, ignore_errors=True)
    facts.update(run=run, args=args, root=root, record=json.loads((root / "out" / "job.json").read_text()))
    resumed_env = {**env, "RAY_ADDRESS": ray_cluster.address, "RAY_AUTH_MODE": "disabled"}
    resumed = Job(args, resumed_env)
    try:
        resumed.wait_for(r"\[phase2\] 1/")
        # joined to the session's cluster, late in a full suite: its exit (driver disconnect from a
        # head that has served every runner test) is not what is tested here, so it gets longer
        facts["resumed_exit_s"] = resumed.interrupt(wait_s=300)
    finally:
        resumed.end()
        try:
            ray.kill(ray.get_actor(f"{POOL}-0", namespace="tessera"))
        except ValueError:
            pass
    facts.update(resumed=resumed, resumed_record=json.loads((root / "out" / "job.json").read_text()))
    return facts


def test_a_local_ray_listens_on_loopback_only(local_run):
    sockets = local_run["sockets"]
    port = int(local_run["gcs"].rsplit(":", 1)[1])
    assert any(p == port for _, p, _ in sockets), sockets  # the GCS is among what was read
    assert len({name for _, _, name in sockets}) >= 3, sockets  # GCS, raylet, agents, workers
    exposed = [s for s in sockets if not ipaddress.ip_address(s[0]).is_loopback]
    assert exposed == [], f"listening beyond loopback: {exposed}"


def test_a_local_ray_keeps_token_authentication_on(local_run):
    refused, accepted = local_run["status_without_token"], local_run["status_with_token"]
    assert refused.returncode != 0 and "InvalidAuthToken" in refused.stdout + refused.stderr
    assert accepted.returncode == 0, accepted.stderr[-2000:]
    assert local_run["record"]["ray"]["auth"] == "token"


def test_without_ray_address_the_job_starts_its_own_ray_and_says_so(local_run, ray_cluster):
    info = local_run["record"]["ray"]
    assert info["started"] is True and info["requested"] is None and info["loopback"] is True
    assert info["address"] == local_run["gcs"] != ray_cluster.address  # not the recorded cluster
    assert "(loopback only, token authentication), for this run only" in local_run["run"].text


def test_ctrl_c_ends_the_job_within_seconds_and_keeps_its_checkpoint(local_run):
    run, rec = local_run["run"], local_run["record"]
    assert run.proc.returncode == 130 and local_run["exit_s"] < 20, (run.proc.returncode, local_run["exit_s"])
    assert (
        "interrupted: stopped at phase2 " in run.text and "run the same command again to resume" in run.text
    )
    assert "Traceback" not in run.text
    assert rec["status"] == "interrupted" and rec["progress"]["label"] == "phase2"
    [(name, saved)] = rec["checkpoints"].items()
    assert (local_run["root"] / "out" / name).is_file() and saved["progress"]["label"] == "phase1"


def test_a_running_jobs_record_says_how_far_it_got(local_run):
    """job.json is rewritten after each checkpoint: a driver killed outright leaves this behind."""
    rec = local_run["running_record"]
    assert rec["status"] == "running" and rec["finished"] is None
    assert rec["progress"]["label"] == "phase1" and rec["progress"]["done"] == rec["progress"]["total"]
    assert [c["progress"]["label"] for c in rec["checkpoints"].values()] == ["phase1"]


def test_an_interrupted_job_resumes_where_it_stopped(local_run):
    resumed, rec = local_run["resumed"], local_run["resumed_record"]
    assert resumed.proc.returncode == 130, resumed.text[-3000:]
    assert "[phase1]" not in resumed.text and "[phase2] 0/" in resumed.text  # phase 1 was not run again
    assert rec["records"]["resumed_from_phase"] == 1 and rec["set_aside"] == []
    assert rec["attempt"] == 2 and rec["previous_attempts"][0]["status"] == "interrupted"
