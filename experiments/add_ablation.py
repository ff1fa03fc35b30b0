"""ADD ablation on the 8x8 digits, at small scale as the paper's Table 1: the discriminator's feature network, the
distillation term on and off, and its weight lambda.

    python -m experiments.add_ablation [--teacher runs/quickstart_v] [--num 1000] [--steps 1,2,4] [--out DIR]
        [--only NAME[,NAME...]] [--curve NAME]

Each variant is configs/add_digits.py with the overrides in VARIANTS, trained for the same 1000 updates at batch 64
from the same teacher (trained first when missing, as experiments/fewstep_table.py --quick does) into OUT/runs/NAME;
a finished run is reused and an interrupted one resumed. Every student is sampled at 1, 2 and 4 steps and scored
by the fewstep table's protocol: domain-classifier FID of 1000 samples against the digits training split.
Writes OUT/add_ablation.{md,json}; OUT defaults to runs/add_ablation. --curve NAME also scores every checkpoint the
variant kept (every 250 updates) at the same step counts: its learning curve, OUT/curve_NAME.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# name -> (what it changes, config overrides)
VARIANTS = {
    "classifier_l2.5": ("classifier features, lambda 2.5 (the default)", []),
    "teacher_l2.5": ("teacher-encoder features, lambda 2.5", [("add.features", "teacher")]),
    "classifier_l0": ("no distillation term (lambda 0)", [("add.distill_weight", "0.0")]),
    "classifier_l1": ("lambda 1", [("add.distill_weight", "1.0")]),
    "classifier_l5": ("lambda 5", [("add.distill_weight", "5.0")]),
    "distill_only": ("no adversarial term (distillation alone, lambda 2.5)", [("add.adversarial_weight", "0.0")]),
}


def variant_config(name: str, teacher: str):
    from research.tasks import get_config

    overrides = [("fewstep.teacher_workdir", teacher), ("train.progress", "false"), ("train.sample_every", "0")]
    return get_config(os.path.join(ROOT, "configs", "add_digits.py"), overrides + VARIANTS[name][1])


def learning_curve(workdir: str, steps: list, num: int, seed: int, out: str, name: str) -> list:
    """Domain FID of `num` samples at each of `steps` for every checkpoint of an ADD run -> rows; draws a plot."""
    from research.metrics.evaluation import DatasetSpec, evaluate_images, feature_space
    from research.run import checkpoint_steps
    from research.sampling import to_uint8
    from research.tasks.fewstep import generate, load_student, make_student_sampler

    space, ref = feature_space("domain", "digits"), DatasetSpec("digits", "train")
    rows = []
    for ckpt in checkpoint_steps(workdir):
        config, model, params, _ = load_student(workdir, step=int(ckpt))
        row = {"step": int(ckpt)}
        for k in steps:
            samples, _, _ = generate(make_student_sampler(config, model, k, 500), params, num, 500, seed=seed)
            images = to_uint8(samples, config.data.centered)
            row[str(k)] = evaluate_images(images, space, ref, kid=False, precision_recall=False, progress=False)["fid"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for k in steps:
        ax.plot([r["step"] for r in rows], [r[str(k)] for r in rows], marker="o", label=f"{k} step{'s' * (k > 1)}")
    ax.set_yscale("log")
    ax.set_xlabel("ADD training step")
    ax.set_ylabel("FID (domain classifier)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"curve_{name}.png"), dpi=120)
    plt.close(fig)
    with open(os.path.join(out, f"curve_{name}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=os.path.join(ROOT, "runs", "quickstart_v"))
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--steps", default="1,2,4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="")
    p.add_argument("--curve", default="")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "add_ablation"))
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"error: unknown variants {unknown}; choose from {list(VARIANTS)}", file=sys.stderr)
        return 2

    from experiments.fewstep_table import cached, student_cell, train_quick_teacher
    from research.metrics.evaluation import DatasetSpec, evaluate_images, feature_space
    from research.train.loop import train

    teacher = os.path.abspath(args.teacher)
    train_quick_teacher(teacher)
    steps = [int(k) for k in args.steps.split(",")]
    space, ref = feature_space("domain", "digits"), DatasetSpec("digits", "train")
    os.makedirs(os.path.join(args.out, "cells"), exist_ok=True)
    results = {}
    for name in names:
        workdir = os.path.join(args.out, "runs", name)
        t0 = time.time()
        train(variant_config(name, teacher), workdir)
        row = {"what": VARIANTS[name][0], "train_seconds": round(time.time() - t0, 1), "fid": {}}
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            logged = [r for r in map(json.loads, f) if "d_accuracy" in r]
        row["d_accuracy_last100"] = sum(r["d_accuracy"] for r in logged[-100:]) / max(len(logged[-100:]), 1)
        for k in steps:

            def compute(k=k, workdir=workdir):
                images, nfe, _ = student_cell(workdir, k, args.num, args.seed, 500)
                return {"fid": evaluate_images(images, space, ref, kid=False, precision_recall=False, progress=False)}

            cell = cached(os.path.join(args.out, "cells", f"{name}_{k}_n{args.num}_seed{args.seed}.json"), compute)
            row["fid"][str(k)] = cell["fid"]["fid"]
        results[name] = row
        print(name, json.dumps(row), flush=True)

    lines = [
        "# ADD ablation, 8x8 digits",
        "",
        f"Teacher {teacher}; every student 1000 updates at batch 64 (configs/add_digits.py + the overrides); "
        f"domain FID of {args.num} samples (seed {args.seed}) against the digits training split.",
        "",
        "| variant | " + " | ".join(f"FID {k} step{'s' if k > 1 else ''}" for k in steps) + " | D accuracy |",
        "|---|" + "---:|" * (len(steps) + 1),
    ]
    for row in results.values():
        fids = " | ".join(f"{row['fid'][str(k)]:.2f}" for k in steps)
        lines.append(f"| {row['what']} | {fids} | {row['d_accuracy_last100']:.3f} |")
    if args.curve:
        run = os.path.join(args.out, "runs", args.curve)
        rows = learning_curve(run, steps, args.num, args.seed, args.out, args.curve)
        points = "; ".join(f"{r['step']}: " + ", ".join(f"{r[str(k)]:.1f}" for k in steps) for r in rows)
        lines += ["", f"Learning curve of {args.curve} (FID at {args.steps} steps per checkpoint): {points}."]
    with open(os.path.join(args.out, "add_ablation.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "add_ablation.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
