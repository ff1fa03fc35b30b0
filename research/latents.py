"""Latents for latent diffusion: a trained autoencoder, its scale factor, and the one place the scale is applied.

Rombach et al. (2022) diffuse z_scaled = scale * z with scale = 1 / std(z), so the latents have unit variance like
the data a diffusion model expects (Stable Diffusion's 0.18215 is this number for its autoencoder). Here std(z)
is the standard deviation over all elements (mean subtracted, one number for all channels) of posterior samples
z ~ q(z|x) of the first autoencoder.scale_num_images training images, drawn with keys fixed by the run's seed. The
scale is stored per checkpoint step in WORKDIR/latent_scale.json, written when a run finishes and computed on
demand for any other step, so it survives resuming and can be recomputed for any autoencoder checkpoint.

    ae = load_autoencoder("runs/vae_mnist")
    z = ae.encode_to_latents(images, key)   # [B, H, W, C] model-range pixels -> scaled latents [B, H/f, W/f, z]
    x = ae.decode_latents(z)                # scaled latents -> pixels in the model range
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from research.config import ConfigError
from research.run import checkpoint_steps, load_params, read_config
from research.shapes import autoencoder_geometry, build_network, latent_enabled, latent_geometry, model_input_shape

__all__ = [
    "Autoencoder",
    "autoencoder_geometry",
    "latent_enabled",
    "latent_geometry",
    "load_autoencoder",
    "model_input_shape",
]

LATENT_SCALE_FILE = "latent_scale.json"


def _encode(model, params, images, key, scale, shift=0.0):
    posterior = model.apply({"params": params}, images, method="encode")
    z = posterior.mode() if key is None else posterior.sample(key)
    return (z - shift) * scale


def _decode(model, params, latents, scale, shift=0.0):
    return model.apply({"params": params}, latents / scale + shift, method="decode")


def compute_latent_scale(model, params, images: np.ndarray, key: jax.Array, batch_size: int = 256) -> dict:
    """1 / std of posterior samples of `images` [N, H, W, C] (model range), in batches (batch b uses
    fold_in(key, b)). -> {'scale', 'latent_std', 'latent_mean', 'num_images', and per latent channel
    'channel_mean', 'channel_std'}."""
    images = np.asarray(images, np.float32)
    n = len(images)
    batch_size = min(batch_size, n)
    sample = jax.jit(lambda p, x, k: _encode(model, p, x, k, 1.0))
    total = total_sq = 0.0
    count = 0
    channel_total = channel_sq = 0.0
    for b, start in enumerate(range(0, n, batch_size)):
        x = images[start : start + batch_size]
        real = len(x)
        if real < batch_size:  # pad the last batch so one program serves all of them
            x = np.concatenate([x, np.zeros((batch_size - real, *x.shape[1:]), x.dtype)])
        z = np.asarray(jax.device_get(sample(params, x, jax.random.fold_in(key, b))), np.float64)[:real]
        total += z.sum()
        total_sq += np.square(z).sum()
        count += z.size
        channel_total = channel_total + z.sum(axis=(0, 1, 2))
        channel_sq = channel_sq + np.square(z).sum(axis=(0, 1, 2))
    mean = total / count
    std = float(np.sqrt(max(total_sq / count - mean**2, 0.0)))
    if not std > 0:
        raise ValueError("the encoded latents have zero variance; the autoencoder is degenerate")
    per_channel = count / np.size(channel_total)
    channel_mean = channel_total / per_channel
    channel_std = np.sqrt(np.maximum(channel_sq / per_channel - channel_mean**2, 0.0))
    if not np.all(channel_std > 0):
        raise ValueError(f"a latent channel has zero variance (stds {channel_std}); the autoencoder is degenerate")
    return {
        "scale": 1.0 / std,
        "latent_std": std,
        "latent_mean": float(mean),
        "num_images": n,
        "channel_mean": channel_mean.tolist(),
        "channel_std": channel_std.tolist(),
    }


def _params_name(use_ema: bool) -> str:
    return "ema" if use_ema else "params"


def read_latent_scale(workdir: str, step: int, use_ema: bool = True) -> Optional[dict]:
    path = os.path.join(workdir, LATENT_SCALE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get(str(step), {}).get(_params_name(use_ema))


def write_latent_scale(workdir: str, step: int, entry: dict, use_ema: bool = True) -> str:
    """Add one step's entry to WORKDIR/latent_scale.json ({step: {'ema'|'params': entry}}), atomically."""
    path = os.path.join(workdir, LATENT_SCALE_FILE)
    table = {}
    if os.path.isfile(path):
        with open(path) as f:
            table = json.load(f)
    table.setdefault(str(step), {})[_params_name(use_ema)] = entry
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
    return path


