"""Deployment files validate offline and agree with each other.

- The cluster-launcher files pass Ray's own prepare_config + validate_config (in that order:
  docs/runner.md, "Tests and deployment files").
- The KubeRay manifests pass the CRD schemas in clusters/kuberay/crds, read as the Kubernetes API
  server reads a structural schema: fields a schema does not list are rejected, int-or-string and
  list-map keys are checked; CEL rules cannot be evaluated offline, so a manifest that sets a field
  carrying one fails instead of passing unchecked.
- The manifests mount what their job reads and writes, size /dev/shm, request GPUs with a
  toleration, take the Comet key from a Secret, and name the image the Dockerfile builds, in the
  working directory where the entrypoint's job file is.
"""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
from pathlib import Path, PurePosixPath

import jsonschema
import pytest
import ray
import yaml
from jsonschema import Draft4Validator, ValidationError
from ray.autoscaler._private.util import prepare_config, validate_config

from runner.config import load_job

pytestmark = pytest.mark.cpu
REPO = Path(__file__).resolve().parents[1]
CRDS = REPO / "clusters" / "kuberay" / "crds"
MANIFEST_CRDS = {
    "clusters/kuberay_rayjob.yaml": "ray.io_rayjobs.yaml",
    "clusters/kuberay_raycluster.yaml": "ray.io_rayclusters.yaml",
}


def _load(path: str):
    return yaml.safe_load((REPO / path).read_text())


# --------------------------------------------------------------------------- cluster launcher


@pytest.mark.parametrize("path", ["ray_cluster.yaml", "clusters/local_cluster.yaml"])
def test_cluster_launcher_files_validate(path):
    config = prepare_config(_load(path))
    validate_config(config)
    assert config["max_workers"] >= 1


@pytest.mark.parametrize("path", ["ray_cluster.yaml", "clusters/local_cluster.yaml"])
def test_cluster_launcher_files_install_from_a_real_source_and_start_ray_as_documented(path):
    config = _load(path)
    text = (REPO / path).read_text()
    assert "example.invalid" not in text and "git clone" not in text
    if "docker" in config:  # the image the Dockerfile builds
        assert config["docker"]["image"] == _image_name()
    else:  # a wheel of this checkout, shipped by file_mounts and installed with its extras
        source = config["file_mounts"]["~/tessera-dist"]
        assert source == "./dist"
        assert any("tessera-*.whl" in c and "[gpu,comet]" in c for c in config["setup_commands"])
    # The token that guards the cluster travels with it; the head binds the Jobs API for clients,
    # keeps model workers off (no GPUs) and uses the ports the file's comment documents.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    head = shlex.split(config["head_start_ray_commands"][-1].replace(";", " ; "))
    for flag in (
        "--head",
        "--port=6379",
        "--dashboard-host=0.0.0.0",
        "--dashboard-port=8265",
        "--num-gpus=0",
    ):
        assert flag in head, flag
    for cmd in config["head_start_ray_commands"][-1:] + config["worker_start_ray_commands"][-1:]:
        assert "RAY_AUTH_MODE=token" in cmd
        assert "--object-manager-port=8076" in cmd and "--node-manager-port=8077" in cmd


def test_gpu_cluster_keeps_work_off_the_head_and_has_gpu_workers():
    config = prepare_config(_load("ray_cluster.yaml"))
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["GPU"] == 0
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())


def test_a_bad_cluster_file_is_rejected():
    bad = _load("clusters/local_cluster.yaml")
    bad["available_node_types"] = {"x": {"resources": {}, "node_config": {}}}
    import click

    with pytest.raises(click.ClickException, match="available_node_types is not supported"):
        prepare_config(bad)


# --------------------------------------------------------------------------- KubeRay CRD schemas


