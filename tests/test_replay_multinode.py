"""Two replay stores on two nodes of a `ray.cluster_utils.Cluster` hold their own captures.

The Cluster is this module's own (temp dir, small resources); the driver leaves the session's Ray
for it and rejoins the session's Ray afterwards, so the other modules' `ray_cluster` is untouched.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import ray
import ray.cloudpickle
import test_replay_helpers
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from test_replay_helpers import make_capture, ram_tmpdir, remove, same_bits

from core.distill.ratio_limiter import RatioLimiterConfig
from core.distill.replay_policy import ReplayPolicyConfig
from runner.replay import ReplayConfig, client_for, client_for_node, connect_store, shutdown_store

pytestmark = [pytest.mark.cpu, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
ray.cloudpickle.register_pickle_by_value(test_replay_helpers)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def two_nodes():
    """A head and one more node (1 CPU each) in a temp dir of their own; the driver joins them."""
    session = ray.get_runtime_context().gcs_address if ray.is_initialized() else None
    ray.shutdown()
    root = tempfile.mkdtemp(prefix="tsr-mn-", dir="/tmp")  # short: Ray's socket paths live here
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "RAY_TMPDIR")}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), saved["PYTHONPATH"]]))  # its workers
    os.environ["RAY_TMPDIR"] = root  # where the Cluster writes its address file: its own, not the session's
    temp_dir = Path(root) / "ray"
    temp_dir.mkdir()
    cluster = None
    try:
        node_args = dict(num_cpus=1, temp_dir=str(temp_dir), object_store_memory=80 * 2**20)
        cluster = Cluster(initialize_head=True, head_node_args={**node_args, "include_dashboard": False})
        cluster.add_node(**node_args)
        ray.init(address=cluster.address, namespace="tessera")
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(root, ignore_errors=True)
        if session is not None:
            ray.init(address=session, namespace="tessera")


@ray.remote(num_cpus=1)
def produce(first: int, count: int, layer: str) -> tuple[str, list[int]]:
    """On whichever node this runs: insert captures first..first+count-1 into that node's store."""
    client = client_for_node()
    orders = [client.insert(make_capture(first + i, layer), timeout_s=60).order for i in range(count)]
    return ray.get_runtime_context().get_node_id(), orders


def test_two_stores_on_two_nodes_hold_their_own_captures(two_nodes, tmp_path):
    ram = ram_tmpdir("tsr-replay-mn-")
    cfg = ReplayConfig(
        ram_dir=str(ram / "{node}"),
        disk_dir=str(tmp_path / "{node}"),
        policy=ReplayPolicyConfig(
            ram_bytes=10**6,
            disk_bytes=10**6,
            limiter=RatioLimiterConfig(samples_per_insert=1, error_buffer=100),
        ),
    )
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    assert len(nodes) == 2
    handles = {node: connect_store(cfg, node) for node in nodes}
    try:
        for node, handle in handles.items():
            assert ray.get(handle.placement.remote())["node_id"] == node
        pinned = {node: NodeAffinitySchedulingStrategy(node, soft=False) for node in nodes}
        ran = ray.get(
            [
                produce.options(scheduling_strategy=pinned[nodes[0]]).remote(0, 3, "single:0"),
                produce.options(scheduling_strategy=pinned[nodes[1]]).remote(100, 2, "single:0"),
            ]
        )
        assert [r[0] for r in ran] == nodes  # each producer ran on its node, and wrote to its store
        expected = {nodes[0]: [0, 1, 2], nodes[1]: [100, 101]}
        for node, handle in handles.items():
            client = client_for(handle)
            assert client.stats().policy["captures"] == len(expected[node])
            seen = set()
            for _ in range(12):
                (s,) = client.sample("single:0", 1)
                assert s.ref.path.startswith(str(ram / node))  # the node's own RAM tier
                capture_id = expected[node][s.ref.order]
                assert same_bits(s.capture, make_capture(capture_id, "single:0"))
                seen.add(capture_id)
            assert seen == set(expected[node])
    finally:
        for handle in handles.values():
            shutdown_store(handle)
        remove(ram)
