"""python -m research.sample --workdir RUN [--step N] [--sampler ddim|ddpm] [--steps 50|ddim50|t1,t2,..]
                           [--eta 0.0] [--num 64] [--seed 0] [--batch-size 256] [--no-ema] [--out DIR]
                           [--guidance S] [--classifier RUN --classifier-scale S] [--sigmas S1,S2,..]

Loads the run's config and checkpoint (the newest, or --step), draws samples with the sampler of the run's task
and writes
  OUT/<name>.png  (grid of up to 256)
  OUT/<name>.npz  (images uint8 [N, H, W, C], labels [N] (-1 for unconditional models), nfe, step)
OUT defaults to RUN/samples. A diffusion run samples with DDPM or DDIM on any respacing; a few-step run with its
student's own sampler (`--steps k` picks the k-step student; a consistency run (cd, ct) also takes `--sigmas`, its
decreasing noise levels, one per step, e.g. the searched level of experiments/cm_sigma_search.py as --sigmas 80,0.7);
an autoencoder run has no sampler.
--classifier RUN guides a diffusion run with a noise-aware classifier run trained on the same schedule (Dhariwal &
Nichol 2021, with any sampler): the samples' classes cycle 0, 1, ..., K-1, also for an unconditional model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from research.cli import number_list
from research.diffusion.samplers import SAMPLERS


def _write_samples(out: str, name: str, images, labels, nfe: int, step: int) -> str:
    """OUT/name.png (grid of up to 256) and OUT/name.npz (images, labels, nfe, step); -> OUT/name."""
    from research.images import save_grid

    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, name)
    save_grid(images[:256], stem + ".png")
    np.savez(stem + ".npz", images=images, labels=np.asarray(labels, np.int32), nfe=nfe, step=step)
    return stem


def _check_args(args) -> None:
    from research.config import ConfigError

    if args.num < 1:
        raise ConfigError(f"--num must be >= 1, got {args.num}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.eta is not None and not args.eta >= 0:
        raise ConfigError(f"--eta must be >= 0 (0: deterministic DDIM, 1: DDPM's posterior variance), got {args.eta}")
    if args.guidance is not None and not args.guidance >= 0:
        raise ConfigError(f"--guidance must be >= 0 (1: no guidance; s = 1 + w), got {args.guidance}")
    if not 0.0 <= args.guidance_rescale <= 1.0:
        raise ConfigError(f"--guidance-rescale must be in [0, 1], got {args.guidance_rescale}")
    if not args.classifier_scale >= 0:
        raise ConfigError(f"--classifier-scale must be >= 0 (0: no guidance), got {args.classifier_scale}")
    if args.classifier is None and args.classifier_scale != 1.0:
        raise ConfigError("--classifier-scale needs --classifier RUN (a noise-aware classifier run)")
    if args.classifier is not None and not os.path.isdir(args.classifier):
        raise ConfigError(f"--classifier {args.classifier} does not exist")
    if args.step is not None and args.step < 0:
        raise ConfigError(f"--step must be a checkpoint step >= 0, got {args.step}")
    if not os.path.isdir(args.workdir):
        raise ConfigError(f"--workdir {args.workdir} does not exist")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--sampler", choices=SAMPLERS, default=None, help="ddpm, ddim, or a fast ODE solver")
    p.add_argument("--steps", default=None, help="50 (even spacing), ddim50 (DDIM stride) or a comma list")
    p.add_argument("--eta", type=float, default=None)
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance scale s = 1 + w in diffusers' sense (1: none; the paper's w is s - 1)",
    )
    p.add_argument("--guidance-rescale", type=float, default=0.0, help="diffusers' guidance_rescale (0: off)")
    p.add_argument("--grid", choices=("uniform", "logsnr", "karras"), default=None, help="a solver's time grid")
    p.add_argument("--classifier", default=None, help="a noise-aware classifier run for classifier guidance")
    p.add_argument("--classifier-scale", type=float, default=1.0, help="the classifier guidance scale s (0: none)")
    p.add_argument(
        "--sigmas",
        type=number_list(float, "noise levels"),
        default=None,
        help="a consistency run's noise levels, one per step, decreasing (e.g. 80,0.7: CM's 2-step sampler)",
    )
    args = p.parse_args(argv)

    from research.config import ConfigError
    from research.run import read_config
    from research.tasks import SampleOptions, task_of

    try:
        _check_args(args)
        config = read_config(args.workdir)
        options = SampleOptions(
            step=args.step,
            use_ema=not args.no_ema,
            sampler=args.sampler,
            steps=args.steps,
            eta=args.eta,
            batch_size=args.batch_size,
            guidance=args.guidance,
            guidance_rescale=args.guidance_rescale,
            grid=args.grid,
            classifier=args.classifier,
            classifier_scale=args.classifier_scale,
            sigmas=args.sigmas,
        )
        run = task_of(config).sampler(args.workdir, config, options)
        t0 = time.time()
        result = run(args.num, seed=args.seed)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stem = _write_samples(
        args.out or os.path.join(args.workdir, "samples"),
        result.name,
        result.images,
        result.labels,
        result.nfe,
        run.step,
    )
    print(f"{args.num} samples from {result.description} in {time.time() - t0:.1f}s -> {stem}.png/.npz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
