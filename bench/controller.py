"""The routing controller's quality/cost frontier on the reference model, on this machine's CPU.

1. Students: a students bundle from `task: distill` (--students), or, without one, students distilled
   here with the project's trainer (core/distill/trainer.py) from the teacher's own attention in
   generation runs at the bench's resolution (recorded as `students.source`).
2. The cost table: every layer's teacher and student attention timed at that resolution.
3. The controller, trained in this process with the same code the job runs (core/control: episode,
   learner), for --updates updates of --groups seeds x K rollouts; group g of update u is trained at
   quality_speed --quality-speeds[(u * groups + g) % len] (the policy sees q; the reward's target
   share is q times the share of every ready layer).
4. Evaluation on held-out seeds: PSNR and LPIPS of the decoded image against the teacher's, and the
   measured attention-time share routed, for the learned policy (threshold, at each
   --eval-quality-speeds), the
   fixed policies (no layer routed; every ready layer routed at every step) and, per learned point,
   a random subset of the ready layers with the same number of layers at every step (the layers
   have one attention shape, so the same count is the same measured share up to timing noise; both
   shares are reported).

    python bench/controller.py [--students PATH] [--size 128] [--steps 4] [--updates 30]
        [--quality-speeds 0 0.5 1] [--lpips-backbone PATH] [--perceptual-weight W]

LPIPS (runner/perceptual.py) needs torchvision's AlexNet checkpoint: --lpips-backbone PATH (then
required) or the torch hub cache; without it every point's "lpips" is null and the result's "lpips"
says why. --perceptual-weight > 0 puts LPIPS in the training reward and requires it.

Results: bench/results/<--name>.json and .png (default controller).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, write_result  # noqa: E402
from core.attention.config import StudentConfig  # noqa: E402
from core.attention.routes import CaptureRoute  # noqa: E402
from core.attention.student import Student, build_student  # noqa: E402
from core.control.episode import (  # noqa: E402
    EpisodeConfig,
    EpisodeModel,
    GroupTask,
    episode_sigmas,
    episode_state,
    run_group,
    trajectory,
)
from core.control.inference import InferenceRouter  # noqa: E402
from core.control.learner import Learner, LearnerConfig  # noqa: E402
from core.control.policy import PolicyConfig  # noqa: E402
from core.control.reward import RewardConfig  # noqa: E402
from core.control.rollout import MaskPlan  # noqa: E402
from core.distill.capture import Capture, CaptureMeta  # noqa: E402
from core.distill.loss import DistillLossConfig  # noqa: E402
from core.distill.trainer import LayerTrainer, TrainerConfig  # noqa: E402
from core.eval.metrics import psnr  # noqa: E402
from core.flow.seeds import derive_seed  # noqa: E402
from core.models.attention_hook import attach, layer_keys  # noqa: E402
from core.models.loading import ModelSpec  # noqa: E402
from runner.control.timing import measure_cost_table  # noqa: E402
from runner.models import load_model  # noqa: E402
from runner.perceptual import LpipsColumn, LpipsUnavailableError, lpips_column  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# 2 x 2-token tiles, radius 1: a 6 x 6-token window of the 8 x 8 grid at 128 px; 16 landmarks of 64.
BENCH_STUDENT = StudentConfig(heads=6, head_dim=64, landmark_min=16, local_tile=2)


def captures_of(model: EpisodeModel, cfg: EpisodeConfig, seed: int, prompt: int) -> dict[str, list[Capture]]:
    """Every layer's attention at every step of the teacher's generation with `seed`, all queries."""
    out: dict[str, list[Capture]] = {}

    def keep(record, teacher) -> None:
        q, k, v, o = (x.permute(0, 2, 1, 3).clone() for x in (record.q, record.k, record.v, teacher))
        idx = torch.arange(q.shape[2])
        meta = CaptureMeta(
            layer=record.layer, step=record.step, sigma=float(record.sigma[0]), cfg=1.0,
            text_len=record.n_text, latent_h=record.rows, latent_w=record.cols,
            prompt_id=prompt, seed_id=seed,
        )  # fmt: skip
        out.setdefault(record.layer, []).append(
            Capture(meta=meta, q_sub=q, k=k, v=v, teacher_sub=o, query_index=idx)
        )

    with attach(model.backbone.transformer, CaptureRoute(keep)):
        trajectory(model, cfg, seed, None, ())
    return out


def distil_students(model: EpisodeModel, cfg: EpisodeConfig, *, runs: int, updates: int) -> tuple[dict, dict]:
    train: dict[str, list[Capture]] = {}
    for r in range(runs):
        for key, caps in captures_of(model, cfg, derive_seed(7, "distil", r), r).items():
            train.setdefault(key, []).extend(caps)
    held = captures_of(model, cfg, derive_seed(7, "distil-held-out"), runs)
    students, record = {}, {}
    for i, key in enumerate(layer_keys(model.backbone.transformer)):
        student = build_student(BENCH_STUDENT, seed=i)
        trainer = LayerTrainer(student, TrainerConfig(), DistillLossConfig(), seed=i)
        before = trainer.evaluate(held[key])
        for u in range(updates):
            trainer.update([train[key][u % len(train[key])]])
        after = trainer.evaluate(held[key])
        students[key] = student.eval()
        record[key] = {
            "held_out_cosine_before": round(1 - before.cosine_distance, 5),
            "held_out_cosine_after": round(1 - after.cosine_distance, 5),
            "held_out_nmse_after": round(after.nmse, 5),
        }
    return students, record


def plan_of(layer_sets: list[frozenset[str]], layers: tuple[str, ...], sigmas: list[float]) -> MaskPlan:
    full = torch.tensor([[k not in s for k in layers] for s in layer_sets], dtype=torch.bool)
    return MaskPlan(tuple(sigmas), full, torch.ones_like(full), torch.zeros(len(sigmas)))


def evaluate(model, cfg, cost, layers, sets_for_seed, seeds, teachers, lpips: LpipsColumn) -> dict:
    sigmas = episode_sigmas(cfg)[:-1]
    psnrs, shares, ms, distances = [], [], [], []
    for seed, teacher in zip(seeds, teachers, strict=True):
        sets = sets_for_seed(seed)
        plan = plan_of(sets, layers, sigmas)
        routed = trajectory(model, cfg, seed, plan, layers)
        psnrs.append(psnr(routed.image, teacher.image))
        distances.append(lpips.score(routed.image, teacher.image))
        shares.append(float(cost.routed_share(plan.full, layers).mean()))
        full_ms = float(cost.attention_ms(torch.ones_like(plan.full), layers).mean())
        ms.append(float(cost.attention_ms(plan.full, layers).mean()) / full_ms)
    identical = all(p == float("inf") for p in psnrs)
    return {  # psnr None: every image equals the teacher's bit for bit (nothing routed)
        "psnr_db": None if identical else round(statistics.mean(psnrs), 3),
        "psnr_db_per_seed": [None if p == float("inf") else round(p, 3) for p in psnrs],
        # None: LPIPS not measured (the result's "lpips" says why), never a number from random weights
        "lpips": None if None in distances else round(statistics.mean(distances), 5),
        "routed_share": round(statistics.mean(shares), 4),
        "attention_time_ratio": round(statistics.mean(ms), 4),
    }


def random_sets(learned_sets, ready: tuple[str, ...], seed: int, draw: int) -> list[frozenset[str]]:
    g = torch.Generator().manual_seed(derive_seed(seed, "random-subset", draw) & ((1 << 63) - 1))
    out = []
    for s in learned_sets:
        perm = torch.randperm(len(ready), generator=g).tolist()
        out.append(frozenset(ready[i] for i in perm[: len(s)]))
    return out


def frontier_png(points: dict, path: Path) -> None:
    from PIL import Image, ImageDraw

    w, h, pad = 640, 420, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    ps = [p["psnr_db"] for p in points.values() if p["psnr_db"] is not None]
    lo, hi = min(ps) - 1, max(ps) + 1

    def xy(share, db):
        return pad + share * (w - 2 * pad), h - pad - (min(db, hi) - lo) / (hi - lo) * (h - 2 * pad)

    d.line([(pad, h - pad), (w - pad, h - pad)], fill="black")
    d.line([(pad, pad), (pad, h - pad)], fill="black")
    d.text((w // 2 - 80, h - pad + 20), "routed attention-time share", fill="black")
    d.text((5, pad - 30), f"PSNR vs teacher, dB ({lo:.1f} .. {hi:.1f})", fill="black")
    for name, p in points.items():
        x, y = xy(p["routed_share"], hi if p["psnr_db"] is None else p["psnr_db"])  # None: identical
        color = "red" if name.startswith("learned") else "blue" if name.startswith("random") else "black"
        d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
        d.text((x + 6, y - 6), name, fill=color)
    img.save(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--students", default="")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--updates", type=int, default=30)
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--rollouts", type=int, default=4)
    ap.add_argument("--distil-runs", type=int, default=4)
    ap.add_argument("--distil-updates", type=int, default=120)
    ap.add_argument("--eval-seeds", type=int, default=4)
    ap.add_argument("--random-draws", type=int, default=4)
    ap.add_argument("--quality-speeds", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    ap.add_argument(
        "--eval-quality-speeds", type=float, nargs="+", default=None, help="default: trained ones"
    )
    ap.add_argument("--lpips-backbone", default=None, help="alexnet-owt-7be5be79.pth (then required)")
    ap.add_argument("--perceptual-weight", type=float, default=0.0)
    ap.add_argument("--name", default="controller", help="result file name under bench/results/")
    args = ap.parse_args()
    try:
        required = args.lpips_backbone is not None or args.perceptual_weight > 0
        lpips = lpips_column(args.lpips_backbone, required=required)
    except LpipsUnavailableError as err:
        raise SystemExit(f"--perceptual-weight {args.perceptual_weight}: {err}") from None
    print("lpips:", "measured" if lpips.measured else f"not measured ({lpips.weights.reason})", flush=True)
    eval_qs = args.eval_quality_speeds or args.quality_speeds
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    loaded = load_model(ModelSpec(), "cpu")
    latent = args.size // loaded.vae.scale_factor
    reward_cfg = RewardConfig(perceptual_weight=args.perceptual_weight)
    lcfg = LearnerConfig()
    cfg = EpisodeConfig(
        latent_h=latent, latent_w=latent, steps=args.steps, rollouts=args.rollouts, job_seed=0,
        prob_floor=lcfg.prob_floor, entropy_weight=lcfg.entropy_weight, reward=reward_cfg,
    )  # fmt: skip
    model = EpisodeModel(loaded.backbone, loaded.vae.decode, loaded.make_cond(), {})
    layers = tuple(layer_keys(loaded.backbone.transformer))
    if args.students:
        from runner.distill.bundle import load_bundle

        bundle = load_bundle(args.students)
        students: dict[str, Student] = {k: e.build("cpu") for k, e in bundle.layers.items() if e.may_serve}
        students_record = {"source": args.students, "servable": sorted(students)}
    else:
        students, per_layer = distil_students(model, cfg, runs=args.distil_runs, updates=args.distil_updates)
        students_record = {
            "source": "distilled in this bench (no trained bundle from task: distill was available)",
            "config": BENCH_STUDENT.__dict__, "runs": args.distil_runs,
            "updates_per_layer": args.distil_updates,
            "layers": per_layer,
        }  # fmt: skip
    t_students = time.perf_counter() - t0
    model = EpisodeModel(
        loaded.backbone, loaded.vae.decode, loaded.make_cond(), students,
        lpips.model if args.perceptual_weight > 0 else None,
    )  # fmt: skip
    cost = measure_cost_table(
        loaded.backbone, model.cond, students, latent_h=latent, latent_w=latent, repeats=7
    )
    ready = tuple(k for k in layers if k in students)
    learner = Learner(PolicyConfig(layers=layers, hidden=64), lcfg, seed=0)
    history = []
    qs = args.quality_speeds
    for u in range(args.updates):
        rollouts, share_by_q = [], {}
        for g in range(args.groups):
            q = qs[(u * args.groups + g) % len(qs)]
            task = GroupTask(u, g, derive_seed(0, "train", u, g), q)
            _, out = run_group(model, learner.policy, cost, cfg, task)
            rollouts += [r for r, _ in out]
            share_by_q.setdefault(str(q), []).extend(r.reward.share for r, _ in out)
        s = learner.update(rollouts)
        shares = {q: round(statistics.mean(v), 4) for q, v in share_by_q.items()}
        history.append(
            {"update": u + 1, **{k: round(v, 5) for k, v in s.as_metrics().items()}, "share_by_q": shares}
        )
        print(
            f"update {u + 1}: reward {s.reward_mean:.4f} share by q {shares} quality {s.quality_mean:.4f} "
            f"p_full {s.p_full_mean:.3f} |logit| max {s.logit_abs_max:.2f} "
            f"({time.perf_counter() - t0 - t_students:.0f} s)",
            flush=True,
        )
    t_train = time.perf_counter() - t0 - t_students
    seeds = [derive_seed(0, "eval", i) for i in range(args.eval_seeds)]
    teachers = [trajectory(model, cfg, s, None, layers) for s in seeds]
    sigmas = episode_sigmas(cfg)[:-1]
    points = {
        "none": evaluate(
            model, cfg, cost, layers, lambda s: [frozenset()] * len(sigmas), seeds, teachers, lpips
        ),
        "all_ready": evaluate(
            model, cfg, cost, layers, lambda s: [frozenset(ready)] * len(sigmas), seeds, teachers, lpips
        ),
    }
    comparisons = {}
    for q in eval_qs:
        state = episode_state(model, cfg, q)
        router = InferenceRouter(learner.policy, frozenset(ready), mode="threshold", quality_speed=q)
        with torch.no_grad():
            p_full = torch.sigmoid(learner.policy.logits([state.at(sg) for sg in sigmas]))
        learned_sets = [
            frozenset(router.decide(state.at(sg), i).student_layers) for i, sg in enumerate(sigmas)
        ]
        name = f"learned q={q}"
        points[name] = evaluate(
            model, cfg, cost, layers, lambda s, fixed=learned_sets: fixed, seeds, teachers, lpips
        )
        points[name]["p_full_per_step"] = [[round(x, 4) for x in row] for row in p_full.tolist()]
        points[name]["student_layers_per_step"] = [sorted(x) for x in learned_sets]
        draws = [
            evaluate(
                model,
                cfg,
                cost,
                layers,
                lambda s, d=d, fixed=learned_sets: random_sets(fixed, ready, s, d),
                seeds,
                teachers,
                lpips,
            )
            for d in range(args.random_draws)
        ]
        dbs = [x["psnr_db"] for x in draws]
        rnd = {
            "psnr_db": None if None in dbs else round(statistics.mean(dbs), 3),
            "psnr_db_per_draw": [x["psnr_db"] for x in draws],
            "lpips": None
            if None in [x["lpips"] for x in draws]
            else round(statistics.mean(x["lpips"] for x in draws), 5),
            "routed_share": round(statistics.mean(x["routed_share"] for x in draws), 4),
            "attention_time_ratio": round(statistics.mean(x["attention_time_ratio"] for x in draws), 4),
        }
        points[f"random q={q}"] = rnd
        comparisons[name] = {
            "learned_psnr_db": points[name]["psnr_db"],
            "random_psnr_db": rnd["psnr_db"],
            "margin_db": None
            if None in (points[name]["psnr_db"], rnd["psnr_db"])
            else round(points[name]["psnr_db"] - rnd["psnr_db"], 3),
            "learned_share": points[name]["routed_share"],
            "random_share": rnd["routed_share"],
        }
    result = {
        "setup": {
            "size_px": args.size,
            "steps": args.steps,
            "updates": args.updates,
            "groups": args.groups,
            "rollouts": args.rollouts,
            "quality_speeds": qs,
            "eval_quality_speeds": eval_qs,
            "target_share": "quality_speed x the share of every ready layer",
            "eval_seeds": args.eval_seeds,
            "random_draws": args.random_draws,
            "threads": 1,
        },  # fmt: skip
        "students": students_record,
        "lpips": lpips.record(),
        "perceptual_weight": args.perceptual_weight,
        "cost_table": cost.as_record(),
        "points": points,
        "learned_vs_random": comparisons,
        "training": history,
        "seconds": {
            "students": round(t_students, 1),
            "controller": round(t_train, 1),
            "per_update": round(t_train / max(args.updates, 1), 1),
            "total": round(time.perf_counter() - t0, 1),
        },
        "environment": environment(),
    }
    write_result(args.name, result)
    frontier_png(points, RESULTS / f"{args.name}.png")
    for name, p in points.items():
        print(f"{name:16s} PSNR {p['psnr_db']} dB  LPIPS {p['lpips']}  share {p['routed_share']:.3f}")
    for name, c in comparisons.items():
        print(f"{name}: learned - random = {c['margin_db']} dB")


if __name__ == "__main__":
    main()
