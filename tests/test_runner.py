"""The runner on a real local Ray (the session's `ray start --head` cluster with 2 fake GPUs)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from core.models.forward import evaluate_in_process
from core.models.loading import ModelSpec
from core.tiling.views import ViewInput
from runner.config import PoolConfig
from runner.models import load_model
from runner.pool.pool import PoolError, WorkerPool, connect_pool, shutdown_pool
from runner.pool.ray_pool import RayModelPool
from runner.pool.transport import from_wire, to_wire

pytestmark = pytest.mark.cpu
TINY = ModelSpec(kind="random", shape="tiny")


@pytest.fixture(scope="module")
def pool3(ray_cluster):
    """Three tiny-model workers on the 2 fake GPUs (half a GPU each)."""
    pool = connect_pool(PoolConfig(name="eq", workers=3, gpus_per_worker=0.5), TINY)
    yield pool
    shutdown_pool(pool)


def subset(pool: WorkerPool, n: int) -> WorkerPool:
    return dataclasses.replace(pool, workers=pool.workers[:n], infos=pool.infos[:n], created=0)


def flat(outputs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([o.reshape(-1) for o in outputs])


def views(n: int, seed: int = 0) -> list[ViewInput]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(32, 8, 8), (32, 8, 12)]
    return [ViewInput(torch.randn(*shapes[i % 2], generator=g), 0.9 - 0.1 * (i % 5)) for i in range(n)]


def test_fake_gpus_get_one_worker_each(ray_cluster):
    pool = connect_pool(PoolConfig(name="place", workers=0, gpus_per_worker=1), TINY)
    try:
        assert pool.size == 2  # one per fake GPU
        assert sorted(info["gpu_ids"][0] for info in pool.infos) == ["0", "1"]
        assert len({info["pid"] for info in pool.infos}) == 2
        again = connect_pool(PoolConfig(name="place", workers=0, gpus_per_worker=1), TINY)
        assert again.created == 0 and [i["pid"] for i in again.infos] == [i["pid"] for i in pool.infos]
    finally:
        shutdown_pool(pool)


def test_pool_larger_than_the_cluster_waits_then_fails_naming_what_is_missing(ray_cluster):
    """A joined cluster may autoscale, so the job waits for a worker of 3 GPUs (the cluster has 2),
    saying so, then gives up naming the fields and what the cluster has."""
    lines: list[str] = []
    cfg = PoolConfig(name="toobig", workers=1, gpus_per_worker=3, placement_timeout_s=12)
    with pytest.raises(PoolError) as err:
        connect_pool(cfg, TINY, log=lines.append)
    assert str(err.value).startswith(
        "pool 'toobig': 1 of 1 workers (1 CPU, 3 GPUs each) did not start within "
        "pool.placement_timeout_s=12 s; the cluster has "
    )
    assert str(err.value).endswith("free (of 4 CPUs, 2 GPUs)")
    assert any("waiting for 1 of 1 workers (1 CPU, 3 GPUs each) to start" in line for line in lines)
    from runner.pool.lifecycle import worker_names

    assert "toobig" not in worker_names()  # the workers it made are stopped again


def test_results_do_not_depend_on_worker_count_or_batch_size(pool3):
    vs = views(11)
    outs = {}
    for n in (1, 2, 3):
        for batch in (1, 3):
            rp = RayModelPool(subset(pool3, n), PoolConfig(name="eq", max_batch=batch), job=f"w{n}b{batch}")
            try:
                outs[(n, batch)] = flat(rp.evaluate(vs))
                summary = rp.summary()
            finally:
                rp.close()
            assert summary["views"] == 11
            assert summary["evaluate_call_s_by_views"]["11"]["n"] == 1  # one call of 11 views
            if n == 3:
                assert len(summary["worker_busy_s"]) == 3  # every worker got work
    ref = outs[(1, 1)]
    for key, out in outs.items():
        if key[1] == 1:
            assert torch.equal(out, ref), key  # bitwise, whatever the number of workers
        else:
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)  # batching changes only rounding
    assert torch.equal(outs[(1, 3)], outs[(3, 3)])


def test_tiled_vae_over_the_pool_equals_in_process(pool3):
    from core.vae.lockstep import tiled_decode

    local = load_model(TINY, "cpu")
    latents = torch.randn(1, 32, 20, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = tiled_decode(local.vae, latents, tile=64)
        untiled = local.vae.decode(latents)
    rp = RayModelPool(subset(pool3, 3), PoolConfig(name="eq"), job="vae")
    try:
        out = rp.decode(latents, tile=64)
        images = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(4))
        enc = rp.encode(images, tile=64)
    finally:
        rp.close()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(out, untiled, rtol=0, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(enc, local.vae.encode(images), rtol=0, atol=1e-4)
    assert rp.vae_rounds > 0


def test_in_process_and_pool_evaluate_agree_bitwise(pool3):
    """The in-process evaluator batches exactly as the dispatcher does (same groups, same order) and
    runs the same per-batch forward, in the views' dtype: the same velocities, bit for bit."""
    from core.tiling.views import plan_batches

    vs = views(7)
    assert plan_batches(vs, 3) == [[0, 2, 4], [6], [1, 3, 5]]
    local = load_model(TINY, "cpu")
    expected = evaluate_in_process(local.backbone, local.make_cond(), vs, max_batch=3)
    rp = RayModelPool(subset(pool3, 2), PoolConfig(name="eq", max_batch=3), job="agree")
    try:
        out = rp.evaluate(vs)
        half = rp.evaluate([ViewInput(v.x.bfloat16(), v.sigma) for v in vs])
    finally:
        rp.close()
    assert torch.equal(flat(out), flat(expected))
    assert all(v.dtype == torch.bfloat16 for v in half)  # the velocity keeps the views' dtype over Ray
    bf16 = evaluate_in_process(
        local.backbone, local.make_cond(), [ViewInput(v.x.bfloat16(), v.sigma) for v in vs], max_batch=3
    )
    assert torch.equal(flat(half), flat(bf16))


