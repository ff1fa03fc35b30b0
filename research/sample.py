"""python -m research.sample --workdir RUN [--step N] [--sampler ddim|ddpm] [--steps 50|ddim50|t1,t2,..]
                           [--eta 0.0] [--num 64] [--seed 0] [--batch-size 256] [--no-ema] [--out DIR]

Loads the run's config and checkpoint (the newest, or --step), draws samples and writes
  OUT/samples_<sampler>_<steps>_eta<eta>_seed<seed>.png  (grid of up to 256)
  OUT/samples_<...>.npz                                   (images uint8 [N, H, W, C], labels, nfe)
OUT defaults to RUN/samples.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def load_run(workdir: str, step=None, use_ema: bool = True):
    """-> (config, model, params, step) from a training workdir."""
    from research.config import ConfigError, config_from_dict
    from research.train.checkpoint import Checkpointer
    from research.train.loop import build_trainer

    cfg_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConfigError(f"{workdir} has no config.json: is it a training workdir (python -m research.train ... --workdir)?")
    with open(cfg_path) as f:
        config = config_from_dict(json.load(f))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=None)
    steps = ckpt.all_steps()
    if not steps:
        raise ConfigError(f"no checkpoint in {workdir}/checkpoints")
    step = ckpt.latest_step() if step is None else step
    if step not in steps:
        raise ConfigError(f"no checkpoint at step {step}; available: {sorted(steps)}")
    trainer = build_trainer(config)  # shapes and shardings only; nothing is compiled until called
    ckpt.check_compatible(step, trainer.meta)
    state, _, _ = ckpt.restore(step, trainer.abstract_state_sharded())
    ckpt.close()
    return config, trainer.model, (state.ema_params if use_ema else state.params), step


def _write_samples(args, name: str, images, labels, nfe: int, step: int) -> str:
    """OUT/name.png (grid of up to 256) and OUT/name.npz (images, labels, nfe, step); -> OUT/name."""
    from research.images import save_grid

    out = args.out or os.path.join(args.workdir, "samples")
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, name)
    save_grid(images[:256], stem + ".png")
    np.savez(stem + ".npz", images=images, labels=labels if labels is not None else np.zeros(0), nfe=nfe, step=step)
    return stem


def _sample_fewstep(args, config) -> int:
    """A few-step student: --steps k picks PD's k-step round checkpoint (default: the last round) or the number
    of consistency steps (default fewstep.sample_steps); sampled with the student's own sampler."""
    from research.sampling import to_uint8
    from research.train import fewstep

    if args.sampler is not None or args.eta is not None:
        raise ConfigError("a few-step student has its own sampler (DDIM on its grid for pd, consistency sampling for "
                          "cd/ct): drop --sampler / --eta")
    f = config.fewstep
    default = f.pd_final_steps if f.method == "pd" else f.sample_steps
    steps = int(args.steps) if args.steps is not None else int(default)
    run_config, model, params, step = fewstep.load_student(args.workdir, steps if f.method == "pd" else None,
                                                           use_ema=not args.no_ema)
    batch = min(args.batch_size or config.sample.batch_size, args.num)
    sampler = fewstep.make_student_sampler(run_config, model, steps, batch)
    t0 = time.time()
    samples, nfe = fewstep.generate(sampler, params, args.num, batch, seed=args.seed,
                                    num_classes=int(run_config.model.get("num_classes", 0)))
    images = to_uint8(samples, run_config.data.centered)
    stem = _write_samples(args, f"samples_{f.method}_{steps}steps_seed{args.seed}", images, None, nfe, step)
    print(f"{args.num} samples from the {f.method} student (checkpoint {step}, {steps} steps, NFE={nfe}) in "
          f"{time.time() - t0:.1f}s -> {stem}.png/.npz")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default=None)
    p.add_argument("--steps", default=None, help="50 (even spacing), ddim50 (DDIM stride) or a comma list")
    p.add_argument("--eta", type=float, default=None)
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from research.config import ConfigError
    from research.sampling import Generator, to_uint8
    try:
        config, model, params, step = load_run(args.workdir, args.step, use_ema=not args.no_ema)
        if config.task == "autoencoder":
            raise ConfigError(f"{args.workdir} holds an autoencoder, which has no sampler; its reconstructions are in "
                              f"{os.path.join(args.workdir, 'samples')} and research.latents.load_autoencoder loads it")
        if config.task == "fewstep":
            return _sample_fewstep(args, config)
        gen = Generator(model, config, sampler=args.sampler, steps=args.steps, eta=args.eta,
                        batch_size=min(args.batch_size or config.sample.batch_size, args.num))
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    samples, labels, nfe = gen.generate(params, args.num, seed=args.seed)
    seconds = time.time() - t0
    images = to_uint8(samples, config.data.centered)
    steps_name = str(args.steps if args.steps is not None else config.sample.steps).replace(",", "-")
    stem = _write_samples(args, f"samples_{gen.sampler}_{steps_name}_eta{gen.eta:g}_seed{args.seed}", images, labels,
                          nfe, step)
    print(f"{args.num} samples from step {step} with {gen.sampler} ({gen.num_steps} steps, eta={gen.eta:g}, "
          f"NFE={nfe}) in {seconds:.1f}s -> {stem}.png/.npz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
