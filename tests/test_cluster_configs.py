"""Deployment files validate offline: the cluster-launcher YAMLs through Ray's own prepare_config +
validate_config (docs/runner.md, "Tests and deployment files"), the KubeRay RayJob by its schema's
required fields."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from runner.config import load_job

pytestmark = pytest.mark.cpu
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", ["ray_cluster.yaml", "clusters/local_cluster.yaml"])
def test_cluster_launcher_files_validate(path):
    config = prepare_config(yaml.safe_load((REPO / path).read_text()))
    validate_config(config)
    assert config["max_workers"] >= 1


def test_gpu_cluster_keeps_work_off_the_head_and_has_gpu_workers():
    config = prepare_config(yaml.safe_load((REPO / "ray_cluster.yaml").read_text()))
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["GPU"] == 0
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())


def test_kuberay_rayjob_manifest():
    manifest = yaml.safe_load((REPO / "clusters/kuberay_rayjob.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    spec = manifest["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert "headGroupSpec" in cluster and cluster["workerGroupSpecs"]
    for group in cluster["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
    yaml.safe_load(spec["runtimeEnvYAML"])  # the runtime env is itself valid YAML
    # The entrypoint is the local command: `python -m runner run JOB [overrides]`, and the job loads.
    argv = shlex.split(spec["entrypoint"])
    assert argv[:4] == ["python", "-m", "runner", "run"]
    load_job(REPO / argv[4], argv[5:])


def test_a_bad_cluster_file_is_rejected():
    bad = yaml.safe_load((REPO / "clusters/local_cluster.yaml").read_text())
    bad["available_node_types"] = {"x": {"resources": {}, "node_config": {}}}
    import click

    with pytest.raises(click.ClickException, match="available_node_types is not supported"):
        prepare_config(bad)
