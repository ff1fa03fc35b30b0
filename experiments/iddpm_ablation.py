"""The Improved DDPM ablation at MNIST scale: {linear, cosine} schedule x {L_simple, L_hybrid}.

    python -m experiments.iddpm_ablation [--out runs/iddpm_ablation] [--steps 400] [--quick]
        [--eval-steps 25,50,100,1000] [--eval-num 16]

Trains the four variants of configs/iddpm_mnist.py (L_simple with fixed-small variance; L_hybrid with
learned-range variance) for the same budget (--steps at batch 64), then evaluates each EMA model's variational
bound in bits/dim on MNIST test images with the schedule respaced to each of --eval-steps (the last entry is
the full chain). Writes OUT/ablation.csv, OUT/ablation.md and OUT/ablation.png (bits/dim vs steps).
Each run and each evaluation is cached in OUT, so an interrupted run picks up where it stopped.

Default budget: 400 steps x 64 images per variant (under half an MNIST epoch), bits/dim on 16 test images;
on 2 CPU cores this takes about 35 minutes. Raise --steps and --eval-num for a result that separates the
variants beyond their error bars. --quick: 60 steps, 8 images, eval at 25,100 steps (minutes; a smoke test,
not a result).
FID joins the table when the evaluation issue's metrics land.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

VARIANTS = ("linear-simple", "linear-hybrid", "cosine-simple", "cosine-hybrid")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_variant(variant, out, train_steps, eval_steps, eval_num, progress=True):
    from research.data import make_eval_arrays
    from research.evaluate import evaluate_bpd
    from research.loader import load_run
    from research.tasks import get_config
    from research.train.loop import train

    workdir = os.path.join(out, variant)
    config = get_config(
        os.path.join(ROOT, "configs/iddpm_mnist.py") + ":" + variant,
        [
            ("train.num_steps", str(train_steps)),
            ("train.ckpt_every", str(train_steps)),
            ("train.progress", str(progress)),
        ],
    )
    timing_path = os.path.join(workdir, "train_seconds.json")
    if not os.path.exists(timing_path):
        t0 = time.time()
        train(config, workdir)
        with open(timing_path, "w") as f:
            json.dump({"seconds": time.time() - t0}, f)
    train_seconds = json.load(open(timing_path))["seconds"]
    config, model, params, _ = load_run(workdir)
    images, _ = make_eval_arrays(config.data, "test", num=eval_num)
    rows = []
    for steps in eval_steps:
        path = os.path.join(workdir, "eval", f"ablation_bpd_{steps}_{eval_num}.json")
        if not os.path.exists(path):
            t0 = time.time()
            result = evaluate_bpd(model, params, config, images, steps=steps, batch_size=eval_num, progress=progress)
            result["seconds"] = time.time() - t0
            os.makedirs(os.path.dirname(path), exist_ok=True)
            json.dump(result, open(path, "w"))
        result = json.load(open(path))
        rows.append(
            {
                "variant": variant,
                "schedule": variant.split("-")[0],
                "loss": variant.split("-")[1],
                "variance": config.diffusion.var_type,
                "train_steps": train_steps,
                "eval_steps": steps,
                "bpd": result["bpd"],
                "bpd_stderr": result["bpd_stderr"],
                "eval_images": eval_num,
                "train_seconds": round(train_seconds, 1),
                "eval_seconds": round(result["seconds"], 1),
            }
        )
    return rows


def write_outputs(rows, out, eval_steps, wall):
    with open(os.path.join(out, "ablation.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [
        f"bits/dim (lower is better) on {rows[0]['eval_images']} MNIST test images, EMA weights, "
        f"{rows[0]['train_steps']} training steps x 64 per variant; total wall time {wall / 60:.1f} min",
        "",
        "| variant | variance | " + " | ".join(f"{s} steps" for s in eval_steps) + " | train s |",
        "|---|---|" + "---|" * len(eval_steps) + "---|",
    ]
    for v in VARIANTS:
        vr = [r for r in rows if r["variant"] == v]
        if vr:
            lines.append(
                f"| {v} | {vr[0]['variance']} | "
                + " | ".join(f"{r['bpd']:.3f} ± {r['bpd_stderr']:.3f}" for r in vr)
                + f" | {vr[0]['train_seconds']:.0f} |"
            )
    table = "\n".join(lines)
    open(os.path.join(out, "ablation.md"), "w").write(table + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for v in VARIANTS:
        vr = [r for r in rows if r["variant"] == v]
        if vr:
            ax.errorbar(
                [r["eval_steps"] for r in vr],
                [r["bpd"] for r in vr],
                [r["bpd_stderr"] for r in vr],
                marker="o",
                label=v,
                capsize=3,
            )
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("sampling steps (respaced)"), ax.set_ylabel("bits/dim (variational bound)")
    ax.set_title("iDDPM ablation, MNIST"), ax.legend(), ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "ablation.png"), dpi=120)
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/iddpm_ablation")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-steps", default="25,50,100,1000")
    p.add_argument("--eval-num", type=int, default=16)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.eval_num, args.eval_steps = 60, 8, "25,100"
        args.out = args.out if args.out != "runs/iddpm_ablation" else "runs/iddpm_ablation_quick"
    eval_steps = [int(s) for s in args.eval_steps.split(",")]
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    rows = []
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            p.error(f"unknown variant {variant}; choose from {VARIANTS}")
        print(f"== {variant}", flush=True)
        rows += run_variant(variant, args.out, args.steps, eval_steps, args.eval_num)
    print(write_outputs(rows, args.out, eval_steps, time.time() - t0))
    print(f"wrote {args.out}/ablation.csv, ablation.md, ablation.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
