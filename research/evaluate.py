"""Evaluation commands: sample quality (FID, KID, precision/recall) and likelihood (bits/dim).

python -m research.evaluate fid A B [--metric inception|domain] [--domain NAME] [--kid] [--pr] [--json OUT]
python -m research.evaluate fid --samples X.npz --ref mnist:train [...]
python -m research.evaluate stats SOURCE --out stats.npz [--metric inception|domain] [--domain NAME]
python -m research.evaluate bpd --workdir RUN [--steps 1000|100|ddim50|t1,t2,..] [--num 1000]
                                [--split test] [--batch-size 100] [--seed 0] [--no-ema] [--step N]

fid: A and B are each an .npz of uint8 images [N, H, W, C] (what research.sample writes), a folder of PNG/JPEG
files, a statistics .npz (mu, sigma: pytorch-fid's format or `stats` output; FID only), or a dataset split
`name:split[:num]` (mnist:train, fashion_mnist:test:10000, digits:train), whose features are computed once and
cached under $RESEARCH_CACHE_DIR (default ~/.cache/research). `--metric inception` (default) is the FID
Inception-v3 with pytorch-fid's preprocessing (bilinear resize to 299x299 as torch does it, [0,1] -> [-1,1],
grayscale replicated to RGB), so numbers equal pytorch-fid's; `--metric domain` uses a small classifier trained on
the dataset (fast on a CPU; numbers comparable only within the same classifier). The protocol is printed with
every result. The FID floor of a dataset: `fid mnist:test:10000 mnist:train:10000`.

bpd: negative log-likelihood in bits/dim: the full variational bound L_0 + sum_t L_{t-1} + L_T over every step of
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


def _space_for(args, *sources):
    from research.metrics.evaluation import EvaluationError, feature_space, parse_dataset_spec

    domain = args.domain
    if args.metric == "domain" and not domain:
        specs = [parse_dataset_spec(s) for s in sources]
        names = {sp.name for sp in specs if sp is not None}
        if len(names) != 1:
            raise EvaluationError("--metric domain needs --domain NAME (the dataset whose classifier to use) "
                                  "unless exactly one source is a dataset spec such as mnist:train")
        domain = names.pop()
    return feature_space(args.metric, domain, protocol=args.protocol, batch_size=args.batch_size,
                         data_dir=args.data_dir)


def _statistics_of(space, source, data_dir):
    """-> (mu, sigma, features or None, description) of a source; statistics files pass through."""
    from research.metrics import fid as fid_lib
    from research.metrics.evaluation import is_statistics_file, source_features

    if is_statistics_file(source):
        mu, sigma, meta = fid_lib.load_statistics(source)
        return mu, sigma, None, f"{source} (statistics{', ' + json.dumps(meta) if meta else ''})"
    feats, _, desc = source_features(space, source, data_dir=data_dir)
    mu, sigma = fid_lib.feature_statistics(feats)
    return mu, sigma, feats, desc


def _fid_main(args) -> int:
    from research.metrics import fid as fid_lib
    from research.metrics.evaluation import EvaluationError, compare_features

    a = args.samples or (args.sources[0] if args.sources else None)
    b = args.ref or (args.sources[1] if len(args.sources) > 1 else None)
    rest = args.sources[(0 if args.samples else 1) + (0 if args.ref else 1):] if args.sources else []
    if a is None or b is None or rest:
        raise EvaluationError("give exactly two sources: fid A B, or fid --samples A --ref B")
    space = _space_for(args, a, b)
    t0 = time.time()
    mu1, s1, f1, d1 = _statistics_of(space, a, args.data_dir)
    mu2, s2, f2, d2 = _statistics_of(space, b, args.data_dir)
    if mu1.shape != mu2.shape:
        raise EvaluationError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]} (statistics from "
                              "another feature space?)")
    result = {"fid": float(fid_lib.frechet_distance(mu1, s1, mu2, s2)), "a": d1, "b": d2,
              "metric": args.metric, "space": space.name, "protocol": space.description}
    if (args.kid or args.pr) and (f1 is None or f2 is None):
        raise EvaluationError("KID and precision/recall need features, not a statistics file")
    if args.kid or args.pr:
        extra = compare_features(f1, f2, kid=args.kid, precision_recall=args.pr)
        extra.pop("fid")
        result.update(extra)
    result["seconds"] = time.time() - t0
    print(f"protocol: {space.description}")
    print(f"A: {d1}\nB: {d2}")
    line = f"FID ({args.metric}) {result['fid']:.4f}"
    if args.kid:
        line += f"  KID {result['kid']:.5f} +- {result['kid_std']:.5f}"
    if args.pr:
        line += f"  precision {result['precision']:.4f}  recall {result['recall']:.4f}"
    print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def _stats_main(args) -> int:
    from research.metrics import fid as fid_lib

    space = _space_for(args, args.source)
    mu, sigma, feats, desc = _statistics_of(space, args.source, args.data_dir)
    fid_lib.save_statistics(args.out, mu, sigma, source=desc, num=None if feats is None else len(feats),
                            space=space.name, protocol=space.description)
    print(f"statistics of {desc} in {space.name} -> {args.out}")
    return 0


def _add_space_args(q):
    q.add_argument("--metric", choices=("inception", "domain"), default="inception",
                   help="feature space: FID Inception-v3 (default) or the dataset's domain classifier")
    q.add_argument("--domain", default=None, help="dataset of the domain classifier (mnist, fashion_mnist, digits)")
    q.add_argument("--protocol", default="pytorch-fid", help="Inception preprocessing protocol")
    q.add_argument("--batch-size", type=int, default=None)
    q.add_argument("--data-dir", default=None, help="dataset directory (default $RESEARCH_DATA_DIR/<name>)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fid", help="FID (+ KID, precision/recall) between two image sets or dataset splits")
    f.add_argument("sources", nargs="*", help="two of: images .npz, image folder, statistics .npz, name:split[:num]")
    f.add_argument("--samples", default=None, help="first source (generated images)")
    f.add_argument("--ref", default=None, help="second source (reference), e.g. mnist:train")
    f.add_argument("--kid", action="store_true", help="also kernel inception distance (unbiased, cubic kernel)")
    f.add_argument("--pr", action="store_true", help="also improved precision/recall (k=3)")
    f.add_argument("--json", default=None, help="write the result here")
    _add_space_args(f)
    st = sub.add_parser("stats", help="write mu/sigma of a source (pytorch-fid's .npz format)")
    st.add_argument("source")
    st.add_argument("--out", required=True)
    _add_space_args(st)
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
    from research.metrics.evaluation import USER_ERRORS
    run = {"bpd": _bpd_main, "fid": _fid_main, "stats": _stats_main}[args.command]
    try:
        return run(args)
    except (ConfigError, DataError) + USER_ERRORS as e:
        # The data layer names the training command's flag; this command's equivalent is --data-dir.
        print(f"error: {str(e).replace('--config.data.data_dir', '--data-dir')}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
