"""Compare samplers of one trained run by FID against the number of network evaluations (NFE).

    python -m experiments.compare_samplers --workdir RUN [--samplers ddpm,ddim] [--eta 0,1]
        [--steps 10,20,50,100,1000] [--num 10000] [--metric fid_domain,fid_inception] [--ref DATASET:SPLIT]
        [--floor DATASET:SPLIT] [--seed 0] [--batch-size 500] [--no-ema] [--step N] [--out DIR] [--no-kid]

Every cell (sampler, eta, steps) draws --num samples with fixed seeds (batch b uses fold_in(seed, b), so cells
differ only in the sampler), saves them (cells/<cell>.npz) and a grid (cells/<cell>.png), and evaluates each
metric against the reference split (default: the run's dataset, train split, all images). eta applies to DDIM
only. 'ddpm' is the ancestral sampler with the run's variance: for a fixed-small (posterior) variance it is
exactly DDIM with eta=1 given the same noise, so those rows coincide. 'ddpm_large' is ancestral sampling with
sigma_t^2 = beta_t (fixed-large), the DDIM paper's sigma-hat row (Song et al. 2021, Table 1). 'dpm++2m',
'dpm++3m', 'dpm++2s' and 'unipc' are the fast ODE solvers (research/diffusion/solvers.py) on the run's
sample.grid (uniform by default), one network evaluation per step. The FID floor
(--floor, default the dataset's test split, --num images, against the same reference) is the score of real
held-out images, the best a sampler can reach at this sample count. When the test
split is smaller than --num (digits: 297 images) the floor uses the whole split and the table's protocol line says
so; this is decided, like every check of the arguments, before any sampling starts.

Writes OUT/compare_samplers.csv, OUT/compare_samplers.md (protocol in the header) and OUT/compare_samplers.png
(metric vs NFE, log scale, floor dashed). Samples and metric values are cached per cell: an interrupted run
resumes, and adding a metric or a step count reuses what exists. OUT defaults to RUN/compare_samplers.

Metrics: fid_inception (FID Inception-v3, pytorch-fid protocol), fid_domain (the dataset's domain classifier
features; also gives its classifier score), each with KID and improved precision/recall unless --no-kid/--no-pr.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from typing import Optional

import numpy as np

METRICS = {"fid_inception": "inception", "fid_domain": "domain"}
SAMPLERS = ("ddpm", "ddpm_large", "ddim", "dpm++2m", "dpm++3m", "dpm++2s", "unipc")


def parse_list(text, cast):
    return [cast(v) for v in str(text).split(",") if v.strip()]


def _numbers(text, cast, flag):
    from research.metrics.evaluation import EvaluationError

    try:
        values = parse_list(text, cast)
    except ValueError:
        raise EvaluationError(f"{flag} {text}: expected a comma list of {cast.__name__}s") from None
    if not values or any(v != v for v in values):  # empty or NaN
        raise EvaluationError(f"{flag} {text}: expected a comma list of {cast.__name__}s")
    return values


def cell_name(sampler: str, eta: float, steps: int, num: int, seed: int) -> str:
    return f"{sampler}_eta{eta:g}_steps{steps}_n{num}_seed{seed}"


def cells_of(samplers, etas, steps):
    """(sampler, eta, steps) cells in table order; ancestral DDPM has no eta."""
    cells = []
    for sampler in samplers:
        for eta in etas if sampler == "ddim" else [1.0]:  # ancestral samplers have no eta
            for k in steps:
                cells.append((sampler, float(eta), int(k)))
    return cells


def plan_floor(floor: Optional[str], dataset: str, num: int, data_dir: Optional[str] = None):
    """-> (DatasetSpec of the real images for the floor, protocol text). Default: the dataset's test split, `num`
    images, or all of them when the split is smaller (the text says so). An explicit --floor spec is used as
    given; a count beyond its split is an EvaluationError."""
    from research.metrics.evaluation import DatasetSpec, EvaluationError, parse_dataset_spec, split_size

    if floor:
        spec = parse_dataset_spec(floor)
        if spec is None:
            raise EvaluationError(f"--floor {floor}: expected a dataset spec name:split[:num], not a path")
        size = split_size(spec, data_dir)
        n = spec.num or size
        return spec, f"floor: {n} {spec.split} images ({spec}) vs the reference"
    size = split_size(DatasetSpec(dataset, "test"), data_dir)
    if num <= size:
        return DatasetSpec(dataset, "test", num), f"floor: {num} test images vs the reference"
    return (
        DatasetSpec(dataset, "test", size),
        f"floor: {size} test images (the split's size; --num is {num}) vs the reference",
    )


def generate_cell(model, params, config, sampler, eta, steps, num, seed, batch_size, path, progress=True):
    """Draws and saves one cell's samples; returns (uint8 images, labels, nfe, seconds)."""
    from research.images import save_grid
    from research.sampling import Generator, to_uint8

    if os.path.isfile(path):
        with np.load(path) as f:
            return f["images"], (f["labels"] if f["labels"].size else None), int(f["nfe"]), float(f["seconds"])
    if sampler == "ddpm_large":
        config = config_with(config, "diffusion.var_type", "fixed_large")
        sampler = "ddpm"
    gen = Generator(model, config, sampler=sampler, steps=steps, eta=eta, batch_size=min(batch_size, num))
    t0 = time.time()
    samples, labels, nfe = gen.generate(params, num, seed=seed, progress=progress)
    seconds = time.time() - t0
    images = to_uint8(samples, config.data.centered)
    tmp = path[:-4] + ".tmp.npz"
    np.savez(tmp, images=images, labels=labels if labels is not None else np.zeros(0), nfe=nfe, seconds=seconds)
    os.replace(tmp, path)
    save_grid(images[:100], path[:-4] + ".png")
    return images, labels, nfe, seconds


