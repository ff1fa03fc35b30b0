"""ADD ablation on the 8x8 digits, at small scale as the paper's Table 1: a preset of experiments/sweep.py.

    python -m experiments.add_ablation [--teacher runs/quickstart_v] [--seeds 0] [--num 1000] [--steps 1,2,4]
        [--only NAME[,NAME...]] [--curve NAME] [--out DIR] [--dry-run]

Each row is a variant of configs/add_digits.py (the discriminator's feature network, the distillation term's weight
lambda, the adversarial term on or off), trained for the config's 1000 updates at batch 64 from the same teacher
(trained first when missing, as experiments/fewstep_table.py --quick does). The sweep runner trains each variant x
seed into OUT/runs, samples every student at --steps and scores it by the fewstep table's protocol (domain-classifier
FID of --num samples against the digits training split), and reads the discriminator's accuracy over the last 10%
of logged updates. Writes OUT/table.{md,csv} (mean +- std over --seeds) and OUT/table_*.png; OUT defaults to
runs/add_ablation. --curve NAME also scores every checkpoint that variant kept (every 250 updates) at the same step
counts: OUT/curve_NAME.md and OUT/curve_NAME_curve_fid_domain.png, its learning curve. Finished runs and
evaluations are read back, an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# variant of configs/add_digits.py -> what it changes
VARIANTS = {
    "classifier": "classifier features, lambda 2.5 (the default)",
    "teacher": "teacher-encoder features, lambda 2.5",
    "classifier-l0": "no distillation term (lambda 0)",
    "classifier-l1": "lambda 1",
    "classifier-l5": "lambda 5",
    "classifier-noadv": "no adversarial term (distillation alone, lambda 2.5)",
}


def sweep_argv(names, teacher, steps, num, seeds, out) -> list:
    """The experiments.sweep command line of the ablation's variants `names`."""
    return [
        "--config",
        "configs/add_digits.py",
        "--grid",
        "variant=" + ",".join(names),
        "--grid",
        f"eval.steps={steps}",
        "--set",
        f"eval.num={num}",
        "--set",
        f"fewstep.teacher_workdir={teacher}",
        "--set",
        "train.sample_every=0",
        "--seeds",
        seeds,
        "--eval",
        "fid_domain,log.d_accuracy",
        "--out",
        out,
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=os.path.join("runs", "quickstart_v"))
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--steps", default="1,2,4")
    p.add_argument("--seeds", default="0")
    p.add_argument("--only", default="")
    p.add_argument("--curve", default="")
    p.add_argument("--out", default=os.path.join("runs", "add_ablation"))
    p.add_argument("--dry-run", action="store_true", help="list the sweep's cells and exit")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(VARIANTS)
    unknown = [n for n in names + ([args.curve] if args.curve else []) if n not in VARIANTS]
    if unknown:
        print(f"error: unknown variants {unknown}; choose from {list(VARIANTS)}", file=sys.stderr)
        return 2
    from experiments.sweep import main as sweep_main

    command = sweep_argv(names, args.teacher, args.steps, args.num, args.seeds, args.out)
    runs = [command]
    if args.curve:
        curve = sweep_argv([args.curve], args.teacher, args.steps, args.num, args.seeds.split(",")[0], args.out)
        runs.append(curve + ["--curve", "--table", f"curve_{args.curve}"])
    if args.dry_run:
        return max(sweep_main(c + ["--dry-run"]) for c in runs)
    from experiments.fewstep_table import train_quick_teacher

    train_quick_teacher(os.path.abspath(args.teacher))  # a finished teacher is read back, a partial one resumed
    for c in runs:
        print("python -m experiments.sweep " + " ".join(c), flush=True)
        code = sweep_main(c)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
