"""Job files: merging, overrides and the errors a user sees before any work starts."""

from __future__ import annotations

import pytest

from runner.config import JobConfigError, load_job
from runner.run import check_job

pytestmark = pytest.mark.cpu

GOOD = """
task: upscale
output: {out}
model: {{kind: random, shape: tiny}}
image: {image}
scale: 2
steps: 4
"""


@pytest.fixture
def image(tmp_path):
    from PIL import Image

    path = tmp_path / "in.png"
    Image.new("RGB", (64, 48), (120, 80, 40)).save(path)
    return path


def write(tmp_path, text: str):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_merges_yaml_and_overrides(tmp_path, image):
    job = load_job(
        write(tmp_path, GOOD.format(out=tmp_path / "o", image=image)), ["steps=9", "pool.workers=2"]
    )
    assert job.config.steps == 9
    assert job.runner.pool.workers == 2
    assert job.config.model.shape == "tiny"
    assert job.resolved["steps"] == 9 and job.resolved["pool"]["workers"] == 2
    check_job(job)  # the input exists and the sizes fit


@pytest.mark.parametrize(
    ("text", "overrides", "match"),
    [
        ("task: upscale\noutput: o\nimage: [unclosed\n", [], "not valid YAML"),
        ("- a\n- b\n", [], "must be a mapping"),
        ("output: o\nimage: x.png\nscale: 2\n", [], "missing required key 'task'"),
        ("task: paint\noutput: o\n", [], "task 'paint' is not a known task"),
        ("task: upscale\nimage: x.png\nscale: 2\n", [], "missing required key 'output'"),
        (GOOD, ["stepz=3"], "unknown key stepz"),
        (GOOD, ["tiling.tile_size=3"], "unknown key tiling.tile_size"),
        (GOOD, ["pool.wrkers=3"], "unknown key pool.wrkers"),
        (GOOD, ["steps=abc"], "invalid value steps: Value 'abc'"),
        (GOOD, ["steps=0"], "steps must be >= 1, got 0"),
        (GOOD, ["tiling.method=tiles"], "tiling.method must be one of"),
        (GOOD, ["tiling.tile=100"], "tiling.tile must be 0 or a positive multiple of 16 pixels, got 100"),
        (GOOD, ["denoise=[1.5]"], "denoise must be in \\[0, 1\\], got 1.5"),
        (GOOD, ["model.kind=flux"], "model.path is required for kind flux"),
        (GOOD, ["target=[512,512]"], "set exactly one of target"),
        (GOOD, ["pool.workers=-1"], "pool.workers must be >= 0, got -1"),
        (GOOD, ["steps"], "must look like key=value"),
    ],
)
def test_bad_job_files_name_the_field_and_value(tmp_path, image, text, overrides, match):
    path = write(tmp_path, text.format(out=tmp_path / "o", image=image) if "{" in text else text)
    with pytest.raises(JobConfigError, match=match):
        load_job(path, overrides)


def test_missing_job_file(tmp_path):
    with pytest.raises(JobConfigError, match="does not exist"):
        load_job(tmp_path / "nope.yaml")


def test_missing_input_and_wrong_sizes_fail_before_work(tmp_path, image):
    path = write(tmp_path, GOOD.format(out=tmp_path / "o", image=image))
    with pytest.raises(JobConfigError, match="image .*missing.png' does not exist"):
        check_job(load_job(path, [f"image={tmp_path / 'missing.png'}"]))
    with pytest.raises(JobConfigError, match=r"target \[32, 32\] is smaller than the image \(48x64\)"):
        check_job(load_job(path, ["scale=0", "target=[32,32]"]))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(JobConfigError, match="is not a readable image"):
        check_job(load_job(path, [f"image={tmp_path / 'bad.png'}"]))
    from PIL import Image

    Image.new("L", (10, 10)).save(tmp_path / "mask.png")
    with pytest.raises(JobConfigError, match="mask .* is 10x10, the image is 48x64"):
        check_job(load_job(path, [f"mask={tmp_path / 'mask.png'}"]))


def test_example_job_files_parse():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "clusters"
    files = sorted(root.glob("*.yaml")) + sorted((root / "examples").glob("*.yaml"))
    jobs = [f for f in files if "task:" in f.read_text()]
    assert len(jobs) >= 9
    for f in jobs:
        load_job(f)


def test_yaml_1_1_booleans_stay_words(tmp_path, image):
    """`off` is YAML 1.1's False: `tracking.comet: off` failed with "got 'False'"."""
    text = GOOD.format(out=tmp_path / "o", image=image) + "tracking: {comet: off}\noutputs: {previews: on}\n"
    job = load_job(write(tmp_path, text))
    assert job.runner.tracking.comet == "off" and job.config.outputs.previews is True
    job = load_job(
        write(tmp_path, text), ["tracking.comet=off", "outputs.previews=off", "model.prompt_embeds=no"]
    )
    assert job.runner.tracking.comet == "off" and job.config.outputs.previews is False
    assert job.config.model.prompt_embeds == "no"
    with pytest.raises(
        JobConfigError,
        match=r"tracking.comet: Invalid value 'of', expected one of \['off', 'online', 'offline'\]",
    ):
        load_job(write(tmp_path, text), ["tracking.comet=of"])


