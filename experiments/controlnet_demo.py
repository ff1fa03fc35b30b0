"""The ControlNet demo's table: how well samples follow edge-map hints, with and without the control.

    python experiments/controlnet_demo.py --control runs/controlnet_mnist [--num 1000] [--steps 50] [--inception]

For the first --num test images of the run's data: their hints (the run's controlnet.hint, Canny edges by default)
and labels. Three sample sets from the same initial noise, every one class-conditional on the hint image's label:
  base        the frozen base run without control (what the label alone gives);
  controlled  base + ControlNet at each --scales value (1 is the trained setting);
and two references: the real images themselves (the ceiling: their edges are the hints, F1 = 1 by construction)
and a different real image of the same class per hint (how much a label alone explains).
Controllability: the edge F1 of each image's edges (the same extractor) against its hint, with a one-pixel
tolerance (research/metrics/control.py), and exactly (tolerance 0). FID against the test split in the domain
classifier's features (and in Inception-v3's with --inception); the domain classifier's accuracy on the hint's
label. Writes OUT/table.md, OUT/results.json, OUT/pairs.png (rows: hint, controlled, base; the real image last) and
OUT/f1_vs_step.png from the run's control.jsonl (the edge F1 its previews logged during training).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def _f1_curve(control_run: str, out: str):
    path = os.path.join(control_run, "control.jsonl")
    if not os.path.isfile(path):
        return []
    rows = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            rows[row["step"]] = row  # a resumed run may log a step twice: keep the last
    rows = [rows[s] for s in sorted(rows)]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["f1"] for r in rows], marker="o", label="1-pixel tolerance")
    if all("f1_exact" in r for r in rows):
        ax.plot(steps, [r["f1_exact"] for r in rows], marker="s", label="exact pixels")
    ax.set_xlabel("ControlNet training step")
    ax.set_ylabel(f"edge F1 ({rows[0]['num'] if rows else 0} test hints)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "f1_vs_step.png"), dpi=120)
    plt.close(fig)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--control", required=True, help="workdir of a task='controlnet' run")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", default="50")
    p.add_argument("--scales", default="1.0", help="comma-separated conditioning scales")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inception", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import jax.numpy as jnp

    from research.images import save_grid
    from research.loader import load_run
    from research.metrics import classifier
    from research.metrics.control import edge_scores
    from research.metrics.evaluation import DatasetSpec, evaluate_images, feature_space
    from research.run import read_config
    from research.sampling import Generator, to_uint8
    from research.tasks.controlnet import control_hints, controlled, load_base, test_hints

    config = read_config(args.control)
    if config.task != "controlnet":
        print(f"error: {args.control} is not a task='controlnet' run", file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.control, "demo")
    os.makedirs(out, exist_ok=True)
    data = config.data.name
    hints, labels, real = test_hints(config, args.num)
    _, control, control_params, step = load_run(args.control)
    base, base_params, reference = load_base(config)

    def edges(images_uint8):
        x = jnp.asarray(images_uint8, jnp.float32) / 127.5 - 1.0
        return np.asarray(control_hints(config, x))

    def score(name, images, seconds=None):
        found = edges(images)
        row = {"set": name, **edge_scores(found, hints).means()}
        row["f1_exact"] = edge_scores(found, hints, tolerance=0).means()["f1"]
        clf = classifier.get_domain_classifier(data, progress=False)
        row["accuracy"] = float(np.mean(clf.probs(images, progress=False).argmax(axis=1) == labels))
        for kind in ("domain", "inception") if args.inception else ("domain",):
            space, reference = feature_space(kind, data), DatasetSpec(data, "test")
            result = evaluate_images(images, space, reference, kid=False, progress=False)
            row[f"fid_{kind}"] = float(result["fid"])
        if seconds is not None:
            row["sampling_s"] = round(seconds, 1)
        print(json.dumps(row), flush=True)
        return row

    results, sets = [], {}
    gen_kw = dict(sampler=args.sampler, steps=args.steps, batch_size=min(500, len(labels)))
    t0 = time.time()
    plain, _, nfe = Generator(base, config, **gen_kw).generate(base_params, len(labels), args.seed, labels=labels)
    sets["base"] = to_uint8(plain, config.data.centered)
    results.append(score("base (no control)", sets["base"], time.time() - t0))
    for scale in [float(s) for s in args.scales.split(",")]:
        model = controlled(base, control, config, scale=scale, guess_mode=False)
        t0 = time.time()
        gen = Generator(model, config, **gen_kw)
        samples, _, _ = gen.generate(
            {"base": base_params, "controls": (control_params,)}, len(labels), args.seed, labels=labels, hints=hints
        )
        sets[f"controlled {scale:g}"] = to_uint8(samples, config.data.centered)
        results.append(score(f"controlled (scale {scale:g})", sets[f"controlled {scale:g}"], time.time() - t0))
    # A different real test image of the same class for each hint: what the label alone explains.
    rng = np.random.default_rng(args.seed)
    other = np.empty(len(labels), np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        other[idx] = np.roll(rng.permutation(idx), 1) if len(idx) > 1 else idx
    results.append(score("real, same class, other image", real[other]))
    results.append(score("real (the ceiling)", real))

    k = min(10, len(labels))
    hint_rows = np.repeat((hints[:k] * 255).round().astype(np.uint8), real.shape[-1], axis=-1)
    main_set = sets[f"controlled {float(args.scales.split(',')[0]):g}"]
    grid = np.concatenate([hint_rows, main_set[:k], sets["base"][:k], real[:k]])
    save_grid(grid, os.path.join(out, "pairs.png"), ncols=k)
    curve = _f1_curve(args.control, out)

    lines = [
        f"ControlNet run {os.path.abspath(args.control)} at step {step} (EMA weights) on the base "
        f"{reference['workdir']} (step {reference['step']}); {len(labels)} {data} test images, "
        f"{config.controlnet.hint} hints, {args.sampler} {args.steps} steps (NFE {nfe}), seed {args.seed}, the "
        f"hint image's label as the class; edge F1 with a 1-pixel tolerance.",
        "",
        "| samples | edge F1 (1 px) | precision | recall | edge F1 (exact) | class accuracy | FID (domain) |"
        + (" FID (Inception) |" if args.inception else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if args.inception else ""),
    ]
    for r in results:
        inc = f" {r['fid_inception']:.2f} |" if args.inception else ""
        lines.append(
            f"| {r['set']} | {r['f1']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1_exact']:.3f} | "
            f"{r['accuracy']:.3f} | {r['fid_domain']:.2f} |{inc}"
        )
    if curve:
        lines += [
            "",
            "Edge F1 (1 px / exact) logged during training, by step: "
            + ", ".join(f"{r['step']}: {r['f1']:.3f} / {r.get('f1_exact', float('nan')):.3f}" for r in curve),
        ]
    text = "\n".join(lines)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"results": results, "curve": curve, "step": step, "base": reference}, f, indent=1)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
