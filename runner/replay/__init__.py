"""The replay store: captures in Arrow IPC shard files under byte budgets, one store actor per node.

How a distillation worker uses it (docs/replay.md has the whole picture):

    # the job's driver, once per node that runs workers
    handle = connect_store(cfg, node_id)              # or connect_store(cfg, node_id, state=checkpoint)
    # a worker process on that node
    store = client_for_node()                          # finds "replay-<this node's id>"
    store.insert(capture)                              # writes the shard itself; waits if rate-limited
    batch = store.sample("single:3", n=1)              # [SampledCapture]: read-only zero-copy views
    held_out = store.sample_validation("single:3", 4)  # never used for training
    # the driver's checkpoint
    state = ray.get(handle.state_dict.remote())
"""

from runner.replay.actor import (
    NAMESPACE,
    StoreNotFound,
    client_for,
    client_for_node,
    connect_store,
    shutdown_store,
    store_name,
)
from runner.replay.client import Inserted, ReplayClient, ReplayTimeout, SampledCapture
from runner.replay.config import ReplayConfig
from runner.replay.store import (
    ClearedLayer,
    InsertTicket,
    QuarantineRecord,
    ReplayStats,
    ReplayStore,
    SampleRef,
)
from runner.replay.tier_files import TierFull

__all__ = [
    "NAMESPACE",
    "ClearedLayer",
    "InsertTicket",
    "Inserted",
    "QuarantineRecord",
    "ReplayClient",
    "ReplayConfig",
    "ReplayStats",
    "ReplayStore",
    "ReplayTimeout",
    "SampleRef",
    "SampledCapture",
    "StoreNotFound",
    "TierFull",
    "client_for",
    "client_for_node",
    "connect_store",
    "shutdown_store",
    "store_name",
]
