"""Latent against pixel diffusion at equal training compute: FID against training FLOPs from a finished sweep.

    python -m experiments.latent_vs_pixel --sweep runs/sweep_ldm_digits [--autoencoder runs/vae_digits]
        [--config configs/ldm_digits.py] [--table table]

Reads SWEEP/TABLE_curves.csv (written by `experiments.sweep ... --grid variant=pixel,latent --curve`), prices every
checkpoint in training FLOPs (3 x the forward FLOPs per example x batch x steps: the forward pass and a backward
pass of twice its cost; the forward counted by XLA's cost analysis, as `research.summary` does) and adds the
autoencoder's own training to the latent model's bill (its forward on the images, same rule, at its batch and
steps). Pairs each pixel checkpoint with the latent checkpoint of the largest compute not above it, so the latent
side never gets more compute than the pixel side. Prints and writes SWEEP/latent_vs_pixel.{md,png}.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys


def training_flops_per_step(config) -> float:
    """3 x forward FLOPs per example x batch: the training cost of one step of this config's network."""
    from research.shapes import abstract_net_params, build_network
    from research.summary import forward_flops

    model = build_network(config)
    return 3.0 * forward_flops(model, config, abstract_net_params(model, config)) * int(config.train.batch_size)


def read_curves(path: str, metric: str = "fid_domain") -> dict:
    """{variant: [(step, mean, std, accuracy mean or None)]} from a sweep's NAME_curves.csv."""
    out = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            acc = row.get("classifier_accuracy mean")
            out.setdefault(row["variant"], []).append(
                (int(row["step"]), float(row[f"{metric} mean"]), float(row[f"{metric} std"] or 0), acc)
            )
    return {k: sorted(v) for k, v in out.items()}


def pair_at_equal_compute(pixel: list, latent: list) -> list:
    """[(pixel point, latent point)]: each pixel (compute, ...) with the latent point of the largest compute <= its
    own; pixel points cheaper than every latent point are left out."""
    pairs = []
    for p in pixel:
        cheaper = [q for q in latent if q[0] <= p[0]]
        if cheaper:
            pairs.append((p, max(cheaper, key=lambda q: q[0])))
    return pairs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", required=True)
    p.add_argument("--config", default="configs/ldm_digits.py")
    p.add_argument("--autoencoder", default="runs/vae_digits", help="its training is added to the latent bill")
    p.add_argument("--table", default="table")
    args = p.parse_args(argv)
    curves_path = os.path.join(args.sweep, f"{args.table}_curves.csv")
    if not os.path.isfile(curves_path):
        print(f"error: no {curves_path}: run the sweep with --curve first", file=sys.stderr)
        return 2
    curves = read_curves(curves_path)
    if set(curves) != {"pixel", "latent"}:
        print(f"error: {curves_path} has variants {sorted(curves)}, expected pixel and latent", file=sys.stderr)
        return 2

    from research.run import read_config
    from research.tasks import get_config

    per_step = {v: training_flops_per_step(get_config(f"{args.config}:{v}")) for v in ("pixel", "latent")}
    ae_config = read_config(args.autoencoder)
    ae_flops = training_flops_per_step(ae_config) * int(ae_config.train.num_steps)
    offset = {"pixel": 0.0, "latent": ae_flops}
    priced = {
        v: [(offset[v] + s * per_step[v], s, fid, std, acc) for s, fid, std, acc in points]
        for v, points in curves.items()
    }
    tf = 1e12
    lines = [
        f"Training cost per step: pixel {per_step['pixel'] / 1e9:.2f} GFLOP, latent {per_step['latent'] / 1e9:.2f} "
        f"GFLOP ({per_step['pixel'] / per_step['latent']:.2f}x); the autoencoder's training, "
        f"{ae_flops / tf:.2f} TFLOP, is added to every latent point.",
        "",
        "| pixel step | pixel TFLOP | pixel FID | latent step | latent TFLOP | latent FID | pixel / latent FID |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a, b in pair_at_equal_compute(priced["pixel"], priced["latent"]):
        pix = f"| {a[1]} | {a[0] / tf:.1f} | {a[2]:.2f} ± {a[3]:.2f} "
        lat = f"| {b[1]} | {b[0] / tf:.1f} | {b[2]:.2f} ± {b[3]:.2f} "
        lines.append(pix + lat + f"| {a[2] / b[2]:.2f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.sweep, "latent_vs_pixel.md"), "w") as f:
        f.write(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for v in ("pixel", "latent"):
        pts = priced[v]
        ax.errorbar([q[0] / tf for q in pts], [q[2] for q in pts], yerr=[q[3] for q in pts], marker="o", label=v)
    ax.set_xlabel("training compute (TFLOP; latent includes its autoencoder)")
    ax.set_ylabel("domain FID")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.sweep, "latent_vs_pixel.png"), dpi=120)
    print(text + f"wrote {args.sweep}/latent_vs_pixel.{{md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
