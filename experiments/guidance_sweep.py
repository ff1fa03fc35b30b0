"""Classifier-free guidance sweep: sample quality against the guidance scale on one class-conditional run.

    python -m experiments.guidance_sweep --workdir RUN [--scales 1,1.5,2,3,5] [--num 1000] [--sampler ddim]
        [--steps 50] [--ref DATASET:SPLIT] [--seed 0] [--batch-size 500] [--out DIR] [--metric fid_domain]

Scales are diffusers' s = 1 + w (1: the conditional model without guidance; the paper's w is s - 1). Every scale
draws --num samples with the same seeds and the classes cycled (0, 1, ..., 9, 0, ...), so the cells differ only
in the guidance. Each cell is scored against the reference split (default: the run's dataset, train split, 10,000
images or all when fewer) in the chosen feature space: FID, improved precision and recall, and, with the domain
classifier, the accuracy of the samples' classes and the classifier score. Ho & Salimans' trade-off (their
Figure 4): as the scale grows, class accuracy and precision rise while recall falls, and FID is best at a small
scale. Writes OUT/guidance_sweep.csv, .md (protocol first) and .png; cells are cached (cells/scale<s>.npz), so an
interrupted sweep resumes. OUT defaults to RUN/guidance_sweep.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import numpy as np

METRICS = {"fid_domain": "domain", "fid_inception": "inception"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--scales", default="1,1.5,2,3,5")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", default="50")
    p.add_argument("--ref", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--metric", default="fid_domain", choices=sorted(METRICS))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from research.config import ConfigError
    from research.data import DataError
    from research.metrics.evaluation import EvaluationError

    try:
        scales = [float(s) for s in args.scales.split(",") if s.strip()]
        if not scales or any(not s >= 0 for s in scales):
            raise ConfigError(f"--scales {args.scales}: expected a comma list of scales >= 0 (1: no guidance)")
        if args.num < 2 or args.batch_size < 1:
            raise ConfigError("--num must be >= 2 and --batch-size >= 1")
        rows, protocol = sweep(args, scales)
    except (ConfigError, DataError, EvaluationError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.workdir, "guidance_sweep")
    write_outputs(rows, protocol, out)
    print(open(os.path.join(out, "guidance_sweep.md")).read())
    return 0


def sweep(args, scales):
    from research.images import save_grid
    from research.loader import load_run
    from research.metrics.evaluation import DatasetSpec, evaluate_images, feature_space, parse_dataset_spec
    from research.sampling import Generator, to_uint8
    from research.tasks import default_labels

    config, model, params, step = load_run(args.workdir)
    num_classes = int(config.model.get("num_classes", 0))
    if not num_classes or not config.model.get("null_label", False):
        raise ValueError(f"{args.workdir} is not a class-conditional run trained with condition dropout")
    dataset = config.data.name
    reference = parse_dataset_spec(args.ref) if args.ref else DatasetSpec(dataset, "train", 10_000)
    if reference is None:
        raise ValueError(f"--ref {args.ref}: expected a dataset spec name:split[:num]")
    if dataset == "digits" and not args.ref:
        reference = DatasetSpec(dataset, "train")
    space = feature_space(METRICS[args.metric], dataset)
    out = args.out or os.path.join(args.workdir, "guidance_sweep")
    os.makedirs(os.path.join(out, "cells"), exist_ok=True)
    labels = default_labels(args.num, num_classes)
    rows = []
    for scale in scales:
        path = os.path.join(out, "cells", f"scale{scale:g}_{args.sampler}{args.steps}_n{args.num}_seed{args.seed}.npz")
        if os.path.isfile(path):
            with np.load(path) as f:
                images, nfe, seconds = f["images"], int(f["nfe"]), float(f["seconds"])
        else:
            gen = Generator(
                model,
                config,
                sampler=args.sampler,
                steps=args.steps,
                batch_size=min(args.batch_size, args.num),
                guidance=scale,
            )
            t0 = time.time()
            samples, _, nfe = gen.generate(params, args.num, seed=args.seed, labels=labels)
            seconds = time.time() - t0
            images = to_uint8(samples, config.data.centered)
            np.savez(path, images=images, labels=labels, nfe=nfe, seconds=seconds)
            save_grid(images[:100], path[:-4] + ".png", ncols=num_classes)
        result = evaluate_images(images, space, reference, labels=labels, progress=False)
        rows.append({"scale": scale, "w": scale - 1.0, "nfe": nfe, "sample_seconds": round(seconds, 1), **result})
        print(
            f"scale {scale:g}: FID {result['fid']:.2f}, "
            f"accuracy {result.get('classifier_accuracy', float('nan')):.3f}, "
            f"precision {result.get('precision', float('nan')):.3f}, recall {result.get('recall', float('nan')):.3f}",
            flush=True,
        )
    protocol = (
        f"Run {os.path.abspath(args.workdir)} at step {step} (EMA weights); {args.num} samples per scale, classes "
        f"cycled, seeds fold_in({args.seed}, batch); {args.sampler} {args.steps} steps (one batched forward per step: "
        f"NFE counts it once); reference {reference}; {space.description}. Scale s = 1 + w (diffusers' guidance_scale)."
    )
    return rows, protocol


def write_outputs(rows, protocol, out):
    keys = [
        "scale",
        "w",
        "nfe",
        "fid",
        "precision",
        "recall",
        "classifier_accuracy",
        "classifier_score",
        "kid",
        "sample_seconds",
    ]
    with open(os.path.join(out, "guidance_sweep.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    best = min(rows, key=lambda r: r["fid"])
    lines = [f"**Protocol.** {protocol}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |")
    lines += ["", f"Best FID: {best['fid']:.2f} at scale {best['scale']:g} (w = {best['w']:g})."]
    with open(os.path.join(out, "guidance_sweep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = [r["scale"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(scales, [r["fid"] for r in rows], "o-")
    a.set_xlabel("guidance scale s = 1 + w")
    a.set_ylabel("FID (domain features)")
    a.set_title("FID against guidance")
    for key, style in (("classifier_accuracy", "o-"), ("precision", "s-"), ("recall", "^-")):
        if key in rows[0]:
            b.plot(scales, [r[key] for r in rows], style, label=key.replace("classifier_", "class "))
    b.set_xlabel("guidance scale s = 1 + w")
    b.set_ylim(0, 1.02)
    b.legend()
    b.set_title("accuracy, precision and recall")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "guidance_sweep.png"), dpi=110)
    plt.close(fig)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


if __name__ == "__main__":
    sys.exit(main())
