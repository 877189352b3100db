"""Parity of core.eval.lpips.LpipsAlex with the authors' `lpips` package (v0.1, AlexNet trunk).

Needs torch, torchvision and the `lpips` 0.1.4 wheel, installed without its dependencies. Nothing is
downloaded: `lpips.LPIPS(net='alex', pnet_rand=True)` builds a random trunk (under a fixed seed)
with the real v0.1 heads from the wheel. Its state dict is copied into Tessera's module (keys
`net.sliceK.N.*` -> `features.N.*`, `linK.model.1.weight` unchanged) and both score the same random
image pairs at 64, 128 and 256 px, on the CPU (float32 and float64) and on CUDA (float32) when
present: distances and per-layer terms must agree to 1e-6. It also checks that a torchvision AlexNet
state dict loads into the module strictly and that models/lpips/v0.1/alex.pth equals the wheel's.

Get the wheel where pip can reach PyPI, from the repository root (`.whl/` is git-ignored):

    python -m pip download lpips==0.1.4 --no-deps -d .whl

On the GPU host (torch and torchvision installed, no network), with `.whl` carried along:

    PYTHONUNBUFFERED=1 python3 bench/lpips_parity.py --lpips .whl/lpips-0.1.4-py3-none-any.whl

`--lpips` takes the wheel (unpacked to a temporary folder) or a folder that holds the `lpips`
package; without it `lpips` is imported from PYTHONPATH. Result: bench/results/lpips_parity.json
(and $OUT/lpips_parity.json on the device machine); the exit status is 1 when parity fails.

    python bench/lpips_parity.py --self-check

runs Tessera's module alone end to end (seeded random trunk, the repository's heads, the same pairs):
identity gives 0, the distance is symmetric, the per-layer terms sum to it. It claims no parity
and writes no result. Without `--self-check`, a missing lpips or torchvision is an error.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, write_result  # noqa: E402
from core.eval.lpips import LPIPS_SCALE, LPIPS_SHIFT, LpipsAlex, trunk_state_dict  # noqa: E402
from runner.perceptual import REPO_HEADS  # noqa: E402

SIZES = (64, 128, 256)
PAIRS = 4  # image pairs per size: 2 independent, 2 a small perturbation of the first image
TOLERANCE = 1e-6


def image_pairs(size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[PAIRS, 3, size, size] each in [0, 1]: two unrelated pairs and two near-identical ones."""
    g = torch.Generator().manual_seed(seed * 1000 + size)
    a = torch.rand(PAIRS, 3, size, size, generator=g)
    b = torch.rand(PAIRS, 3, size, size, generator=g)
    near = (a[2:] + 0.05 * torch.randn(PAIRS - 2, 3, size, size, generator=g)).clamp(0, 1)
    return a, torch.cat([b[:2], near])


def import_lpips(location: str | None, scratch: Path):
    """The lpips package from a wheel, a folder that holds it, or PYTHONPATH; SystemExit if absent."""
    if location:
        path = Path(location)
        if path.suffix == ".whl":
            with zipfile.ZipFile(path) as whl:
                whl.extractall(scratch)  # lpips finds its head files by path: it cannot run zipped
            path = scratch
        if not (path / "lpips" / "__init__.py").is_file():
            raise SystemExit(f"--lpips {location!r}: no lpips package there")
        sys.path.insert(0, str(path))
    try:
        return importlib.import_module("lpips")
    except ImportError as err:
        raise SystemExit(
            f"cannot import lpips ({err}); parity needs torchvision and the lpips wheel "
            "(see this script's docstring), or run with --self-check to test Tessera's module alone"
        ) from None


