"""python -m research.evaluate bpd --workdir RUN [--steps 1000|100|ddim50|t1,t2,..] [--num 1000]
                                  [--split test] [--batch-size 100] [--seed 0] [--no-ema] [--step N]

Negative log-likelihood in bits/dim: the full variational bound L_0 + sum_t L_{t-1} + L_T over every step of
the (optionally respaced) schedule, on `num` images of the run's dataset split. Each batch is one compiled
program (a scan over all steps). Prints the mean with its standard error, the prior term, and writes
RUN/eval/bpd_<steps>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np


def evaluate_bpd(model, params, config, images_uint8: np.ndarray, *, steps=None, batch_size: int = 100,
                 seed: int = 0, labels=None, progress: bool = True) -> dict:
    """Bits/dim of uint8 images [N, H, W, C] under the model's variational bound (respaced to `steps`)."""
    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from research.data import to_model_range
    from research.diffusion import likelihood
    from research.sampling import make_denoiser, sampling_schedule, schedule_from_config

    schedule = sampling_schedule(schedule_from_config(config.diffusion),
                                 config.diffusion.timesteps if steps is None else steps)
    d = config.diffusion

    def run(params, x0, key, cond):
        out = likelihood.bits_per_dim(make_denoiser(model, params), schedule, x0, key, prediction=d.prediction, var_type=d.var_type,
                                      cond=cond)
        return out["total"], out["prior"], out["vlb_terms"]

    run = jax.jit(run)
    n = len(images_uint8)
    batch_size = min(batch_size, n)
    totals, priors, terms = [], [], []
    conditional = bool(config.model.get("num_classes", 0))
    for b in tqdm(range(math.ceil(n / batch_size)), desc=f"bits/dim ({schedule.num_steps} steps)",
                  disable=not progress):
        chunk = images_uint8[b * batch_size:(b + 1) * batch_size]
        real = len(chunk)
        chunk = np.resize(chunk, (batch_size,) + chunk.shape[1:])  # fixed shape: one compilation
        x0 = jnp.asarray(to_model_range(chunk, centered=True))
        cond = None
        if conditional:
            lab = np.resize(np.asarray(labels[b * batch_size:(b + 1) * batch_size], np.int32), batch_size)
            cond = jnp.asarray(lab)
        total, prior, vlb = jax.device_get(run(params, x0, jax.random.fold_in(jax.random.PRNGKey(seed), b), cond))
        totals.append(total[:real])
        priors.append(prior[:real])
        terms.append(vlb[:real])
    total, prior, vlb = np.concatenate(totals), np.concatenate(priors), np.concatenate(terms)
    return {"bpd": float(total.mean()), "bpd_stderr": float(total.std(ddof=1) / math.sqrt(len(total))) if n > 1 else 0.0,
            "prior_bpd": float(prior.mean()), "decoder_bpd": float(vlb[:, 0].mean()),
            "terms_bpd": vlb.mean(0).tolist(), "num_steps": schedule.num_steps, "num_images": int(n)}


def _bpd_main(args) -> int:
    from research.data import make_eval_arrays
    from research.sample import load_run

    config, model, params, step = load_run(args.workdir, args.step, use_ema=not args.no_ema)
    images, labels = make_eval_arrays(config.data, args.split, num=args.num)
    t0 = time.time()
    result = evaluate_bpd(model, params, config, images, steps=args.steps, batch_size=args.batch_size,
                          seed=args.seed, labels=labels)
    result.update(step=step, split=args.split, ema=not args.no_ema, seconds=time.time() - t0)
    out_dir = os.path.join(args.workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    name = str(args.steps if args.steps is not None else config.diffusion.timesteps).replace(",", "-")
    with open(os.path.join(out_dir, f"bpd_{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"bits/dim {result['bpd']:.4f} +- {result['bpd_stderr']:.4f} ({result['num_images']} {args.split} images, "
          f"{result['num_steps']} steps, prior {result['prior_bpd']:.2e}, decoder {result['decoder_bpd']:.4f}, "
          f"step {step}{', EMA' if result['ema'] else ''}) in {result['seconds']:.1f}s")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bpd", help="negative log-likelihood (variational bound) in bits/dim")
    b.add_argument("--workdir", required=True)
    b.add_argument("--step", type=int, default=None)
    b.add_argument("--steps", default=None, help="respacing: 100, ddim50 or a comma list (default: all steps)")
    b.add_argument("--num", type=int, default=1000)
    b.add_argument("--split", default="test")
    b.add_argument("--batch-size", type=int, default=100)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--no-ema", action="store_true")
    args = p.parse_args(argv)
    from research.config import ConfigError
    from research.data import DataError
    try:
        return _bpd_main(args)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
