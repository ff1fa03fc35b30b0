"""Few-step generation table: FID of PD, CD, CT and ADD students at 1, 2, 4, 8 steps against the teacher's DDIM at
the same NFE and at 256 steps.

    python -m experiments.fewstep_table --teacher RUN --pd RUN --cd RUN --ct RUN --add RUN [--steps 1,2,4,8]
        [--teacher-steps 256] [--num 1000] [--seed 0] [--batch-size 500] [--out DIR]
    python -m experiments.fewstep_table --quick [--out DIR]

--quick trains the four 8x8-digits students (configs/{pd,cd,ct}_mnist.py:digits and configs/add_digits.py, with
shortened budgets, see
QUICK_STEPS) from the v-parameterised quickstart teacher in runs/quickstart_v (trained first when missing, about
6 min) into OUT/runs/, then evaluates them; a finished or interrupted run there is resumed, not redone.
One row per (model, steps): NFE, domain-classifier FID (fid_domain: the data set's classifier's penultimate
features, research/metrics/evaluation.py) against the training split, and the floor (the test split against the
training split with the same number of images). Writes OUT/fewstep_table.{md,csv,png}.

Each student samples with its own sampler: PD students with DDIM on the trailing grid they were distilled on (the
checkpoint of the round that produced a k-step student), consistency models with multistep consistency sampling on
the first k points of the (k+1)-point EDM grid, ADD students by predicting x0 and re-noising it on the trailing grid
of k timesteps (only the k up to the number of timesteps they were trained at). The teacher uses DDIM (eta 0)
twice: on the repo's evenly spaced grid (whose first step at k <= 2 is far from the noisiest timestep, so it starts
from the wrong noise level) and on the trailing grid pd_timesteps(T, k), which starts at T-1 and is the grid PD
students use.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# Updates for --quick on two CPU cores: PD 4 rounds of 150 (16 -> 1 steps), CD 600, CT 800, ADD 1000.
QUICK_STEPS = {"pd": 150, "cd": 600, "ct": 800, "add": 1000}
QUICK_CONFIGS = {
    "pd": "configs/pd_mnist.py:digits",
    "cd": "configs/cd_mnist.py:digits",
    "ct": "configs/ct_mnist.py:digits",
    "add": "configs/add_digits.py",
}
METHODS = ("pd", "cd", "ct", "add")


def quick_config(method: str, teacher: str):
    from research.tasks import get_config

    overrides = [("fewstep.teacher_workdir", teacher)] if method != "ct" else []
    n = QUICK_STEPS[method]
    if method == "pd":
        overrides += [
            ("fewstep.pd_steps_per_round", str(n)),
            ("train.num_steps", str(4 * n)),
            ("train.ckpt_every", str(n)),
            ("train.sample_every", str(n)),
        ]
    else:
        every = n // 4 if method == "add" else n  # ADD keeps 4 checkpoints: its learning curve
        overrides += [("train.num_steps", str(n)), ("train.ckpt_every", str(every)), ("train.sample_every", str(n))]
    overrides += [("train.progress", "false"), ("train.log_every", "50")]
    return get_config(os.path.join(ROOT, QUICK_CONFIGS[method]), overrides)


def train_quick(out: str, teacher: str) -> dict:
    from research.train.loop import train

    runs = {}
    # Wall time of each run's training, summed over invocations (a finished run resumes in seconds; the table
    # reports what training actually cost).
    seconds_path = os.path.join(out, "train_seconds.json")
    seconds = json.load(open(seconds_path)) if os.path.isfile(seconds_path) else {}
    for method in METHODS:
        workdir = os.path.join(out, "runs", method)
        t0 = time.time()
        train(quick_config(method, teacher), workdir)
        seconds[method] = seconds.get(method, 0.0) + time.time() - t0
        with open(seconds_path, "w") as f:
            json.dump(seconds, f)
        print(f"trained {method} in {time.time() - t0:.0f}s -> {workdir}", flush=True)
        runs[method] = workdir
    return runs


def train_quick_teacher(teacher: str) -> None:
    """The v-parameterised quickstart (configs/quickstart.py with diffusion.prediction=v), about 6 minutes on
    two CPU cores; the students of --quick distil it."""
    from research.tasks import get_config
    from research.train.loop import train

    config = get_config(
        os.path.join(ROOT, "configs", "quickstart.py"), [("diffusion.prediction", "v"), ("train.progress", "false")]
    )
    t0 = time.time()
    train(config, teacher)
    print(f"trained the v teacher in {time.time() - t0:.0f}s -> {teacher}", flush=True)


def cached(path, compute):
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    value = compute()
    with open(path, "w") as f:
        json.dump(value, f)
    return value


def teacher_cell(workdir, steps, num, seed, batch_size, trailing=False):
    """The teacher's DDIM (eta 0) with `steps` evenly spaced timesteps (the repo's default), or on the trailing grid
    pd_timesteps(T, steps) that ends at the noisiest step T-1 (the grid a PD student samples on)."""
    from research.diffusion.distillation import pd_timesteps
    from research.loader import load_run
    from research.sampling import Generator, to_uint8

    config, model, params, _ = load_run(workdir)
    # a trailing comma makes even a single timestep an explicit list (research.sampling.parse_steps)
    spec = ",".join(map(str, pd_timesteps(config.diffusion.timesteps, steps))) + "," if trailing else str(steps)
    gen = Generator(model, config, sampler="ddim", steps=spec, eta=0.0, batch_size=min(batch_size, num))
    samples, _, nfe = gen.generate(params, num, seed=seed, progress=False)
    return to_uint8(samples, config.data.centered), int(nfe)


def student_cell(workdir, steps, num, seed, batch_size):
    from research.sampling import to_uint8
    from research.tasks.fewstep import generate, load_student, make_student_sampler

    config, model, params, ckpt_step = load_student(workdir, steps)
    sampler = make_student_sampler(config, model, steps, min(batch_size, num))
    samples, _, nfe = generate(
        sampler, params, num, min(batch_size, num), seed=seed, num_classes=config.model.get("num_classes", 0)
    )
    return to_uint8(samples, config.data.centered), nfe, ckpt_step


def student_timesteps(workdir: str) -> int:
    with open(os.path.join(workdir, "config.json")) as f:
        return int(json.load(f)["add"]["student_timesteps"])


def write_outputs(rows, floor, protocol, out):
    fields = ["model", "sampler", "steps", "nfe", "checkpoint_step", "fid_domain", "sample_seconds"]
    with open(os.path.join(out, "fewstep_table.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in fields})
    lines = ["| model | sampler | steps | NFE | checkpoint | FID (domain) |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['nfe']} | {r.get('checkpoint_step', '')} "
            f"| {r['fid_domain']:.3f} |"
        )
    lines.append(f"| floor (real test vs train) | | | | | {floor:.3f} |")
    with open(os.path.join(out, "fewstep_table.md"), "w") as f:
        f.write("\n".join(["# Few-step generation", ""] + protocol + [""] + lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for model in dict.fromkeys(r["model"] for r in rows):
        pts = [(r["nfe"], r["fid_domain"]) for r in rows if r["model"] == model and r.get("curve", True)]
        if pts:
            ax.plot(*zip(*sorted(pts)), marker="o", label=model)
    ref = [r for r in rows if not r.get("curve", True)]
    for r in ref:
        ax.axhline(r["fid_domain"], color="black", ls="--", lw=1, label=f"teacher DDIM {r['steps']} steps")
    ax.axhline(floor, color="gray", ls=":", lw=1, label="floor (test vs train)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel("FID (domain classifier)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = os.path.join(out, "fewstep_table.png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="train the digits students first (minutes on a CPU)")
    p.add_argument("--teacher", default=None, help="the teacher's workdir (default: the PD run's teacher)")
    p.add_argument("--pd", default=None)
    p.add_argument("--cd", default=None)
    p.add_argument("--ct", default=None)
    p.add_argument("--add", default=None)
    p.add_argument("--steps", default="1,2,4,8")
    p.add_argument("--teacher-steps", type=int, default=256)
    p.add_argument("--num", type=int, default=None, help="images per cell (default 1000 with --quick, else 10000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from research.config import ConfigError
    from research.metrics.evaluation import DatasetSpec, dataset_images, evaluate_images, feature_space

    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    num = args.num or (1000 if args.quick else 10_000)
    out = args.out or os.path.join(ROOT, "runs", "fewstep_table_quick" if args.quick else "fewstep_table")
    os.makedirs(os.path.join(out, "cells"), exist_ok=True)
    t_start = time.time()
    runs = {m: getattr(args, m) for m in METHODS}
    teacher = args.teacher
    if args.quick:
        teacher = teacher or os.path.join(ROOT, "runs", "quickstart_v")
        train_quick_teacher(teacher)  # resumes, or returns at once when the teacher is finished
        runs = train_quick(out, teacher)
    runs = {m: w for m, w in runs.items() if w}
    if teacher is None and runs.get("pd"):
        with open(os.path.join(runs["pd"], "config.json")) as f:
            teacher = json.load(f)["fewstep"]["teacher_workdir"]
    if teacher is None:
        print("error: give --teacher (or a --pd run, whose teacher is used)", file=sys.stderr)
        return 2
    seconds_path = os.path.join(out, "train_seconds.json")
    train_seconds = (
        sum(json.load(open(seconds_path)).values()) if os.path.isfile(seconds_path) else time.time() - t_start
    )
    try:
        with open(os.path.join(teacher, "config.json")) as f:
            dataset = json.load(f)["data"]["name"]
        space = feature_space("domain", dataset)
    except (OSError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ref = DatasetSpec(dataset, "train")
    kw = dict(kid=False, precision_recall=False, progress=False)
    floor_images, _ = dataset_images(DatasetSpec(dataset, "test"))
    floor_images = floor_images[:num]
    floor = cached(
        os.path.join(out, "cells", f"floor_{dataset}_n{len(floor_images)}.json"),
        lambda: evaluate_images(floor_images, space, ref, **kw),
    )["fid"]
    print(f"floor: {floor:.3f}", flush=True)

    rows = []

    def add(model, sampler, k, name, make, curve=True):
        def compute():
            t0 = time.time()
            images, nfe, *ckpt = make()
            res = evaluate_images(images, space, ref, **kw)
            return {"fid": res["fid"], "nfe": nfe, "ckpt": ckpt[0] if ckpt else "", "seconds": time.time() - t0}

        res = cached(os.path.join(out, "cells", f"{name}_n{num}_seed{args.seed}.json"), compute)
        rows.append(
            {
                "model": model,
                "sampler": sampler,
                "steps": k,
                "nfe": res["nfe"],
                "fid_domain": res["fid"],
                "checkpoint_step": res["ckpt"],
                "sample_seconds": round(res["seconds"], 1),
                "curve": curve,
            }
        )
        print(f"{model} {k} steps: NFE {res['nfe']}, FID {res['fid']:.3f}", flush=True)

    for k in steps:
        add(
            "teacher",
            "DDIM (eta 0), even grid",
            k,
            f"teacher_ddim{k}",
            lambda k=k: teacher_cell(teacher, k, num, args.seed, args.batch_size),
        )
    for k in steps:
        add(
            "teacher (trailing grid)",
            "DDIM (eta 0), trailing grid",
            k,
            f"teacher_ddim_trailing{k}",
            lambda k=k: teacher_cell(teacher, k, num, args.seed, args.batch_size, trailing=True),
        )
    add(
        "teacher",
        "DDIM (eta 0), even grid",
        args.teacher_steps,
        f"teacher_ddim{args.teacher_steps}",
        lambda: teacher_cell(teacher, args.teacher_steps, num, args.seed, args.batch_size),
        curve=False,
    )
    names = {
        "pd": ("PD student", "DDIM on its grid"),
        "cd": ("CD student", "consistency"),
        "ct": ("CT student", "consistency"),
        "add": ("ADD student", "x0, re-noise (trailing grid)"),
    }
    for method, workdir in runs.items():
        most = student_timesteps(workdir) if method == "add" else max(steps)
        for k in steps:
            if k > most:
                continue
            add(
                names[method][0],
                names[method][1],
                k,
                f"{method}_{k}",
                lambda k=k, w=workdir: student_cell(w, k, num, args.seed, args.batch_size),
            )

    budget = []
    for method, workdir in runs.items():
        with open(os.path.join(workdir, "config.json")) as f:
            c = json.load(f)
        budget.append(f"{method}: {c['train']['num_steps']} updates at batch {c['train']['batch_size']}")
    protocol = [
        f"Teacher: {teacher}. Students: " + ", ".join(f"{m} {w}" for m, w in runs.items()) + ".",
        "Budget: " + "; ".join(budget) + (f"; training took {train_seconds:.0f}s." if args.quick else "."),
        f"FID in the {dataset} domain classifier's feature space ({space.description}), {num} samples "
        f"(seed {args.seed}) against the {dataset} training split; floor = {len(floor_images)} real test "
        f"images against the same reference. Total time {time.time() - t_start:.0f}s.",
    ]
    png = write_outputs(rows, floor, protocol, out)
    print(open(os.path.join(out, "fewstep_table.md")).read())
    print(f"wrote {out}/fewstep_table.md, .csv and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