def lpips_to_tessera(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lpips.LPIPS state dict -> LpipsAlex keys: net.sliceK.N.* -> features.N.*, linK.* as is.

    The package also lists its heads under `lins.K.*` (a ModuleList of the same modules) and has the
    scaling buffers; those aliases must equal `linK.*` and are dropped, like the buffers.
    """
    out = {}
    for key, value in state.items():
        if key.startswith("net.slice"):
            _, _, index, param = key.split(".")
            out[f"features.{index}.{param}"] = value
        elif key.startswith("lins."):
            alias = "lin" + key.removeprefix("lins.")
            if alias not in state or not torch.equal(state[alias], value):
                raise ValueError(f"{key} is not the same tensor as {alias}")
        elif key.startswith("lin"):
            out[key] = value
        elif not key.startswith("scaling_layer."):
            raise ValueError(f"unexpected key in the lpips state dict: {key}")
    return out


def compare(ref, ours: LpipsAlex, device: str, dtype: torch.dtype, seed: int) -> dict[str, Any]:
    """Distances and per-layer terms of both modules on the pairs of every size."""
    ref, ours = ref.to(device, dtype), ours.to(device, dtype)
    rows = {}
    with torch.no_grad():
        for size in SIZES:
            a, b = (t.to(device, dtype) for t in image_pairs(size, seed))
            d_ref, layers_ref = ref(a, b, retPerLayer=True, normalize=True)  # normalize: [0, 1] inputs
            d_ours = ours(a, b)
            terms_ours = ours.layer_distances(a, b)
            terms_ref = torch.cat([t.flatten(1) for t in layers_ref], dim=1)
            diff = (d_ref.flatten() - d_ours).abs()
            rows[str(size)] = {
                "pairs": PAIRS,
                "max_abs_diff": diff.max().item(),
                "max_rel_diff": (diff / d_ref.flatten().abs()).max().item(),
                "max_abs_diff_per_layer": (terms_ref - terms_ours).abs().max(dim=0).values.tolist(),
                "distances_lpips": d_ref.flatten().tolist(),
                "distances_tessera": d_ours.tolist(),
            }
    worst = max(max(r["max_abs_diff"], *r["max_abs_diff_per_layer"]) for r in rows.values())
    return {
        "device": device,
        "dtype": str(dtype),
        "sizes": rows,
        "max_abs_diff": worst,
        "ok": worst <= TOLERANCE,
    }


def parity(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as scratch:
        lpips = import_lpips(args.lpips, Path(scratch))
        import torchvision  # lpips imported it already; here for its version and the layout check

        torch.manual_seed(args.seed)
        ref = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
        heads_path = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
        wheel_heads = torch.load(heads_path, map_location="cpu", weights_only=True)
        lpips_version = importlib.metadata.version("lpips")  # its dist-info sits beside the package
    ours = LpipsAlex().eval()
    ours.load_state_dict(lpips_to_tessera(ref.state_dict()), strict=True)
    repo_heads = torch.load(REPO_HEADS, map_location="cpu", weights_only=True)
    torchvision_trunk = trunk_state_dict(torchvision.models.alexnet(weights=None).state_dict())
    LpipsAlex().load_state_dict({**torchvision_trunk, **repo_heads}, strict=True)
    checks = {
        "repo_heads_equal_wheel": sorted(repo_heads) == sorted(wheel_heads)
        and all(torch.equal(repo_heads[k], wheel_heads[k]) for k in wheel_heads),
        "scaling_constants_equal": torch.allclose(
            ref.scaling_layer.shift.flatten(), torch.tensor(LPIPS_SHIFT)
        )
        and torch.allclose(ref.scaling_layer.scale.flatten(), torch.tensor(LPIPS_SCALE)),
        "torchvision_alexnet_features_load_strict": True,  # the strict load above raised otherwise
    }
    runs = [
        compare(ref, ours, "cpu", torch.float32, args.seed),
        compare(ref, ours, "cpu", torch.float64, args.seed),
    ]
    if torch.cuda.is_available():
        runs.append(compare(ref, ours, "cuda", torch.float32, args.seed))
    ok = all(checks.values()) and all(r["ok"] for r in runs)
    result = {
        "bench": "lpips_parity",
        "env": {
            **environment(),
            "torchvision": torchvision.__version__,
            "lpips": lpips_version,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        },
        "reference": "lpips.LPIPS(net='alex', pnet_rand=True), v0.1 heads from the wheel",
        "seed": args.seed,
        "tolerance": TOLERANCE,
        "checks": checks,
        "runs": runs,
        "max_abs_diff": max(r["max_abs_diff"] for r in runs),
        "ok": ok,
        "wall_s": round(time.perf_counter() - args.started, 2),
    }
    write_result(args.name, result)
    for r in runs:
        print(f"{r['device']:>4} {r['dtype']:<13} max |diff| {r['max_abs_diff']:.3g}  ok={r['ok']}")
    print("checks", checks, "\nparity", "OK" if ok else "FAILED", f"(tolerance {TOLERANCE})")
    return 0 if ok else 1


def self_check(args: argparse.Namespace) -> int:
    """Tessera's module alone: seeded random trunk, the repository's heads; no parity is claimed."""
    torch.manual_seed(args.seed)
    model = LpipsAlex().eval()
    heads = torch.load(REPO_HEADS, map_location="cpu", weights_only=True)
    model.load_state_dict({**model.state_dict(), **heads}, strict=True)
    failures = []
    with torch.no_grad():
        for size in SIZES:
            a, b = image_pairs(size, args.seed)
            d_ab, d_ba, d_aa = model(a, b), model(b, a), model(a, a)
            terms = model.layer_distances(a, b)
            print(f"{size:>4} px  d(a, b) = {[round(v, 5) for v in d_ab.tolist()]}")
            if not bool((d_ab > 0).all()):
                failures.append(f"{size} px: a distance of distinct images is not positive: {d_ab.tolist()}")
            if d_aa.abs().max().item() != 0.0:
                failures.append(f"{size} px: d(a, a) = {d_aa.tolist()}, expected 0")
            if (d_ab - d_ba).abs().max().item() > TOLERANCE:
                failures.append(f"{size} px: d(a, b) != d(b, a): {d_ab.tolist()} {d_ba.tolist()}")
            if (terms.sum(dim=1) - d_ab).abs().max().item() > TOLERANCE:
                failures.append(f"{size} px: the layer terms do not sum to the distance")
    for line in failures:
        print("FAILED:", line)
    print("self-check", "FAILED" if failures else "OK", "(Tessera's module only; parity NOT checked)")
    return 1 if failures else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lpips", default=None, help="the lpips wheel, or a folder holding the lpips package")
    p.add_argument("--self-check", action="store_true", help="check Tessera's module alone (no parity)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="lpips_parity")
    args = p.parse_args()
    args.started = time.perf_counter()
    sys.exit(self_check(args) if args.self_check else parity(args))


if __name__ == "__main__":
    main()