def config_with(config, key, value):
    """A copy of the config with one field changed (the run's own config stays as loaded)."""
    import ml_collections

    copy = ml_collections.ConfigDict(config.to_dict())
    section, name = key.split(".")
    copy[section][name] = value
    return copy


def evaluate_cached(path, compute):
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    result = compute()
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    return result


def write_table(rows, metrics, protocol_lines, out):
    keys = ["sampler", "eta", "steps", "nfe", "sample_seconds"]
    for m in metrics:
        keys += [m] + [
            f"{m}_{k}" for k in ("kid", "precision", "recall", "classifier_score") if any(f"{m}_{k}" in r for r in rows)
        ]
    with open(os.path.join(out, "compare_samplers.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    lines = [f"<!-- {line} -->" for line in protocol_lines]
    lines += ["", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    md = "\n".join(["**Protocol.** " + " ".join(protocol_lines)] + lines[len(protocol_lines) :]) + "\n"
    with open(os.path.join(out, "compare_samplers.md"), "w") as f:
        f.write(md)
    return md


def plot(rows, metrics, floors, out, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        series = {}
        for r in rows:
            if m in r:
                label = {"ddpm": "DDPM ancestral (run's variance)", "ddpm_large": "DDPM ancestral, sigma^2=beta"}.get(
                    r["sampler"], f"DDIM eta={r['eta']:g}" if r["sampler"] == "ddim" else r["sampler"]
                )
                series.setdefault(label, []).append((r["nfe"], r[m]))
        for label, pts in series.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
        if m in floors:
            ax.axhline(floors[m], color="gray", ls="--", label="floor (real test vs reference)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel(m)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = os.path.join(out, "compare_samplers.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    from research.cli import ArgumentParser, UsageError, fail, nonnegative_int, positive_int

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument(
        "--samplers",
        default="ddpm,ddim",
        help="ddpm (ancestral, the run's variance), ddpm_large "
        "(ancestral with sigma^2 = beta, the DDIM paper's sigma-hat), ddim",
    )
    p.add_argument("--eta", default="0,1", help="DDIM eta values (comma list)")
    p.add_argument("--steps", default="10,20,50,100,1000")
    p.add_argument("--num", type=positive_int, default=10000)
    p.add_argument("--metric", default="fid_domain,fid_inception")
    p.add_argument("--ref", default=None, help="reference split (default: the run's dataset, train)")
    p.add_argument("--floor", default=None, help="real split for the floor (default: the dataset's test split)")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=500)
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--step", type=nonnegative_int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--no-kid", action="store_true")
    p.add_argument("--no-pr", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    try:
        args = p.parse_args(argv)
    except UsageError as e:
        return fail(e)

    from research.config import ConfigError
    from research.data import DataError
    from research.loader import load_run
    from research.metrics.evaluation import (
        USER_ERRORS,
        DatasetSpec,
        EvaluationError,
        check_sample_counts,
        dataset_images,
        evaluate_images,
        feature_space,
        parse_dataset_spec,
        split_size,
    )

    try:
        samplers = parse_list(args.samplers, str)
        bad = [s for s in samplers if s not in SAMPLERS]
        metrics = parse_list(args.metric, str)
        unknown = [m for m in metrics if m not in METRICS]
        if bad or unknown or not samplers or not metrics:
            raise EvaluationError(
                f"samplers must be in {SAMPLERS} and metrics in {tuple(METRICS)}; got "
                f"{bad or ''} {unknown or ''}".strip()
            )
        etas, steps = _numbers(args.eta, float, "--eta"), _numbers(args.steps, int, "--steps")
        if any(not (0.0 <= e <= 1.0) for e in etas):
            raise EvaluationError(f"--eta {args.eta}: DDIM eta must lie in [0, 1] (0 deterministic, 1 DDPM-like)")
        if any(k < 1 for k in steps):
            raise EvaluationError(f"--steps {args.steps}: step counts must be positive integers")
        if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
            raise EvaluationError(f"--out {args.out} is a file; give a folder")
        if not os.path.isdir(args.workdir):
            raise ConfigError(f"--workdir {args.workdir} does not exist")
        cells = cells_of(samplers, etas, steps)
        config, model, params, step = load_run(args.workdir, args.step, use_ema=not args.no_ema)
        dataset = config.data.name
        ref = parse_dataset_spec(args.ref) if args.ref else DatasetSpec(dataset, "train")
        if ref is None:
            raise EvaluationError("--ref takes a dataset spec name:split[:num]")
        num_ref = split_size(ref)  # also refuses a count beyond the split
        num_ref = ref.num or num_ref
        floor_spec, floor_text = plan_floor(args.floor, dataset, args.num)
        kid, pr = not args.no_kid, not args.no_pr
        check_sample_counts(min(args.num, floor_spec.num or split_size(floor_spec)), num_ref, precision_recall=pr)
        if "ddpm_large" in samplers and config.diffusion.var_type == "learned_range":
            raise EvaluationError("ddpm_large replaces a fixed variance; this run learns its variance (use ddpm)")
        too_long = [k for _, _, k in cells if k > config.diffusion.timesteps]
        if too_long:
            raise EvaluationError(f"steps {too_long} exceed the run's {config.diffusion.timesteps} timesteps")
        spaces = {m: feature_space(METRICS[m], dataset) for m in metrics}
        floor_images, floor_labels = dataset_images(floor_spec)
    except (ConfigError, DataError) + USER_ERRORS as e:
        return fail(e)

    out = args.out or os.path.join(args.workdir, "compare_samplers")
    os.makedirs(os.path.join(out, "cells"), exist_ok=True)
    progress = not args.no_progress
    kw = dict(kid=kid, precision_recall=pr, progress=progress)

    floors = {}
    for m, space in spaces.items():
        res = evaluate_cached(
            os.path.join(
                out, "cells", f"floor_{floor_spec.name}_{floor_spec.split}_n{len(floor_images)}.{space.name}.json"
            ),
            lambda: evaluate_images(floor_images, space, ref, labels=floor_labels, **kw),
        )
        floors[m] = res["fid"]
        print(f"floor {m}: {res['fid']:.4f} ({floor_spec} vs {ref})")

    rows = []
    t_start = time.time()
    for sampler, eta, k in cells:
        name = cell_name(sampler, eta, k, args.num, args.seed)
        images, labels, nfe, seconds = generate_cell(
            model,
            params,
            config,
            sampler,
            eta,
            k,
            args.num,
            args.seed,
            args.batch_size,
            os.path.join(out, "cells", name + ".npz"),
            progress,
        )
        row = {
            "sampler": sampler,
            "eta": eta if sampler == "ddim" else "",
            "steps": k,
            "nfe": nfe,
            "sample_seconds": round(seconds, 1),
        }
        for m, space in spaces.items():
            res = evaluate_cached(
                os.path.join(out, "cells", f"{name}.{space.name}.json"),
                lambda: evaluate_images(images, space, ref, labels=labels, **kw),
            )
            row[m] = res["fid"]
            for key in ("kid", "precision", "recall", "classifier_score"):
                if key in res:
                    row[f"{m}_{key}"] = res[key]
        rows.append(row)
        print(f"{name}: NFE {nfe}, " + ", ".join(f"{m} {row[m]:.3f}" for m in metrics))

    protocol = [
        f"Run {os.path.abspath(args.workdir)} at step {step} ({'EMA' if not args.no_ema else 'raw'} "
        f"weights); {args.num} samples per cell, seeds fold_in({args.seed}, batch); reference {ref} "
        f"(all images unless a count is given); {floor_text}."
    ]
    protocol += [f"{m}: {space.description}." for m, space in spaces.items()]
    protocol += ["Floors: " + ", ".join(f"{m} {v:.4g}" for m, v in floors.items()) + "."]
    md = write_table(rows, metrics, protocol, out)
    png = plot(
        rows,
        metrics,
        floors,
        out,
        f"{os.path.basename(os.path.abspath(args.workdir))}: {args.num} samples/cell, reference {ref}",
    )
    print(md)
    print(f"wrote {out}/compare_samplers.csv, .md and {png} in {time.time() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
