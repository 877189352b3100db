"""Planning a pool from its config, its model and the cluster's resources (pure: no Ray)."""

from __future__ import annotations

import pytest

from core.models.loading import ModelSpec
from runner.config import JobConfigError, PoolConfig
from runner.pool.activity import Activity
from runner.pool.placement import (
    PoolError,
    WorkerResources,
    describe_need,
    needs_gpu,
    plan_pool,
    shortfall,
    spec_difference,
)

pytestmark = pytest.mark.cpu
TINY = ModelSpec(kind="random", shape="tiny")
FLUX = ModelSpec(kind="flux", path="black-forest-labs/FLUX.1-dev")
NO_GPU = {"CPU": 16.0}
TWO_GPUS = {"CPU": 16.0, "GPU": 2.0}


def test_a_model_that_needs_a_gpu_asks_for_one_even_when_no_gpu_is_up():
    """An autoscaling cluster with no GPU node up: the request for a GPU is what brings one up."""
    assert needs_gpu(FLUX) and needs_gpu(ModelSpec(kind="random", shape="flux-dev"))
    assert not needs_gpu(TINY) and not needs_gpu(ModelSpec(kind="reference"))
    plan = plan_pool(PoolConfig(), FLUX, NO_GPU)
    assert (plan.size, plan.resources, plan.cpu_fallback) == (1, WorkerResources(1.0, 1.0), False)
    assert "asking for 1 GPU worker" in plan.notes[0]
    assert plan_pool(PoolConfig(workers=4), FLUX, NO_GPU).size == 4
    assert plan_pool(PoolConfig(device="gpu"), TINY, NO_GPU).resources.gpus == 1.0


def test_the_designed_cpu_fallback_is_for_small_models_on_auto_only():
    plan = plan_pool(PoolConfig(), TINY, NO_GPU)
    assert plan.cpu_fallback and plan.resources.device == "cpu" and plan.size == 1
    assert plan.notes == ("model random/tiny runs on a CPU and the cluster has no GPU: CPU workers",)
    cpu = plan_pool(PoolConfig(device="cpu", workers=3, cpus_per_worker=2), TINY, TWO_GPUS)
    assert (cpu.size, cpu.resources.gpus, cpu.resources.cpu_threads, cpu.cpu_fallback) == (3, 0.0, 2, False)
    assert cpu.fields == "pool.workers=3 x pool.cpus_per_worker=2"


def test_one_worker_per_gpu_by_default():
    assert plan_pool(PoolConfig(), TINY, TWO_GPUS).size == 2
    half = plan_pool(PoolConfig(gpus_per_worker=0.5), TINY, TWO_GPUS)
    assert half.size == 4 and half.fields == "pool.workers=4 x pool.gpus_per_worker=0.5"


def test_need_messages_name_what_is_short():
    need = WorkerResources(1.0, 1.0)
    assert need.describe() == "1 CPU, 1 GPU" and WorkerResources(2.0, 0.5).describe() == "2 CPUs, 0.5 GPU"
    want = {"CPU": 4.0, "GPU": 4.0}
    assert shortfall(want, {"CPU": 8.0, "GPU": 2.0}) == {"GPU": 2.0}
    assert (
        describe_need(want, {"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 2.0})
        == "needs 4 GPUs; the cluster has 2 GPUs free (of 2 GPUs)"
    )
    assert issubclass(PoolError, JobConfigError)  # `tessera run` prints it as one line, exit code 2


def test_spec_difference_names_the_fields():
    other = ModelSpec(kind="random", shape="tiny", seed=1, dtype="bfloat16")
    assert spec_difference(other, TINY) == "model.dtype='bfloat16' (served: 'auto'), model.seed=1 (served: 0)"


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("device", "tpu", "pool.device must be auto, cpu or gpu, got 'tpu'"),
        ("idle_timeout_s", -1, "pool.idle_timeout_s must be >= 0"),
        ("placement_timeout_s", -5, "pool.placement_timeout_s must be >= 0"),
    ],
)
def test_pool_config_errors_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        PoolConfig(**{field: value})


def test_activity_idle_time_and_job_expiry():
    """Golden times on a hand-driven clock: idle counts from the end of the last call, 0 during one;
    a job silent for the idle timeout is no longer active."""
    now = [100.0]
    act = Activity(idle_timeout_s=10.0, clock=lambda: now[0])
    with act.call("a"):
        now[0] = 103.0
        assert act.idle_s() == 0.0
    now[0] = 108.0
    assert act.idle_s() == 5.0 and act.active_jobs() == {"a": 5.0} and not act.expired()
    now[0] = 113.5
    assert act.active_jobs() == {} and act.expired()  # 10.5 s silent
    act.idle_timeout_s = 0.0
    assert act.active_jobs() == {"a": 10.5} and not act.expired()  # 0 = never
    act.end("a")
    assert act.active_jobs() == {}
