"""Evaluation commands: sample quality (FID, KID, precision/recall) and likelihood (bits/dim).

python -m research.evaluate fid A B [--metric inception|domain] [--domain NAME] [--kid] [--pr] [--json OUT]
python -m research.evaluate fid --samples X.npz --ref mnist:train [...]
python -m research.evaluate stats SOURCE --out stats.npz [--metric inception|domain] [--domain NAME]
python -m research.evaluate bpd --workdir RUN [--steps 1000|100|ddim50|t1,t2,..] [--num 1000]
                                [--split test] [--batch-size 100] [--seed 0] [--no-ema] [--step N] [--clip-x0]

fid: A and B are each an .npz of uint8 images [N, H, W, C] (what research.sample writes; never unpickled, so object
arrays are refused), a folder of PNG/JPEG files, a statistics .npz (mu, sigma: pytorch-fid's format or `stats`
output; FID only), or a dataset split `name:split[:num]` (mnist:train, fashion_mnist:test:10000, digits:train),
whose features are computed once and cached under $RESEARCH_CACHE_DIR (default ~/.cache/research). `--metric
inception` (default) is the FID Inception-v3 with pytorch-fid's preprocessing (bilinear resize to 299x299 as torch
does it, [0,1] -> [-1,1], grayscale replicated to RGB), so numbers equal pytorch-fid's; `--metric domain` uses a
small classifier trained on the dataset (fast on a CPU; numbers comparable only within the same classifier). The
protocol is printed with every result. The FID floor of a dataset: `fid mnist:test:10000 mnist:train:10000`.
Images in an .npz should be uint8. Float images are converted only where their range is unambiguous, and a
`note:` line says so: values in [0, 1] -> round(255 x); values in [-1, 1] with some below 0 -> round(127.5 (x + 1));
whole numbers in [0, 255] -> cast. Other floats (NaN, other ranges) are refused. --kid averages over subsets of
--kid-subset-size images (default 1000, clipped to the smaller set; an explicit size larger than a set is refused).

bpd: negative log-likelihood in bits/dim: the full variational bound L_0 + sum_t L_{t-1} + L_T over every step of
the (optionally respaced) schedule, on `num` images of the run's dataset split. Each batch is one compiled
program (a scan over all steps). Prints the mean with its standard error, the prior term, and writes
RUN/eval/bpd_<steps>.json. Images enter the model in the run's own range (data.centered: [-1, 1] or [0, 1]).
The decoder term L_0 is a discretised Gaussian on the 256-level grid; research.diffusion.likelihood bins it on
[-1, 1] (bins 2/255 wide, edges at +-1). For a [0, 1] run the decoder N(m, s^2) over x in [0, 1] is the same
distribution as N(2m - 1, (2s)^2) over y = 2x - 1, bin for bin, so L_0 is evaluated on that map; the KL terms
and the prior are invariant (computed in the model's own space). The bound is therefore exact for both ranges.
Only pixel-space diffusion runs have this bound: latent runs, autoencoders and few-step students are refused.
--clip-x0 clips every predicted x0 to [-1, 1] before the posterior mean, as the samplers do, and writes
bpd_<steps>_clip.json: the protocol of iDDPM's released NLL script, and still a bound (the clipped chain is a
proper model). It matters where alpha-bar_t nears 0: at the cosine schedule's last step an eps error is amplified
32x in the mean, and far more on a respaced chain (centered data only).
CLIP runs and CLIP scores (research/evaluate_clip.py has the details):
python -m research.evaluate zeroshot --workdir RUN [--split test] [--num N] [--templates heldout|train]
python -m research.evaluate retrieval --workdir RUN [--split test] [--num N]
python -m research.evaluate probe --workdir RUN [--train-num 10000] [--num N]
python -m research.evaluate clipscore --samples X.npz --clip RUN|HF_DIR [--prompts FILE] [--dataset NAME]

Every error in a command line is one `error: ...` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Optional

import numpy as np


def evaluate_bpd(
    model,
    params,
    config,
    images_uint8: np.ndarray,
    *,
    steps=None,
    batch_size: int = 100,
    seed: int = 0,
    labels=None,
    progress: bool = True,
    clip_x0: bool = False,
) -> dict:
    """Bits/dim of uint8 images [N, H, W, C] under the model's variational bound (respaced to `steps`).

    clip_x0 clips each step's predicted x0 to [-1, 1] before the posterior mean, as the samplers do. It is the
    protocol of iDDPM's released NLL script (clip_denoised=True by default there) and still a valid bound: the
    clipped reverse chain is a proper model. Without it (the default) the bound is the network's own. The two
    differ most where alpha-bar_t nears 0 (the cosine schedule's last steps), where an eps-predicting model's x0
    is ill-conditioned. Centered data only.
    """
    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from research.data import to_model_range
    from research.diffusion import likelihood
    from research.sampling import make_denoiser, sampling_schedule, schedule_from_config

    schedule = sampling_schedule(
        schedule_from_config(config.diffusion), config.diffusion.timesteps if steps is None else steps
    )
    d = config.diffusion
    centered = bool(config.data.centered)
    if clip_x0 and not centered:
        raise ValueError("clip_x0 clips x0 to [-1, 1]: it is the protocol for centered data (data.centered=True)")

    def run(params, x0, key, cond):
        denoise = make_denoiser(model, params)
        out = likelihood.bits_per_dim(
            denoise, schedule, x0, key, prediction=d.prediction, var_type=d.var_type, cond=cond, clip_x0=clip_x0
        )
        total, vlb = out["total"], out["vlb_terms"]
        if not centered:
            # likelihood bins the decoder on [-1, 1]; L_0 of [0, 1] data is evaluated on the map 2x - 1.
            decoder = decoder_bpd(
                denoise, schedule, x0, key, cond, prediction=d.prediction, var_type=d.var_type, centered=False
            )
            total = total - vlb[:, 0] + decoder
            vlb = vlb.at[:, 0].set(decoder)
        return total, out["prior"], vlb

    run = jax.jit(run)
    n = len(images_uint8)
    batch_size = min(batch_size, n)
    totals, priors, terms = [], [], []
    conditional = bool(config.model.get("num_classes", 0))
    for b in tqdm(
        range(math.ceil(n / batch_size)), desc=f"bits/dim ({schedule.num_steps} steps)", disable=not progress
    ):
        chunk = images_uint8[b * batch_size : (b + 1) * batch_size]
        real = len(chunk)
        chunk = np.resize(chunk, (batch_size,) + chunk.shape[1:])  # fixed shape: one compilation
        x0 = jnp.asarray(to_model_range(chunk, centered=centered))
        cond = None
        if conditional:
            from research.cond import Cond

            lab = np.resize(np.asarray(labels[b * batch_size : (b + 1) * batch_size], np.int32), batch_size)
            cond = Cond(label=jnp.asarray(lab))
        total, prior, vlb = jax.device_get(run(params, x0, jax.random.fold_in(jax.random.PRNGKey(seed), b), cond))
        totals.append(total[:real])
        priors.append(prior[:real])
        terms.append(vlb[:real])
    total, prior, vlb = np.concatenate(totals), np.concatenate(priors), np.concatenate(terms)
    stderr = float(total.std(ddof=1) / math.sqrt(len(total))) if n > 1 else 0.0
    return {
        "bpd": float(total.mean()),
        "bpd_stderr": stderr,
        "prior_bpd": float(prior.mean()),
        "decoder_bpd": float(vlb[:, 0].mean()),
        "terms_bpd": vlb.mean(0).tolist(),
        "num_steps": schedule.num_steps,
        "num_images": int(n),
        "clip_x0": bool(clip_x0),
    }


def decoder_bpd(denoise, schedule, x0, key, cond=None, *, prediction: str, var_type: str, centered: bool):
    """-log p(x0 | x_1) in bits/dim [B] of data x0 [B, H, W, C] in the model's range ([-1, 1] if centered, else
    [0, 1]), with the noise bits_per_dim draws at step 0 (normal(fold_in(key, 0))), so it replaces that column.

    For [0, 1] data the decoder N(m, s^2) and the grid k/255 map affinely (y = 2x - 1) onto N(2m - 1, 4 s^2) and
    the [-1, 1] grid that likelihood.discretized_gaussian_log_likelihood bins: equal probabilities, bin for bin.
    """
    import math

    import jax
    import jax.numpy as jnp

    from research.diffusion import gaussian, likelihood

    x0 = jnp.asarray(x0, jnp.promote_types(jnp.asarray(x0).dtype, jnp.float32))
    batch = x0.shape[0]
    t = jnp.zeros((batch,), jnp.int32)
    noise = jax.random.normal(jax.random.fold_in(key, 0), x0.shape, x0.dtype)
    x_t = gaussian.q_sample(schedule, x0, t, noise)
    out = denoise(x_t, jnp.asarray(schedule.timesteps, jnp.int32)[t], cond)
    pred = gaussian.interpret_output(
        schedule, x_t, t, out.astype(x0.dtype), prediction=prediction, var_type=var_type, clip_x0=False
    )
    mean, _, _ = gaussian.q_posterior(schedule, pred.x0, x_t, t)
    log_scale = 0.5 * jnp.broadcast_to(pred.log_variance, x_t.shape)
    if not centered:
        x0, mean, log_scale = 2.0 * x0 - 1.0, 2.0 * mean - 1.0, log_scale + math.log(2.0)
    ll = likelihood.discretized_gaussian_log_likelihood(x0, mean, log_scale)
    return -jnp.mean(ll, axis=tuple(range(1, ll.ndim))) / math.log(2.0)


def read_run_config(workdir: str):
    """The config of a training workdir (config.json), read without touching its checkpoints."""
    from research.config import ConfigError
    from research.run import read_config

    if not os.path.isdir(workdir):
        raise ConfigError(f"--workdir {workdir} does not exist")
    return read_config(workdir)


def check_bpd_request(
    config,
    workdir: str,
    *,
    steps=None,
    split: str = "test",
    num: int = 1000,
    data_dir: Optional[str] = None,
    clip_x0: bool = False,
) -> None:
    """EvaluationError / DataError for what `bpd` cannot do, decided before any weights are loaded."""
    from research.data.sources import get_source
    from research.diffusion.schedules import space_timesteps
    from research.metrics.evaluation import EvaluationError
    from research.sampling import parse_steps

    task = config.get("task", "diffusion")
    if task == "autoencoder":
        raise EvaluationError(
            f"{workdir} is an autoencoder run (task='autoencoder'): bits/dim is the variational "
            "bound of a diffusion model; evaluate a diffusion run"
        )
    if task == "fewstep":
        raise EvaluationError(
            f"{workdir} is a few-step student (task='fewstep'): it has no per-step variational "
            "bound; evaluate its teacher (fewstep.teacher_workdir) instead"
        )
    if task != "diffusion":
        raise EvaluationError(f"{workdir} has task={task!r}; bits/dim needs a diffusion run")
    if config.latent.get("autoencoder", ""):
        raise EvaluationError(
            f"{workdir} is a latent diffusion run (latent.autoencoder={config.latent.autoencoder}): "
            "its bound is over latents, not pixels, so bits/dim of images is not defined"
        )
    if clip_x0 and not config.data.get("centered", True):
        raise EvaluationError(
            f"{workdir} has data in [0, 1] (data.centered=False): clipping x0 to [-1, 1] (--clip-x0) is the protocol "
            "for centered data"
        )
    if steps is not None:
        try:
            space_timesteps(int(config.diffusion.timesteps), parse_steps(steps))
        except ValueError as e:
            raise EvaluationError(f"--steps {steps}: {e}") from None
    data = dict(config.data.to_dict() if hasattr(config.data, "to_dict") else config.data)
    if data_dir:
        data["data_dir"] = data_dir
    total = len(get_source(data, split))
    if num > total:
        raise EvaluationError(
            f"--num {num} but the {split} split of {config.data.name} has {total} images (use --num {total} or less)"
        )


def _bpd_main(args) -> int:
    from research.data import make_eval_arrays
    from research.loader import load_run

    config = read_run_config(args.workdir)
    check_bpd_request(config, args.workdir, steps=args.steps, split=args.split, num=args.num, clip_x0=args.clip_x0)
    config, model, params, step = load_run(args.workdir, args.step, use_ema=not args.no_ema)
    images, labels = make_eval_arrays(config.data, args.split, num=args.num)
    t0 = time.time()
    result = evaluate_bpd(
        model,
        params,
        config,
        images,
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        labels=labels,
        clip_x0=args.clip_x0,
    )
    result.update(step=step, split=args.split, ema=not args.no_ema, seconds=time.time() - t0)
    out_dir = os.path.join(args.workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    name = str(args.steps if args.steps is not None else config.diffusion.timesteps).replace(",", "-")
    name += "_clip" if args.clip_x0 else ""
    with open(os.path.join(out_dir, f"bpd_{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(
        f"bits/dim {result['bpd']:.4f} +- {result['bpd_stderr']:.4f} ({result['num_images']} {args.split} images, "
        f"{result['num_steps']} steps, prior {result['prior_bpd']:.2e}, decoder {result['decoder_bpd']:.4f}, "
        f"step {step}{', EMA' if result['ema'] else ''}{', x0 clipped' if args.clip_x0 else ''}) "
        f"in {result['seconds']:.1f}s"
    )
    return 0


def _space_for(args, *sources):
    from research.metrics.evaluation import EvaluationError, feature_space, parse_dataset_spec

    domain = args.domain
    if args.metric == "inception":
        from research.metrics.inception import PROTOCOLS

        if args.protocol not in PROTOCOLS:
            raise EvaluationError(f"--protocol {args.protocol!r} is not known: use one of {', '.join(PROTOCOLS)}")
    if args.metric == "domain" and not domain:
        specs = [parse_dataset_spec(s) for s in sources]
        names = {sp.name for sp in specs if sp is not None}
        if len(names) != 1:
            raise EvaluationError(
                "--metric domain needs --domain NAME (the dataset whose classifier to use) "
                "unless exactly one source is a dataset spec such as mnist:train"
            )
        domain = names.pop()
    return feature_space(
        args.metric, domain, protocol=args.protocol, batch_size=args.batch_size, data_dir=args.data_dir
    )


def _resolve(source: str, data_dir):
    """-> ('stats', path, None) | ('spec', DatasetSpec, count) | ('images', uint8 [N, H, W, C], N), read cheaply
    (a dataset split is only counted) so that every check happens before features are computed."""
    from research.metrics.evaluation import is_statistics_file, load_images, parse_dataset_spec, split_size

    spec = parse_dataset_spec(source)
    if spec is not None:
        size = split_size(spec, data_dir)  # also refuses a count beyond the split
        return "spec", spec, spec.num or size
    if is_statistics_file(source):
        return "stats", source, None
    images = load_images(source)
    return "images", images, len(images)


def _statistics_of(space, source, resolved, data_dir):
    """-> (mu, sigma, features or None, description) of a resolved source; statistics files pass through."""
    from research.metrics import fid as fid_lib
    from research.metrics.evaluation import EvaluationError, reference_features

    kind, value, count = resolved
    if kind == "stats":
        try:
            mu, sigma, meta = fid_lib.load_statistics(value)
        except (OSError, ValueError) as e:
            raise EvaluationError(str(e)) from None
        return mu, sigma, None, f"{source} (statistics{', ' + json.dumps(meta) if meta else ''})"
    if kind == "spec":
        feats, desc = reference_features(space, value, data_dir=data_dir), str(value)
    else:
        feats, desc = np.asarray(space.features(value)), f"{source} ({count} images)"
    mu, sigma = fid_lib.feature_statistics(feats)
    return mu, sigma, feats, desc


def _fid_main(args) -> int:
    from research.cli import check_output_path
    from research.metrics import fid as fid_lib
    from research.metrics.evaluation import EvaluationError, check_sample_counts, compare_features

    a = args.samples or (args.sources[0] if args.sources else None)
    b = args.ref or (args.sources[1] if len(args.sources) > 1 else None)
    rest = args.sources[(0 if args.samples else 1) + (0 if args.ref else 1) :] if args.sources else []
    if a is None or b is None or rest:
        raise EvaluationError("give exactly two sources: fid A B, or fid --samples A --ref B")
    if args.json:
        check_output_path(args.json, "--json")
    ra, rb = _resolve(a, args.data_dir), _resolve(b, args.data_dir)
    if (args.kid or args.pr) and "stats" in (ra[0], rb[0]):
        raise EvaluationError("KID and precision/recall need features, not a statistics file")
    counts = [r[2] for r in (ra, rb) if r[2] is not None]
    if counts:
        check_sample_counts(
            counts[0], counts[-1], kid=args.kid, precision_recall=args.pr, kid_subset_size=args.kid_subset_size
        )
    space = _space_for(args, a, b)
    t0 = time.time()
    mu1, s1, f1, d1 = _statistics_of(space, a, ra, args.data_dir)
    mu2, s2, f2, d2 = _statistics_of(space, b, rb, args.data_dir)
    if mu1.shape != mu2.shape:
        raise EvaluationError(
            f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]} (statistics from another feature space?)"
        )
    result = {
        "fid": float(fid_lib.frechet_distance(mu1, s1, mu2, s2)),
        "a": d1,
        "b": d2,
        "metric": args.metric,
        "space": space.name,
        "protocol": space.description,
    }
    if args.kid or args.pr:
        extra = compare_features(
            f1, f2, kid=args.kid, precision_recall=args.pr, kid_subset_size=args.kid_subset_size or 1000
        )
        extra.pop("fid")
        result.update(extra)
    result["seconds"] = time.time() - t0
    print(f"protocol: {space.description}")
    print(f"A: {d1}\nB: {d2}")
    line = f"FID ({args.metric}) {result['fid']:.4f}"
    if args.kid:
        line += f"  KID {result['kid']:.5f} +- {result['kid_std']:.5f} (subsets of {result['kid_subset_size']})"
    if args.pr:
        line += f"  precision {result['precision']:.4f}  recall {result['recall']:.4f}"
    print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def _stats_main(args) -> int:
    from research.cli import check_output_path
    from research.metrics import fid as fid_lib
    from research.metrics.evaluation import check_sample_counts

    check_output_path(args.out, "--out")
    resolved = _resolve(args.source, args.data_dir)
    if resolved[2] is not None:
        check_sample_counts(resolved[2], resolved[2])
    space = _space_for(args, args.source)
    mu, sigma, feats, desc = _statistics_of(space, args.source, resolved, args.data_dir)
    fid_lib.save_statistics(
        args.out,
        mu,
        sigma,
        source=desc,
        num=None if feats is None else len(feats),
        space=space.name,
        protocol=space.description,
    )
    print(f"statistics of {desc} in {space.name} -> {args.out}")
    return 0


def _add_space_args(q):
    from research.cli import positive_int

    q.add_argument(
        "--metric",
        choices=("inception", "domain"),
        default="inception",
        help="feature space: FID Inception-v3 (default) or the dataset's domain classifier",
    )
    q.add_argument("--domain", default=None, help="dataset of the domain classifier (mnist, fashion_mnist, digits)")
    q.add_argument("--protocol", default="pytorch-fid", help="Inception preprocessing protocol")
    q.add_argument("--batch-size", type=positive_int, default=None)
    q.add_argument("--data-dir", default=None, help="dataset directory (default $RESEARCH_DATA_DIR/<name>)")


def main(argv=None) -> int:
    from research.cli import ArgumentParser, UsageError, fail, nonnegative_int, positive_int

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fid", help="FID (+ KID, precision/recall) between two image sets or dataset splits")
    f.add_argument("sources", nargs="*", help="two of: images .npz, image folder, statistics .npz, name:split[:num]")
    f.add_argument("--samples", default=None, help="first source (generated images)")
    f.add_argument("--ref", default=None, help="second source (reference), e.g. mnist:train")
    f.add_argument("--kid", action="store_true", help="also kernel inception distance (unbiased, cubic kernel)")
    f.add_argument(
        "--kid-subset-size",
        type=positive_int,
        default=None,
        help="images per KID subset (default 1000, clipped to the smaller set)",
    )
    f.add_argument("--pr", action="store_true", help="also improved precision/recall (k=3)")
    f.add_argument("--json", default=None, help="write the result here")
    _add_space_args(f)
    st = sub.add_parser("stats", help="write mu/sigma of a source (pytorch-fid's .npz format)")
    st.add_argument("source")
    st.add_argument("--out", required=True)
    _add_space_args(st)
    b = sub.add_parser("bpd", help="negative log-likelihood (variational bound) in bits/dim")
    b.add_argument("--workdir", required=True)
    b.add_argument("--step", type=nonnegative_int, default=None)
    b.add_argument("--steps", default=None, help="respacing: 100, ddim50 or a comma list (default: all steps)")
    b.add_argument("--num", type=positive_int, default=1000)
    b.add_argument("--split", default="test")
    b.add_argument("--batch-size", type=positive_int, default=100)
    b.add_argument("--seed", type=nonnegative_int, default=0)
    b.add_argument("--no-ema", action="store_true")
    b.add_argument(
        "--clip-x0",
        action="store_true",
        help="clip each predicted x0 to [-1, 1] as the samplers do (the protocol of iDDPM's NLL script)",
    )
    from research.evaluate_clip import add_parsers

    clip_commands = add_parsers(sub)
    try:
        args = p.parse_args(argv)
    except UsageError as e:
        return fail(e)
    from research.config import ConfigError
    from research.data import DataError
    from research.metrics.evaluation import USER_ERRORS

    run = {"bpd": _bpd_main, "fid": _fid_main, "stats": _stats_main, **clip_commands}[args.command]
    try:
        return run(args)
    except (ConfigError, DataError, UsageError) + USER_ERRORS as e:
        # The data layer names the training command's flag; this command's equivalent is --data-dir.
        return fail(str(e).replace("--config.data.data_dir", "--data-dir"))


if __name__ == "__main__":
    sys.exit(main())