def ensure_latent_scale(
    config, model, params, workdir: str, step: int, use_ema: bool = True, channel_stats: bool = False
) -> dict:
    """The stored scale entry for (step, EMA or raw params), computed from the training images if missing (or,
    with channel_stats, if it has no per-channel statistics: entries written before they existed, imported
    autoencoders)."""
    entry = read_latent_scale(workdir, step, use_ema)
    if entry is not None and (not channel_stats or "channel_std" in entry):
        return entry
    from research.data import get_source, make_eval_arrays, to_model_range

    num = min(int(config.autoencoder.scale_num_images), len(get_source(config.data, "train")))
    images, _ = make_eval_arrays(config.data, "train", num)
    entry = compute_latent_scale(
        model, params, to_model_range(images, centered=config.data.centered), jax.random.PRNGKey(config.seed)
    )
    entry.update(step=int(step), split="train", statistic="std of posterior samples over all elements")
    if jax.process_index() == 0:
        write_latent_scale(workdir, step, entry, use_ema)
    return entry


@dataclasses.dataclass
class Autoencoder:
    """A trained autoencoder with its latent scale; images are in the model range of its config."""

    model: Any
    params: Any
    scale: Any  # float, or per-channel [z] with normalization='channel'
    config: Any
    step: int
    shift: Any = 0.0  # 0, or the per-channel mean [z] with normalization='channel'
    normalization: str = "scale"

    @functools.cached_property
    def digest(self) -> str:
        """sha256 of the exact weights (params_digest), computed once: it keys the latent cache and the frozen-part
        reference in a run's checkpoints."""
        return params_digest(self.params)

    def __post_init__(self):
        model = self.model
        self._encode_mode = jax.jit(lambda p, x, s, m: _encode(model, p, x, None, s, m))
        self._encode_sample = jax.jit(lambda p, x, k, s, m: _encode(model, p, x, k, s, m))
        self._decode = jax.jit(lambda p, z, s, m: _decode(model, p, z, s, m))

    @property
    def downsample_factor(self) -> int:
        return self.model.downsample_factor

    def latent_shape(self, image_shape) -> tuple:
        """(H, W, C) of an image -> (H/f, W/f, z_channels) of its latent."""
        f = self.downsample_factor
        return (image_shape[0] // f, image_shape[1] // f, self.model.z_channels)

    def encode_to_latents(self, images: jax.Array, key: Optional[jax.Array] = None) -> jax.Array:
        """[B, H, W, C] -> scale * z [B, H/f, W/f, z]: a posterior sample with key, the posterior mean without."""
        if key is None:
            return self._encode_mode(self.params, images, self.scale, self.shift)
        return self._encode_sample(self.params, images, key, self.scale, self.shift)

    def decode_latents(self, latents: jax.Array) -> jax.Array:
        """scale * z [B, h, w, z] -> images [B, h*f, w*f, C] (unclipped)."""
        return self._decode(self.params, latents, self.scale, self.shift)

    encode = encode_to_latents
    decode = decode_latents


NORMALIZATIONS = ("scale", "channel")


def load_autoencoder(
    workdir: str, step: Optional[int] = None, use_ema: bool = True, normalization: str = "scale"
) -> Autoencoder:
    """The autoencoder of a task='autoencoder' training workdir at `step` (default: newest checkpoint), with its
    latent statistics (read from latent_scale.json, or computed and stored there if this step has none).

    normalization 'scale': z * scale with one scale = 1 / std over all elements (Rombach et al.; Stable
    Diffusion's 0.18215). 'channel': (z - mean_c) / std_c per latent channel, for autoencoders whose channels
    carry offsets larger than their spread (then one global std mostly measures the offsets, and the
    diffusion model would see the images' variation at a fraction of unit scale)."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization={normalization!r}; choose one of {list(NORMALIZATIONS)}")
    config = read_config(workdir)
    if config.task != "autoencoder" or config.model.name != "vae":  # refuse another run before reading weights
        raise ConfigError(
            f"{workdir} is a {config.task!r} run, not an autoencoder (task='autoencoder', e.g. configs/vae_mnist.py)"
        )
    _, params, step = load_params(workdir, step, use_ema=use_ema)
    model = build_network(config)
    entry = ensure_latent_scale(config, model, params, workdir, step, use_ema, channel_stats=normalization == "channel")
    if normalization == "channel":
        return Autoencoder(
            model,
            params,
            1.0 / np.asarray(entry["channel_std"], np.float32),
            config,
            int(step),
            shift=np.asarray(entry["channel_mean"], np.float32),
            normalization="channel",
        )
    return Autoencoder(model, params, float(entry["scale"]), config, int(step))


def round_trip_psnr(ae: Autoencoder, images_uint8: np.ndarray, batch_size: int = 500) -> dict:
    """Encode (posterior mean) and decode uint8 images [N, H, W, C]; PSNR against the originals with pixels in
    [0, 1] and reconstructions clipped to it. -> {'psnr': mean of per-image PSNR, 'psnr_of_mean_mse', 'mse'}."""
    from research.data import to_model_range

    centered = ae.config.data.centered
    errors = []
    for start in range(0, len(images_uint8), batch_size):
        x = to_model_range(images_uint8[start : start + batch_size], centered=centered)
        x_hat = np.asarray(ae.decode_latents(ae.encode_to_latents(x)))
        to_unit = (lambda a: (a + 1.0) / 2.0) if centered else (lambda a: a)
        diff = np.clip(to_unit(x_hat), 0.0, 1.0) - to_unit(x)
        errors.append(np.mean(np.square(diff.astype(np.float64)), axis=(1, 2, 3)))
    mse = np.concatenate(errors)
    return {
        "psnr": float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-12)))),
        "psnr_of_mean_mse": float(10 * np.log10(1.0 / mse.mean())),
        "mse": float(mse.mean()),
    }


# ---------------------------------------------------------------------------------------------------------------
# The latent pipeline of a diffusion run (config.latent): geometry, the cached training set, z ~ q(z|x) per step.


def resolve_latent_config(config):
    """A copy with latent.autoencoder made absolute and latent.step set to the checkpoint used, so config.json
    names exactly the autoencoder a run was trained with (later checkpoints of it do not change the run)."""
    if not latent_enabled(config):
        return config
    config = config.copy_and_resolve_references()
    workdir = os.path.abspath(config.latent.autoencoder)
    autoencoder_geometry(workdir)  # a clear error for a missing or wrong workdir
    steps = checkpoint_steps(workdir)
    if not steps:
        raise ConfigError(f"latent.autoencoder={workdir!r} has no checkpoint yet")
    step = int(config.latent.step) or steps[-1]
    if step not in steps:
        raise ConfigError(f"latent.step={step}: {workdir} has checkpoints {steps}")
    config.latent.autoencoder, config.latent.step = workdir, step
    return config


def load_run_autoencoder(config) -> Autoencoder:
    """The autoencoder a latent diffusion config names, checked against its pixel data and declared geometry."""

    lat = config.latent
    ae = load_autoencoder(lat.autoencoder, int(lat.step) or None, use_ema=lat.use_ema, normalization=lat.normalization)
    d, ad = config.data, ae.config.data
    for key in ("image_size", "channels", "centered"):
        if d[key] != ad[key]:
            raise ConfigError(
                f"data.{key}={d[key]!r} but the autoencoder in {lat.autoencoder} was trained with "
                f"data.{key}={ad[key]!r}; the diffusion run must see pixels as its autoencoder did"
            )
    for key, have in (("downsample_factor", ae.downsample_factor), ("channels", ae.model.z_channels)):
        if lat[key] and lat[key] != have:
            raise ConfigError(f"latent.{key}={lat[key]} but the autoencoder in {lat.autoencoder} has {have}")
    return ae


def params_digest(params) -> str:
    """sha256 over the parameter bytes in tree order: identifies the exact weights a cache was made with."""
    import hashlib

    h = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(params)):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


CACHE_META = "meta.json"


class LatentCacheSource:
    """A split encoded once: the scaled posterior mean and std of every image (memory-mapped .npy files).

    read_batch returns 'images' float32 [B, h, w, 2z] (mean | std along channels, already in latent units) and
    labels; make_latent_fn(cached=True) turns them into z ~ q(z|x) with the step's key, so every epoch sees new
    posterior draws, as encoding on the fly would.
    """

    def __init__(self, directory: str):
        with open(os.path.join(directory, CACHE_META)) as f:
            self.meta = json.load(f)
        self.directory = directory
        self.mean = np.load(os.path.join(directory, "mean.npy"), mmap_mode="r")
        self.std = np.load(os.path.join(directory, "std.npy"), mmap_mode="r")
        self.labels = np.load(os.path.join(directory, "labels.npy"))
        self.num_classes = int(self.labels.max()) + 1 if len(self.labels) else 0

    @property
    def image_shape(self) -> tuple:
        h, w, z = self.mean.shape[1:]
        return (h, w, 2 * z)

    def __len__(self) -> int:
        return len(self.labels)

    def read_batch(self, indices) -> tuple:
        idx = np.asarray(indices, np.int64)
        moments = np.concatenate([self.mean[idx], self.std[idx]], axis=-1).astype(np.float32)
        return moments, self.labels[idx]

    def __getitem__(self, index: int) -> dict:
        moments, labels = self.read_batch([index])
        return {"image": moments[0], "label": labels[0]}

    def __repr__(self) -> str:
        return f"LatentCacheSource({self.directory!r}, {len(self)} examples)"


def _cache_key(config, ae: Autoencoder, split: str, digest: str) -> dict:
    d = config.data
    return {
        "data": {k: d[k] for k in ("name", "tfds_name", "data_dir", "image_size", "channels", "centered")},
        "split": split,
        "autoencoder": os.path.abspath(config.latent.autoencoder),
        "step": ae.step,
        "use_ema": bool(config.latent.use_ema),
        "normalization": ae.normalization,
        "scale": np.asarray(ae.scale, np.float64).tolist(),
        "shift": np.asarray(ae.shift, np.float64).tolist(),
        "params_sha256": digest,
    }


def latent_cache(
    config, ae: Autoencoder, split: str = "train", *, batch_size: int = 256, progress: bool = True
) -> LatentCacheSource:
    """The cache of `split` for this (data, autoencoder weights, scale), encoding it first if it is missing.

    Lives in latent.cache_dir (default AUTOENCODER/latent_cache) under a name hashed from everything that
    determines its contents, so a retrained autoencoder or another dataset never reads a stale cache. Written by
    process 0 into a temporary folder renamed on completion (meta.json last); other processes wait for it.
    """
    import hashlib

    from tqdm.auto import tqdm

    from research.data import get_source, read_examples, to_model_range

    key = _cache_key(config, ae, split, ae.digest)
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    root = config.latent.cache_dir or os.path.join(config.latent.autoencoder, "latent_cache")
    directory = os.path.join(root, f"{config.data.name}-{split}-{name}")
    if not os.path.isfile(os.path.join(directory, CACHE_META)) and jax.process_index() == 0:
        source = get_source(config.data, split)
        n = len(source)
        h, w, z = ae.latent_shape(tuple(source.image_shape))
        tmp = directory + f".tmp{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        mean = np.lib.format.open_memmap(os.path.join(tmp, "mean.npy"), "w+", np.float32, (n, h, w, z))
        std = np.lib.format.open_memmap(os.path.join(tmp, "std.npy"), "w+", np.float32, (n, h, w, z))
        labels = np.zeros((n,), np.int32)
        model, scale, shift = ae.model, ae.scale, ae.shift

        @jax.jit
        def moments(params, x):
            posterior = model.apply({"params": params}, x, method="encode")
            return (posterior.mean - shift) * scale, posterior.std * scale

        batch_size = min(batch_size, n)
        for start in tqdm(
            range(0, n, batch_size), desc=f"encoding {config.data.name}:{split} to latents", disable=not progress
        ):
            idx = np.arange(start, min(start + batch_size, n))
            images, labels[idx] = read_examples(source, idx)
            x = to_model_range(images, centered=config.data.centered)
            if len(x) < batch_size:  # one program for every batch
                x = np.concatenate([x, np.zeros((batch_size - len(x), *x.shape[1:]), x.dtype)])
            m, s = jax.device_get(moments(ae.params, x))
            mean[idx], std[idx] = m[: len(idx)], s[: len(idx)]
        mean.flush()
        std.flush()
        del mean, std
        np.save(os.path.join(tmp, "labels.npy"), labels)
        with open(os.path.join(tmp, CACHE_META), "w") as f:
            json.dump({**key, "num_examples": n, "latent_shape": [h, w, z]}, f, indent=2)
        if os.path.isdir(directory):  # an incomplete earlier attempt
            import shutil

            shutil.rmtree(directory)
        os.replace(tmp, directory)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"latent cache {directory}")
    return LatentCacheSource(directory)


def make_latent_fn(ae: Autoencoder, *, cached: bool, seed: int, out_sharding=None, train_config=None):
    """(batch['image'], step) -> scaled latents z ~ q(z|x), the key depending only on (seed, step) so a resumed
    run draws the same latents. cached: the image is the cache's [mean | std]; otherwise pixels, encoded here.
    The frozen autoencoder's parameters are placed on the batch's mesh by train_config's sharding rules (as
    frozen/autoencoder/...; replicated when no rule names them, or without a train_config)."""
    base = jax.random.fold_in(jax.random.PRNGKey(seed), 0x1A7E)
    model, scale, shift = ae.model, ae.scale, ae.shift

    def from_moments(moments, key):
        mean, std = jnp.split(moments, 2, axis=-1)
        return mean + std * jax.random.normal(key, mean.shape, mean.dtype)

    def from_pixels(params, images, key):
        return _encode(model, params, images, key, scale, shift)

    if cached:
        fn = jax.jit(from_moments, out_shardings=out_sharding)
        return lambda images, step: fn(images, jax.random.fold_in(base, step))
    fn = jax.jit(from_pixels, out_shardings=out_sharding)
    params = ae.params
    if out_sharding is not None:
        from research.train.mesh import frozen_shardings

        rules = train_config if train_config is not None else {}
        params = jax.device_put(params, frozen_shardings(out_sharding.mesh, "autoencoder", params, rules))
    return lambda images, step: fn(params, images, jax.random.fold_in(base, step))
