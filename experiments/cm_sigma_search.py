"""The intermediate noise level of two-step consistency sampling, searched on FID (Song et al. 2023, Sec. 6).

    python -m experiments.cm_sigma_search --run WORKDIR [--run WORKDIR ...] [--levels 0.1,0.3,1,2.5,5]
        [--num 1000] [--seeds 0] [--batch-size 500] [--out runs/cm_sigma_search]

Two-step consistency sampling draws x = f(sigma_max z_0, sigma_max), adds noise back to a level s and denoises once
more: x = f(x + sqrt(s^2 - sigma_min^2) z_1, s). CM picked s by a greedy search on FID; the repo's default
(`consistency_sample_sigmas`) is the middle point of the three-point Karras grid of the run's (sigma_min,
sigma_max). For each run (a cd or ct workdir; several training seeds may be given), this prints the domain FID of
the 1-step sampler, of the default 2-step sampler and of 2 steps at each of --levels, over the sample --seeds
(mean ± sample std), and writes OUT/cm_sigma_search.{md,csv,png}. The 1-step figure at sample seed S is the one
`experiments.sweep --eval fid_domain` reports for eval.steps=1 at seed S.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

from research.cli import number_list


def search(run: str, levels: list, num: int, seeds: list, batch_size: int) -> list:
    """[(label, sigmas, [FID per sample seed])] for one consistency run: 1 step, the default 2 steps, each level."""
    import numpy as np

    from research.config import ConfigError
    from research.sampling import schedule_from_config, to_uint8
    from research.tasks.fewstep import (
        consistency_grid,
        consistency_sample_sigmas,
        generate,
        load_student,
        make_student_sampler,
    )
    from research.train.loop import domain_scores

    config, model, params, _ = load_student(run)
    if config.fewstep.method not in ("cd", "ct"):
        raise ConfigError(f"{run} is a {config.fewstep.method} run: the search is for consistency models (cd, ct)")
    grid = consistency_grid(config, schedule_from_config(config.diffusion))
    lo, hi = grid["sigma_min"], grid["sigma_max"]
    bad = [s for s in levels if not lo < s < hi]
    if bad:
        raise ConfigError(f"--levels {bad}: each must lie strictly between sigma_min={lo:.4g} and sigma_max={hi:.4g}")
    default = consistency_sample_sigmas(2, grid)
    settings = [("1 step", [hi]), (f"2 steps, default s = {default[1]:.3g}", list(default))]
    settings += [(f"2 steps, s = {s:g}", [hi, s]) for s in sorted(levels, reverse=True)]
    num_classes = int(config.model.get("num_classes", 0))
    batch = min(batch_size, num)
    out = []
    for label, sigmas in settings:
        sampler = make_student_sampler(config, model, len(sigmas), batch, sigmas=np.asarray(sigmas))
        fids = []
        for seed in seeds:
            samples, labels, _ = generate(sampler, params, num, batch, seed=seed, num_classes=num_classes)
            fids.append(float(domain_scores(to_uint8(samples, config.data.centered), labels, config)["fid_domain"]))
        print(f"{run}: {label}: FID {', '.join(f'{v:.2f}' for v in fids)}", flush=True)
        out.append((label, sigmas, fids))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, help="a cd or ct workdir (repeat for several)")
    p.add_argument("--levels", type=number_list(float, "numbers"), default=[0.1, 0.3, 0.6, 1.0, 2.0, 5.0])
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--seeds", type=number_list(int, "integers"), default=[0])
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--out", default="runs/cm_sigma_search")
    args = p.parse_args(argv)
    if args.num < 2 or args.batch_size < 1 or not args.seeds:
        print("error: --num must be >= 2, --batch-size >= 1 and --seeds non-empty", file=sys.stderr)
        return 2
    missing = [r for r in args.run if not os.path.isfile(os.path.join(r, "config.json"))]
    if missing:
        print(f"error: no run (config.json) in {', '.join(missing)}", file=sys.stderr)
        return 2

    from experiments.sweep import format_mean_std, mean_std
    from research.config import ConfigError

    try:
        results = {run: search(run, args.levels, args.num, args.seeds, args.batch_size) for run in args.run}
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    os.makedirs(args.out, exist_ok=True)
    labels = [label for label, _, _ in results[args.run[0]]]
    names = [os.path.basename(os.path.normpath(r)) for r in args.run]
    md = [
        f"Domain FID of {args.num} samples, sample seeds {','.join(map(str, args.seeds))} (mean ± std per run).",
        "",
        "| sampler | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    rows = []
    for i, label in enumerate(labels):
        cells = []
        for run, name in zip(args.run, names):
            _, sigmas, fids = results[run][i]
            mean, std = mean_std(fids)
            cells.append(format_mean_std(mean, std, len(fids)))
            per_seed = ";".join(f"{v:.6g}" for v in fids)
            rows.append([name, label, ";".join(f"{s:.6g}" for s in sigmas), f"{mean:.6g}", f"{std:.6g}", per_seed])
        md.append(f"| {label} | " + " | ".join(cells) + " |")
    text = "\n".join(md) + "\n"
    with open(os.path.join(args.out, "cm_sigma_search.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "cm_sigma_search.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "sampler", "sigmas", "fid mean", "fid std", "fid per sample seed"])
        w.writerows(rows)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run, name in zip(args.run, names):
        res = results[run]
        pts = sorted((sig[1], mean_std(f)[0]) for label, sig, f in res[2:])
        (line,) = ax.plot([s for s, _ in pts], [v for _, v in pts], "o-", label=f"{name}: 2 steps")
        ax.axhline(mean_std(res[0][2])[0], color=line.get_color(), ls="--", lw=1, label=f"{name}: 1 step")
        ax.plot([res[1][1][1]], [mean_std(res[1][2])[0]], "*", ms=12, color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("intermediate noise level s (star: the default)")
    ax.set_ylabel("domain FID")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "cm_sigma_search.png"), dpi=120)
    print(text + f"wrote {args.out}/cm_sigma_search.{{md,csv,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