def test_oom_shrinks_the_batch_and_is_reported():
    """Fault injection: a backbone that runs out of memory above 2 views per forward."""
    from runner.pool.worker import ModelWorker, ViewTooLargeError

    worker = ModelWorker(0)
    worker.spec, worker.model = TINY, load_model(TINY, "cpu")
    real = worker.model.backbone.velocity

    def limited(x, sigma, cond, rope=None, **ids):
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(x, sigma, cond, rope, **ids)

    worker.model.backbone.velocity = limited
    worker.set_cond("j", worker.make_cond())
    x = torch.randn(5, 32, 8, 8)
    sigma = torch.full((5,), 0.5)
    result = worker.velocity("j", to_wire(x), to_wire(sigma), None)
    assert result.oom_splits == [5, 3]
    with torch.no_grad():
        torch.testing.assert_close(from_wire(result.v), real(x, sigma, worker.conds["j"]), rtol=0, atol=1e-5)

    def never(x, sigma, cond, rope=None, **ids):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    worker.model.backbone.velocity = never
    with pytest.raises(ViewTooLargeError, match=r"shape \(32, 8, 8\) does not fit"):
        worker.velocity("j", to_wire(x[:1]), to_wire(sigma[:1]), None)


def test_oom_split_frees_the_failed_forward_first():
    """The halves must not run while the failed forward's activations are still referenced (through
    the exception's traceback): on a GPU they would run out of memory as well (seen on an H200)."""
    import weakref

    from runner.pool.worker import ModelWorker

    worker = ModelWorker(0)
    worker.spec, worker.model = TINY, load_model(TINY, "cpu")
    real = worker.model.backbone.velocity
    failed: list[weakref.ref] = []
    alive_during_halves: list[bool] = []

    def limited(x, sigma, cond, rope=None, **ids):
        if x.shape[0] > 2:
            activation = torch.empty(x.shape[0], 1024)  # what a real forward holds when it fails
            failed.append(weakref.ref(activation))
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        alive_during_halves.extend(ref() is not None for ref in failed)
        return real(x, sigma, cond, rope, **ids)

    worker.model.backbone.velocity = limited
    worker.set_cond("j", worker.make_cond())
    result = worker.velocity("j", to_wire(torch.randn(4, 32, 8, 8)), to_wire(torch.full((4,), 0.5)), None)
    assert result.oom_splits == [4]
    assert failed and alive_during_halves == [False, False]


def test_pool_fallbacks_reach_job_json_readably():
    from runner.run import pool_fallbacks

    summary = {
        "oom_fallbacks": [{"worker": 0, "batch_sizes": [49]}],
        "requeued_batches": [{"batch": 3, "worker": 1, "error": "ActorDiedError"}],
    }
    oom, requeued = pool_fallbacks(summary)
    assert oom == {
        "what": "oom batch split",
        "worker": 0,
        "batch_sizes": [49],
        "reason": "worker 0: batches of [49] views did not fit in GPU memory and ran in halves",
    }
    assert requeued["what"] == "batch requeued" and requeued["batch"] == 3
    assert "worker 1 was lost (ActorDiedError)" in requeued["reason"]
    assert pool_fallbacks({}) == []


def test_timing_stats_golden():
    from runner.timing import stats

    assert stats([4.0, 1.0, 3.0, 2.0]) == {"median_s": 2.5, "min_s": 1.0, "max_s": 4.0, "iqr_s": 2.5, "n": 4}
    assert stats([0.2]) == {"median_s": 0.2, "min_s": 0.2, "max_s": 0.2, "iqr_s": 0.0, "n": 1}
    with pytest.raises(ValueError, match="at least one timing"):
        stats([])


def test_transport_keeps_dtype_and_bits():
    g = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = torch.randn(2, 3, 4, generator=g).to(dtype)
        wire = to_wire(t)
        back = from_wire(wire)
        assert back.dtype == dtype and torch.equal(back, t) and wire.shape == (2, 3, 4)
        back += 1  # writable, and its own memory
        assert not torch.equal(back, t)