def _structural(schema: dict) -> dict:
    """The schema as the API server applies it: an object schema that lists its properties and
    neither allows additional ones nor preserves unknown fields rejects any other field (kubectl's
    strict field validation; JSON Schema alone would accept them); `nullable` admits null."""
    out = dict(schema)
    for key in ("properties", "patternProperties", "definitions"):
        if key in schema:
            out[key] = {name: _structural(sub) for name, sub in schema[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            out[key] = _structural(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            out[key] = [_structural(sub) for sub in schema[key]]
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if schema.get("nullable") and "type" in schema:
        out["type"] = [schema["type"], "null"]
    return out


def _int_or_string(validator, value, instance, schema):
    if value and (isinstance(instance, bool) or not isinstance(instance, int | str)):
        yield ValidationError(f"{instance!r} is neither an integer nor a string")


def _list_type(validator, value, instance, schema):
    """x-kubernetes-list-type: `set` items are unique; `map` items are unique by their map keys
    (a missing key takes its schema default, as the API server defaults it before comparing)."""
    if not isinstance(instance, list) or value not in ("set", "map"):
        return
    if value == "set":
        keys = [repr(item) for item in instance]
    else:
        names = schema.get("x-kubernetes-list-map-keys", [])
        props = schema.get("items", {}).get("properties", {})
        keys = [tuple(item.get(n, props.get(n, {}).get("default")) for n in names) for item in instance]
    dupes = sorted({str(k) for k in keys if keys.count(k) > 1})
    if dupes:
        yield ValidationError(f"duplicate entries {dupes} in a list of type {value}")


def _cel_rules(validator, rules, instance, schema):
    messages = [r.get("message", r["rule"]) for r in rules]
    yield ValidationError(f"this field carries CEL rules that cannot be checked offline: {messages}")


KubeValidator = jsonschema.validators.extend(
    Draft4Validator,  # OpenAPI v3.0 schemas are a JSON Schema draft-4 dialect
    {
        "x-kubernetes-int-or-string": _int_or_string,
        "x-kubernetes-list-type": _list_type,
        "x-kubernetes-validations": _cel_rules,
    },
)


@functools.cache
def _crd(crd_file: str) -> dict:
    # 2.3 MB of YAML: libyaml's loader where PyYAML has it (20x faster than the pure-Python one).
    return yaml.load((CRDS / crd_file).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@functools.cache
def _crd_validator(crd_file: str, api_version: str) -> Draft4Validator:
    crd = _crd(crd_file)
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert served["served"], f"{crd_file} does not serve {api_version}"
    return KubeValidator(_structural(served["schema"]["openAPIV3Schema"]))


def _schema_errors(manifest: dict, crd_file: str) -> list[str]:
    errors = _crd_validator(crd_file, manifest["apiVersion"]).iter_errors(manifest)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


@pytest.mark.parametrize("path", sorted(MANIFEST_CRDS))
def test_kuberay_manifest_matches_its_crd_schema(path):
    manifest = _load(path)
    assert manifest["kind"] == _crd(MANIFEST_CRDS[path])["spec"]["names"]["kind"]
    assert _schema_errors(manifest, MANIFEST_CRDS[path]) == []
    # Service and Secret names derive from it: a DNS-1123 label, short enough for the suffixes.
    assert re.fullmatch(r"[a-z]([-a-z0-9]{0,38}[a-z0-9])?", manifest["metadata"]["name"])


def _cluster(manifest: dict) -> dict:
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


def _head(c: dict) -> dict:
    return c["headGroupSpec"]["template"]["spec"]["containers"][0]


def _worker(c: dict) -> dict:
    return c["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


def _rename(d: dict, old: str, new: str) -> None:
    d[new] = d.pop(old)


BAD_MANIFESTS = {  # case: (mutation of the cluster spec, expected error)
    "typo: workerGroupSpec": (
        lambda c: _rename(c, "workerGroupSpecs", "workerGroupSpec"),
        "'workerGroupSpec' was unexpected",
    ),
    "typo: rayStartParam": (
        lambda c: _rename(c["headGroupSpec"], "rayStartParams", "rayStartParam"),
        "'rayStartParam' was unexpected",
    ),
    "typo: volumeMount": (
        lambda c: _rename(_head(c), "volumeMounts", "volumeMount"),
        "'volumeMount' was unexpected",
    ),
    "int start param": (
        lambda c: c["headGroupSpec"]["rayStartParams"].update({"num-gpus": 0}),
        "0 is not of type 'string'",
    ),
    "string replicas": (
        lambda c: c["workerGroupSpecs"][0].update(replicas="1"),
        "'1' is not of type 'integer'",
    ),
    "bad quantity": (
        lambda c: _worker(c)["resources"]["limits"].update({"nvidia.com/gpu": "eight"}),
        "does not match",
    ),
    "bad auth mode": (
        lambda c: c["authOptions"].update(mode="tokens"),
        "is not one of ['disabled', 'token']",
    ),
    "duplicate mount path": (
        lambda c: _worker(c)["volumeMounts"].append(_worker(c)["volumeMounts"][0]),
        "duplicate entries [\"('/data',)\"]",
    ),
    "CEL-guarded field": (lambda c: c.update(managedBy="ray.io/kuberay-operator"), "CEL rules"),
}


@pytest.mark.parametrize("path", sorted(MANIFEST_CRDS))
@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_the_schema_check_rejects_typos_and_wrong_types(path, case):
    mutate, expected = BAD_MANIFESTS[case]
    manifest = _load(path)
    mutate(_cluster(manifest))
    errors = _schema_errors(manifest, MANIFEST_CRDS[path])
    assert any(expected in e for e in errors), errors


def test_the_schema_check_is_not_stricter_than_the_schema():
    # rayStartParams is a free map of strings (any `ray start` flag), so a new flag passes...
    manifest = _load("clusters/kuberay_rayjob.yaml")
    _cluster(manifest)["headGroupSpec"]["rayStartParams"]["metrics-export-port"] = "8080"
    # ...and so do a quantity written as an integer and a second port that differs only in protocol.
    head = _head(_cluster(manifest))
    head["resources"]["limits"]["cpu"] = 4
    head["ports"].append({"name": "gcs-udp", "containerPort": 6379, "protocol": "UDP"})
    assert _schema_errors(manifest, "ray.io_rayjobs.yaml") == []


# --------------------------------------------------------------------------- what the manifests do


def _pods(manifest: dict) -> list[tuple[str, dict]]:
    cluster = _cluster(manifest)
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    return [(name, group["template"]["spec"]) for name, group in groups]


def _mount_for(pod: dict, path: str) -> tuple[dict, dict] | None:
    """The (volumeMount, volume) of the Ray container that holds `path`, or None."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in pod["containers"][0]["volumeMounts"]:
        if PurePosixPath(path).is_relative_to(mount["mountPath"]):
            return mount, volumes[mount["name"]]
    return None


def _pvcs() -> dict[str, dict]:
    docs = yaml.safe_load_all((REPO / "clusters/kuberay_storage.yaml").read_text())
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}


def _job_of(manifest: dict):
    if manifest["kind"] == "RayJob":
        argv = shlex.split(manifest["spec"]["entrypoint"])
        assert argv[:4] == ["python", "-m", "runner", "run"]
        return load_job(REPO / argv[4], argv[5:])
    return load_job(REPO / "clusters/flux_upscale_4k.yaml")  # the job its header submits


@pytest.mark.parametrize("path", sorted(MANIFEST_CRDS))
def test_every_pod_mounts_what_the_job_reads_and_writes(path):
    manifest = _load(path)
    job = _job_of(manifest)
    pvcs = _pvcs()
    for name, pod in _pods(manifest):
        # The driver (head) checks and reads the input; workers load the weights; all write results.
        for wanted in (job.config.image, job.config.model.path, job.runner.output):
            found = _mount_for(pod, wanted)
            assert found, f"{path} {name}: nothing mounted at {wanted}"
            mount, volume = found
            claim = pvcs[volume["persistentVolumeClaim"]["claimName"]]["spec"]["accessModes"]
            if wanted == job.runner.output:
                assert not mount.get("readOnly") and claim == ["ReadWriteMany"]
            else:
                assert set(claim) <= {"ReadWriteMany", "ReadOnlyMany"}


def _bytes(quantity: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([KMGT]i)?", quantity).groups()
    return int(number) * 1024 ** (" KMGT".index(unit[0]) if unit else 0)


@pytest.mark.parametrize("path", sorted(MANIFEST_CRDS))
def test_ray_pods_size_dev_shm_request_gpus_and_keep_models_off_the_head(path):
    manifest = _load(path)
    cluster = _cluster(manifest)
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    assert cluster["rayVersion"] == ray.__version__ and cluster["authOptions"]["mode"] == "token"
    groups = {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}
    for name, pod in _pods(manifest):
        mount, volume = _mount_for(pod, "/dev/shm")
        assert mount["mountPath"] == "/dev/shm" and volume["emptyDir"]["medium"] == "Memory"
        shm = _bytes(volume["emptyDir"]["sizeLimit"])
        limits = pod["containers"][0]["resources"]["limits"]
        assert shm < _bytes(limits["memory"])  # tmpfs pages count against the memory limit
        store = groups[name]["rayStartParams"].get("object-store-memory")
        assert store is None or int(store) < shm
        if name == "head":
            assert "nvidia.com/gpu" not in limits
        else:
            assert int(limits["nvidia.com/gpu"]) >= 1
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
                "tolerations"
            ]


@pytest.mark.parametrize("path", sorted(MANIFEST_CRDS))
def test_secrets_come_from_kubernetes_secrets(path):
    (head,) = _pods(_load(path))[0][1]["containers"]
    env = {e["name"]: e for e in head["env"]}
    assert env["COMET_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "tessera-comet",
        "key": "api-key",
        "optional": True,
    }
    for _, pod in _pods(_load(path)):
        for e in pod["containers"][0].get("env", []):
            assert not (re.search("KEY|TOKEN|SECRET|PASSWORD", e["name"]) and "value" in e), e["name"]


def test_the_rayjob_entrypoint_runs_a_job_that_loads():
    manifest = _load("clusters/kuberay_rayjob.yaml")
    runtime_env = yaml.safe_load(manifest["spec"]["runtimeEnvYAML"])
    assert "working_dir" not in runtime_env  # the code is the image's (see the Dockerfile)
    assert runtime_env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    job = _job_of(manifest)
    assert job.runner.output.startswith("/results/")


# --------------------------------------------------------------------------- the image


def _image_name() -> str:
    tomllib = pytest.importorskip("tomllib")
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    return f"registry.example.com/tessera:{version}"


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def test_the_dockerfile_builds_the_image_the_manifests_run():
    steps = _dockerfile()
    args = dict(a.split("=", 1) for i, a in steps if i == "ARG" and "=" in a)
    base = args["BASE_IMAGE"]
    assert re.fullmatch(r"pytorch/pytorch:2\.1[1-3]\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", base), base
    final = steps[max(n for n, (i, _) in enumerate(steps) if i == "FROM") :]
    runs = " ".join(a for i, a in final if i == "RUN")
    # The package from its wheel (not editable) with the extras a GPU node needs; torch stays the base's.
    assert re.search(
        r"pip install [^&]*--constraint /tmp/torch-constraint\.txt [^&]*\.whl\)\[gpu,comet\]", runs
    )
    assert " -e " not in runs and "--editable" not in runs
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"gpu", "comet"} <= set(extras)
    # What KubeRay's probes and the launcher run inside the container, and the non-root user.
    for tool in ("bash", "wget", "rsync"):
        assert re.search(rf"apt-get install [^&]*\b{tool}\b", runs), tool
    assert "--uid 1000 --gid 100 ray" in runs and "--home-dir /home/ray" in runs
    assert ("USER", "1000:100") in final and ("ENV", "HOME=/home/ray") in final
    (workdir,) = [a for i, a in final if i == "WORKDIR"]
    assert ("COPY", f"--chown=1000:100 . {workdir}") in final
    # Every manifest runs this image in that directory, where the entrypoint's job file is.
    for path in MANIFEST_CRDS:
        for _, pod in _pods(_load(path)):
            assert pod["containers"][0]["image"] == _image_name()
            assert pod["containers"][0]["workingDir"] == workdir
    job_file = shlex.split(_load("clusters/kuberay_rayjob.yaml")["spec"]["entrypoint"])[4]
    assert (REPO / job_file).is_file() and not _docker_ignored(job_file)


@functools.cache
def _dockerignore() -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        rules.append((negate, re.compile(regex.replace(r"\?", "[^/]"))))
    return rules


def _docker_ignored(path: str) -> bool:
    """Docker's rule: a pattern matches the path or one of its parents; the last match decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negate, regex in _dockerignore():
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = not negate
    return ignored


def test_the_build_context_holds_the_code_and_the_small_models_only():
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        "runs/demo/result.png",
        "bench/results/x.json",
        "models/FLUX.1-dev/transformer/config.json",
        "core/__pycache__/x.pyc",
        "dist/t.whl",
    ):
        assert _docker_ignored(path), path
    for path in (
        "core/flow/__init__.py",
        "runner/cli.py",
        "clusters/flux_upscale_4k.yaml",
        "models/reference/transformer/config.json",
        "models/taef2/taef2_decoder.pth",
        "pyproject.toml",
    ):
        assert not _docker_ignored(path), path
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout: no list of tracked files")
    sent = [p for p in tracked.stdout.splitlines() if not _docker_ignored(p) and (REPO / p).is_file()]
    size = sum((REPO / p).stat().st_size for p in sent)
    assert size < 100 * 2**20, f"the build context would be {size / 2**20:.0f} MiB"


def test_the_storage_manifest_declares_the_claims_the_pods_use():
    pvcs = _pvcs()
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for path in MANIFEST_CRDS
        for _, pod in _pods(_load(path))
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == set(pvcs) == {"tessera-data", "tessera-results"}
    assert pvcs["tessera-results"]["spec"]["accessModes"] == ["ReadWriteMany"]
