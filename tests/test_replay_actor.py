"""The replay store as its node's Ray actor, on the session's real local Ray: found by name, pinned,
a producer and a consumer in two actors coupled by the rate limiter, checkpoint and resume."""

from __future__ import annotations

import sys
import time

import pytest
import ray
import ray.cloudpickle
import test_replay_helpers
from test_replay_helpers import make_capture, ram_tmpdir, remove, same_bits

from core.distill.ratio_limiter import RatioLimiterConfig
from core.distill.replay_policy import ReplayPolicyConfig
from runner.replay import ReplayConfig, client_for, client_for_node, connect_store, shutdown_store, store_name
from runner.replay.actor import current_node_id

pytestmark = pytest.mark.cpu
# The producer and consumer actors below run this module's code: ship it by value (tests/ is not
# on the workers' path).
ray.cloudpickle.register_pickle_by_value(test_replay_helpers)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture
def store_cfg(tmp_path):
    ram = ram_tmpdir("tsr-replay-actor-")

    def make(**policy) -> ReplayConfig:
        return ReplayConfig(
            ram_dir=str(ram), disk_dir=str(tmp_path / "disk"), policy=ReplayPolicyConfig(**policy)
        )

    yield make
    remove(ram)


def test_the_store_is_found_by_name_on_its_own_node(ray_cluster, store_cfg):
    cfg = store_cfg(ram_bytes=10**6, disk_bytes=10**6)
    node = current_node_id()
    handle = connect_store(cfg)
    try:
        assert ray.get(handle.placement.remote())["node_id"] == node
        assert ray.get_actor(store_name(node), namespace="tessera")._actor_id == handle._actor_id
        again = connect_store(cfg)  # found, not created
        assert again._actor_id == handle._actor_id
        client = client_for_node()
        client.insert(make_capture(0))
        (got,) = client.sample("single:0", 1)
        assert same_bits(got.capture, make_capture(0))
        with pytest.raises(ValueError, match="exists with another config"):
            connect_store(store_cfg(ram_bytes=10**6, disk_bytes=2 * 10**6))
    finally:
        shutdown_store(handle)


@ray.remote(num_cpus=0)
class Producer:
    def run(self, layers: list[str], per_layer: int, timeout_s: float) -> int:
        client = client_for_node()
        for i in range(per_layer * len(layers)):
            client.insert(make_capture(i, layers[i % len(layers)]), timeout_s=timeout_s)
        return per_layer * len(layers)


@ray.remote(num_cpus=0)
class Consumer:
    def run(self, layers: list[str], per_layer: int, timeout_s: float) -> list[int]:
        client = client_for_node()
        orders = []
        for j in range(per_layer * len(layers)):
            layer = layers[j % len(layers)]
            (s,) = client.sample(layer, 1, timeout_s=timeout_s)
            assert s.ref.layer == layer and same_bits(s.capture, make_capture(s.ref.order, layer))
            orders.append(s.ref.order)
            time.sleep(0.005)  # a trainer step: the producer runs ahead and is held back
        return orders


def test_a_producer_and_a_consumer_in_two_actors_never_deadlock(ray_cluster, store_cfg):
    # The smallest band Reverb allows for spi 2 (error_buffer 2): offset 4, band [2, 6]. With 12
    # inserts per layer the consumer can take 12 * 2 - 2 = 22 samples per layer, and the producer's
    # last insert needs 18 of them: both finish only if neither side ever waits for the other forever.
    cfg = store_cfg(
        ram_bytes=10**6,
        disk_bytes=10**6,
        limiter=RatioLimiterConfig(samples_per_insert=2, min_size=2, error_buffer=2),
    )
    handle = connect_store(cfg)
    client = client_for(handle)
    layers = ["double:0", "single:1"]
    producer, consumer = Producer.remote(), Consumer.remote()
    try:
        sampled = consumer.run.remote(layers, 22, 180.0)
        deadline = time.monotonic() + 60
        while not client.stats().counters.blocked.get("sample:below_min_size"):  # the consumer waits ...
            assert time.monotonic() < deadline, "the consumer never asked for a sample"
            time.sleep(0.05)
        inserted, orders = ray.get([producer.run.remote(layers, 12, 180.0), sampled], timeout=400)
        assert inserted == 24 and len(orders) == 44
        stats = client.stats()
        for layer in layers:
            lim = stats.policy["layers"][layer]
            assert (lim["inserts"], lim["samples"]) == (12, 22)
        assert stats.counters.blocked.get("insert:rate_limited", 0) > 0  # ... and so does the producer
    finally:
        shutdown_store(handle)
        for a in (producer, consumer):
            ray.kill(a)


def test_a_store_actor_resumed_from_its_checkpoint_gives_the_same_samples(ray_cluster, store_cfg):
    free = RatioLimiterConfig(samples_per_insert=1, error_buffer=100)
    cfg = store_cfg(ram_bytes=10**6, disk_bytes=10**6, reuse_cap=4, limiter=free, seed=9)
    handle = connect_store(cfg)
    client = client_for(handle)
    for i in range(6):
        client.insert(make_capture(i), timeout_s=30)
    client.sample("single:0", 2)
    state = client.state_dict()
    uninterrupted = [s.ref.order for _ in range(8) for s in client.sample("single:0", 2)]
    shutdown_store(handle, delete_files=False)  # the actor ends; its files stay for the resume
    handle = connect_store(cfg, state=state)
    try:
        resumed = [s.ref.order for _ in range(8) for s in client_for(handle).sample("single:0", 2)]
        assert resumed == uninterrupted and len(set(uninterrupted)) > 1
    finally:
        shutdown_store(handle)
