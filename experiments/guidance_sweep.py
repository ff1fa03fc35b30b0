"""Guidance sweeps: sample quality against the guidance scale on one run.

    python -m experiments.guidance_sweep --workdir RUN [--scales 1,1.5,2,3,5] [--num 1000] [--sampler ddim]
        [--steps 50] [--ref DATASET:SPLIT] [--seed 0] [--batch-size 500] [--out DIR] [--metric fid_domain]
        [--classifier CLF_RUN]

Classifier-free guidance (the default): RUN is class-conditional with condition dropout; scales are diffusers'
s = 1 + w (1: the conditional model without guidance; the paper's w is s - 1).
Classifier guidance (--classifier CLF_RUN, a noisy_classifier run on RUN's schedule): RUN may be unconditional;
scales are Dhariwal & Nichol's classifier scale s (0: no guidance), and the requested classes are the labels the
classifier is asked for. Every scale
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
    p.add_argument("--classifier", default=None, help="a noisy_classifier run: sweep classifier-guidance scales")
    args = p.parse_args(argv)

    from research.config import ConfigError
    from research.data import DataError
    from research.metrics.evaluation import EvaluationError

    try:
        scales = [float(s) for s in args.scales.split(",") if s.strip()]
        if not scales or any(not s >= 0 for s in scales):
            raise ConfigError(f"--scales {args.scales}: expected a comma list of scales >= 0")
        if args.classifier is not None and not os.path.isdir(args.classifier):
            raise ConfigError(f"--classifier {args.classifier} does not exist")
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
    from research.tasks.diffusion import load_classifier

    config, model, params, step = load_run(args.workdir)
    num_classes = int(config.model.get("num_classes", 0))
    kind = "classifier" if args.classifier else "cfg"
    guide = load_classifier(args.classifier, 1.0, config, num_classes, True) if args.classifier else None
    if guide is None and (not num_classes or not config.model.get("null_label", False)):
        raise ValueError(f"{args.workdir} is not a class-conditional run trained with condition dropout")
    model_labels = bool(num_classes)
    num_classes = int(guide[0].num_classes) if guide is not None else num_classes
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
        name = f"{kind}{scale:g}_{args.sampler}{args.steps}_n{args.num}_seed{args.seed}.npz"
        path = os.path.join(out, "cells", name)
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
                guidance=scale if guide is None else None,
                classifier=None if guide is None else (guide[0], guide[1], scale),
            )
            t0 = time.time()
            samples, _, nfe = gen.generate(params, args.num, seed=args.seed, labels=labels if model_labels else None)
            seconds = time.time() - t0
            images = to_uint8(samples, config.data.centered)
            np.savez(path, images=images, labels=labels, nfe=nfe, seconds=seconds)
            save_grid(images[:100], path[:-4] + ".png", ncols=num_classes)
        result = evaluate_images(images, space, reference, labels=labels, progress=False)
        w = scale - 1.0 if guide is None else float("nan")
        rows.append({"scale": scale, "w": w, "nfe": nfe, "sample_seconds": round(seconds, 1), **result})
        print(
            f"scale {scale:g}: FID {result['fid']:.2f}, "
            f"accuracy {result.get('classifier_accuracy', float('nan')):.3f}, "
            f"precision {result.get('precision', float('nan')):.3f}, recall {result.get('recall', float('nan')):.3f}",
            flush=True,
        )
    if guide is None:
        what = (
            "Classifier-free guidance, scale s = 1 + w (diffusers' guidance_scale; one batched forward per step: "
            "NFE counts it once)"
        )
    else:
        what = (
            f"Classifier guidance by {os.path.abspath(args.classifier)} (EMA weights), classifier scale s "
            f"(0: none; eps shifted by -sqrt(1 - abar) s grad log p(y | x_t)); the classes asked for are the labels"
            + ("" if model_labels else "; the diffusion model itself is unconditional")
        )
    protocol = (
        f"Run {os.path.abspath(args.workdir)} at step {step} (EMA weights); {args.num} samples per scale, classes "
        f"cycled, seeds fold_in({args.seed}, batch); {args.sampler} {args.steps} steps; reference {reference}; "
        f"{space.description}. {what}."
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
    if all(r["w"] != r["w"] for r in rows):  # classifier guidance: no w
        keys.remove("w")
    with open(os.path.join(out, "guidance_sweep.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    best = min(rows, key=lambda r: r["fid"])
    lines = [f"**Protocol.** {protocol}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |")
    w = f" (w = {best['w']:g})" if "w" in keys else ""
    lines += ["", f"Best FID: {best['fid']:.2f} at scale {best['scale']:g}{w}."]
    with open(os.path.join(out, "guidance_sweep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = [r["scale"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(scales, [r["fid"] for r in rows], "o-")
    label = "guidance scale s = 1 + w" if "w" in keys else "classifier scale s"
    a.set_xlabel(label)
    a.set_ylabel("FID")
    a.set_title("FID against guidance")
    for key, style in (("classifier_accuracy", "o-"), ("precision", "s-"), ("recall", "^-")):
        if key in rows[0]:
            b.plot(scales, [r[key] for r in rows], style, label=key.replace("classifier_", "class "))
    b.set_xlabel(label)
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
