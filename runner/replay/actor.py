"""One replay store per node: a Ray actor pinned to its node and found by name.

The store of node N is the actor "replay-<N>" (N = Ray's hex node id) in the "tessera" namespace,
placed with NodeAffinitySchedulingStrategy(N, soft=False): it runs on that node or not at all, since
its tier directories are that node's. It reserves no CPU (num_cpus=0), so it never takes a worker's
slot and always fits. It is detached (it outlives the driver that made it, like the model pools)
and is not restarted if it dies (max_restarts=0): a restart would silently start empty, so a dead
store is an error the job sees (ActorDiedError) and resumes from its checkpoint instead.

A worker process on a node finds its store with `client_for_node()` (its own node) and never needs
the driver's handle.
"""

from __future__ import annotations

import os

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from runner.replay.client import MAP_CACHE_BYTES, ReplayClient
from runner.replay.config import ReplayConfig
from runner.replay.store import ReplayStore

NAMESPACE = "tessera"


class StoreNotFound(LookupError):
    """No replay store runs on the node (the job's driver creates them with `connect_store`)."""


class ReplayStoreActor(ReplayStore):
    """The store as an actor, plus where it runs (for checks)."""

    def placement(self) -> dict:
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "pid": os.getpid()}


def store_name(node_id: str) -> str:
    return f"replay-{node_id}"


def current_node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def connect_store(cfg: ReplayConfig, node_id: str | None = None, *, state: dict | None = None):
    """The store actor of `node_id` (default: this process's node), created if it does not exist.

    state: a checkpoint (`state_dict()`) to resume from. A new store starts from it; an existing one
    loads it (dropping what it held since). Without it, a new store starts empty and an existing one
    is returned as it is. An existing store with another config is an error.
    """
    node_id = node_id or current_node_id()
    name = store_name(node_id)
    try:
        handle = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        handle = (
            ray.remote(ReplayStoreActor)
            .options(
                name=name,
                namespace=NAMESPACE,
                lifetime="detached",
                num_cpus=0,
                max_restarts=0,
                max_task_retries=0,
                get_if_exists=True,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            )
            .remote(cfg, node_id, state)
        )
        state = None  # the constructor loaded it (or the store existed: checked below)
    existing = ray.get(handle.config.remote())
    if existing != cfg:
        raise ValueError(f"the replay store {name} exists with another config: {existing} (asked: {cfg})")
    if state is not None:
        ray.get(handle.load_state_dict.remote(state))
    return handle


def shutdown_store(handle, *, delete_files: bool = True) -> None:
    """End a store actor, deleting its shard files unless asked to keep them (to resume later)."""
    ray.get(handle.close.remote(delete_files=delete_files))
    ray.kill(handle)


def client_for_node(node_id: str | None = None, *, map_cache_bytes: int = MAP_CACHE_BYTES) -> ReplayClient:
    """A client of the store on `node_id` (default: the calling process's node)."""
    node_id = node_id or current_node_id()
    try:
        handle = ray.get_actor(store_name(node_id), namespace=NAMESPACE)
    except ValueError as err:
        raise StoreNotFound(
            f"no replay store on node {node_id}: the job's driver creates it (connect_store)"
        ) from err
    return client_for(handle, map_cache_bytes=map_cache_bytes)


def client_for(handle, *, map_cache_bytes: int = MAP_CACHE_BYTES) -> ReplayClient:
    """A client of the store actor `handle` (map_cache_bytes: see runner.replay.client)."""
    call = lambda method, *args: ray.get(getattr(handle, method).remote(*args))  # noqa: E731
    return ReplayClient(call, map_cache_bytes=map_cache_bytes)
