"""The Improved DDPM ablation, {linear, cosine} schedule x {L_simple, L_hybrid}: a preset of experiments/sweep.py.

    python -m experiments.iddpm_ablation [--data digits|mnist] [--seeds 0,1,2] [--eval-steps 25,50,100,1000]
        [--eval-num 200] [--steps N] [--out DIR] [--quick] [--dry-run]

Runs `python -m experiments.sweep` over the four variants of configs/iddpm_<data>.py (L_simple with fixed-small
variance; L_hybrid with learned-range variance) x --seeds, and evaluates each EMA model's variational bound in
bits/dim on --eval-num test images with the schedule respaced to each of --eval-steps (1000 is the full chain),
plus the training loss. Everything the sweep runner does holds: one workdir per variant and seed under OUT/runs,
resumable, OUT/table.{md,csv} with mean +- std over seeds, OUT/table_bpd.png (bits/dim against steps), and
checkpoints every 500 steps (4 kept) for `python -m experiments.sweep ... --curve`. The command it runs is printed
first and written at the top of OUT/table.md.

--data digits (default): configs/iddpm_digits.py, the quickstart network and recipe (2000 steps, which converge;
REPRODUCTION.md, "Improved DDPM"), about 4 min of training per run on 2 CPU cores. --data mnist:
configs/iddpm_mnist.py, 3000 steps per run. --steps overrides the training length; --quick is a smoke test
(digits, 60 steps, seed 0, 16 test images, 25 and 100 steps; a few minutes, not a result).
"""

from __future__ import annotations

import argparse
import sys

VARIANTS = ("linear-simple", "linear-hybrid", "cosine-simple", "cosine-hybrid")


def sweep_argv(args) -> list:
    """The experiments.sweep command line for the parsed arguments of this script."""
    argv = [
        "--config",
        f"configs/iddpm_{args.data}.py",
        "--grid",
        "variant=" + ",".join(VARIANTS),
        "--grid",
        f"eval.steps={args.eval_steps}",
        "--set",
        f"eval.bpd_num={args.eval_num}",
        "--set",
        "train.ckpt_every=500",
        "--set",
        "train.keep_checkpoints=4",
    ]
    if args.steps:
        argv += ["--set", f"train.num_steps={args.steps}"]
    return argv + ["--seeds", args.seeds, "--eval", "bpd,loss", "--out", args.out]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=("digits", "mnist"), default="digits")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--eval-steps", default="25,50,100,1000")
    p.add_argument("--eval-num", type=int, default=200)
    p.add_argument("--steps", type=int, default=0, help="training steps per run (default: the config's)")
    p.add_argument("--out", default=None, help="default runs/sweep_iddpm_<data>")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="list the sweep's cells and exit")
    args = p.parse_args(argv)
    if args.steps < 0 or args.eval_num < 1:
        p.error("--steps must be >= 0 and --eval-num >= 1")
    if args.quick:
        args.data, args.steps, args.seeds, args.eval_num, args.eval_steps = "digits", 60, "0", 16, "25,100"
        args.out = args.out or "runs/iddpm_ablation_quick"
    args.out = args.out or f"runs/sweep_iddpm_{args.data}"
    command = sweep_argv(args) + (["--dry-run"] if args.dry_run else [])
    print("python -m experiments.sweep " + " ".join(command), flush=True)
    from experiments.sweep import main as sweep_main

    return sweep_main(command)


if __name__ == "__main__":
    sys.exit(main())