def test_a_scalar_for_a_tuple_field_is_one_value(tmp_path, image):
    path = write(tmp_path, GOOD.format(out=tmp_path / "o", image=image) + "denoise: 0.45\n")
    assert load_job(path).config.denoise == (0.45,)
    job = load_job(path, ["denoise=0.5"])
    assert job.config.denoise == (0.5,) and list(job.resolved["denoise"]) == [0.5]
    assert job.config.phase_denoise(3) == [0.5, 0.5, 0.5]
    with pytest.raises(JobConfigError, match="invalid value target"):
        load_job(path, ["target=512"])  # a fixed-length pair is not filled from one number


def test_sweep_overrides_replace_or_turn_off_the_files_sweep(tmp_path, image):
    text = GOOD.format(out=tmp_path / "o", image=image) + "sweep: {seed: [0, 1], steps: [2, 3]}\n"
    path = write(tmp_path, text)
    assert load_job(path).runner.sweep == {"seed": [0, 1], "steps": [2, 3]}
    assert load_job(path, ["sweep={}"]).runner.sweep == {}
    assert load_job(path, ["sweep={seed: [5]}"]).runner.sweep == {"seed": [5]}
    # a key inside the sweep adds to it, keeping a dotted name as one key
    assert load_job(path, ["sweep.tiling.method=[mixture]"]).runner.sweep == {
        "seed": [0, 1],
        "steps": [2, 3],
        "tiling.method": ["mixture"],
    }


@pytest.mark.parametrize(
    ("text", "overrides"),
    [
        ("tracking: {{project: '${{oc.env:COMET_API_KEY}}'}}\n", []),
        ("", ["tracking.project=${oc.env:COMET_API_KEY}"]),
        ("", ["output=/tmp/runs/${oc.env:COMET_API_KEY,x}"]),
        ("model: {{kind: random, shape: tiny, prompt_embeds: '${{ oc.decode:abc }}'}}\n", []),
    ],
)
def test_environment_interpolation_is_refused(tmp_path, image, monkeypatch, text, overrides):
    """${oc.env:...} resolved into job.json and output folder names; no value from the environment
    may enter a job's config."""
    monkeypatch.setenv("COMET_API_KEY", "secret-key-123")
    path = write(tmp_path, GOOD.format(out=tmp_path / "o", image=image) + text.format())
    with pytest.raises(
        JobConfigError, match="calls a resolver; job files and overrides may not read the environment"
    ):
        load_job(path, overrides)


def test_plain_references_and_escaped_dollars_still_work(tmp_path, image):
    text = (
        GOOD.format(out=tmp_path / "o", image=image)
        + "model: {kind: random, shape: tiny, prompt_embeds: '\\${x}'}\n"
    )
    job = load_job(write(tmp_path, text), ["mask=${image}"])
    assert job.config.mask == str(image)
    assert job.config.model.prompt_embeds == "${x}"


def test_output_uris_are_checked_without_a_network(tmp_path, image):
    path = write(tmp_path, GOOD.format(out=tmp_path / "o", image=image))
    assert load_job(path, ["output=s3://bucket/runs/x"]).runner.output == "s3://bucket/runs/x"
    with pytest.raises(JobConfigError, match="output: storage URI 'ftp://h/x': scheme 'ftp'"):
        load_job(path, ["output=ftp://h/x"])
    with pytest.raises(JobConfigError, match="is not valid YAML"):
        load_job(path, ["steps=[1,"])


def test_an_upscale_job_names_a_students_bundle_checked_before_work(tmp_path, image):
    """`attention:` in an upscale job file: parsed into the serving config, its bundle folder an input
    (checked before work, uploaded by submit, in the fingerprint), and no attention block at all is
    still a valid job."""
    from runner.preflight import check_inputs
    from tasks.distill_attention import AttentionConfig

    path = write(tmp_path, GOOD.format(out=tmp_path / "o", image=image))
    assert load_job(path, []).config.attention is None
    assert check_inputs(load_job(path, [])) == 1  # the image only
    missing = tmp_path / "no-students"
    job = load_job(path, [f"attention.students={missing}", "attention.layers=ready"])
    assert job.config.attention == AttentionConfig(students=str(missing), layers="ready")
    with pytest.raises(JobConfigError, match="attention.students .*no-students' does not exist"):
        check_inputs(job)
    bundle = tmp_path / "students"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    assert check_inputs(load_job(path, [f"attention.students={bundle}"])) == 1
