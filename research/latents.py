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
import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

LATENT_SCALE_FILE = "latent_scale.json"


def _encode(model, params, images, key, scale):
    posterior = model.apply({"params": params}, images, method="encode")
    z = posterior.mode() if key is None else posterior.sample(key)
    return z * scale


def _decode(model, params, latents, scale):
    return model.apply({"params": params}, latents / scale, method="decode")


def compute_latent_scale(model, params, images: np.ndarray, key: jax.Array, batch_size: int = 256) -> dict:
    """1 / std of posterior samples of `images` [N, H, W, C] (model range), in batches (batch b uses
    fold_in(key, b)). -> {'scale', 'latent_std', 'latent_mean', 'num_images'}."""
    images = np.asarray(images, np.float32)
    n = len(images)
    batch_size = min(batch_size, n)
    sample = jax.jit(lambda p, x, k: _encode(model, p, x, k, 1.0))
    total = total_sq = 0.0
    count = 0
    for b, start in enumerate(range(0, n, batch_size)):
        x = images[start:start + batch_size]
        real = len(x)
        if real < batch_size:  # pad the last batch so one program serves all of them
            x = np.concatenate([x, np.zeros((batch_size - real, *x.shape[1:]), x.dtype)])
        z = np.asarray(jax.device_get(sample(params, x, jax.random.fold_in(key, b))), np.float64)[:real]
        total += z.sum()
        total_sq += np.square(z).sum()
        count += z.size
    mean = total / count
    std = float(np.sqrt(max(total_sq / count - mean ** 2, 0.0)))
    if not std > 0:
        raise ValueError("the encoded latents have zero variance; the autoencoder is degenerate")
    return {"scale": 1.0 / std, "latent_std": std, "latent_mean": float(mean), "num_images": n}


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


def ensure_latent_scale(config, model, params, workdir: str, step: int, use_ema: bool = True) -> dict:
    """The stored scale entry for (step, EMA or raw params), computed from the training images if missing."""
    entry = read_latent_scale(workdir, step, use_ema)
    if entry is not None:
        return entry
    from research.data import get_source, make_eval_arrays, to_model_range

    num = min(int(config.autoencoder.scale_num_images), len(get_source(config.data, "train")))
    images, _ = make_eval_arrays(config.data, "train", num)
    entry = compute_latent_scale(model, params, to_model_range(images, centered=config.data.centered),
                                 jax.random.PRNGKey(config.seed))
    entry.update(step=int(step), split="train", statistic="std of posterior samples over all elements")
    if jax.process_index() == 0:
        write_latent_scale(workdir, step, entry, use_ema)
    return entry


@dataclasses.dataclass
class Autoencoder:
    """A trained autoencoder with its latent scale; images are in the model range of its config."""

    model: Any
    params: Any
    scale: float
    config: Any
    step: int

    def __post_init__(self):
        model = self.model
        self._encode_mode = jax.jit(lambda p, x, s: _encode(model, p, x, None, s))
        self._encode_sample = jax.jit(lambda p, x, k, s: _encode(model, p, x, k, s))
        self._decode = jax.jit(lambda p, z, s: _decode(model, p, z, s))

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
            return self._encode_mode(self.params, images, self.scale)
        return self._encode_sample(self.params, images, key, self.scale)

    def decode_latents(self, latents: jax.Array) -> jax.Array:
        """scale * z [B, h, w, z] -> images [B, h*f, w*f, C] (unclipped)."""
        return self._decode(self.params, latents, self.scale)

    encode = encode_to_latents
    decode = decode_latents


def load_autoencoder(workdir: str, step: Optional[int] = None, use_ema: bool = True) -> Autoencoder:
    """The autoencoder of a task='autoencoder' training workdir at `step` (default: newest checkpoint), with its
    latent scale (read from latent_scale.json, or computed and stored there if this step has none)."""
    from research.config import ConfigError
    from research.sample import load_run

    cfg_path = os.path.join(workdir, "config.json")
    if os.path.isfile(cfg_path):  # refuse another task's run before building its model
        with open(cfg_path) as f:
            task = json.load(f).get("task", "diffusion")
        if task != "autoencoder":
            raise ConfigError(f"{workdir} is a {task!r} run, not an autoencoder (task='autoencoder', e.g. "
                              f"configs/vae_mnist.py)")
    config, model, params, step = load_run(workdir, step, use_ema=use_ema)
    entry = ensure_latent_scale(config, model, params, workdir, step, use_ema)
    return Autoencoder(model, params, float(entry["scale"]), config, int(step))


def round_trip_psnr(ae: Autoencoder, images_uint8: np.ndarray, batch_size: int = 500) -> dict:
    """Encode (posterior mean) and decode uint8 images [N, H, W, C]; PSNR against the originals with pixels in
    [0, 1] and reconstructions clipped to it. -> {'psnr': mean of per-image PSNR, 'psnr_of_mean_mse', 'mse'}."""
    from research.data import to_model_range

    centered = ae.config.data.centered
    errors = []
    for start in range(0, len(images_uint8), batch_size):
        x = to_model_range(images_uint8[start:start + batch_size], centered=centered)
        x_hat = np.asarray(ae.decode_latents(ae.encode_to_latents(x)))
        to_unit = (lambda a: (a + 1.0) / 2.0) if centered else (lambda a: a)
        diff = np.clip(to_unit(x_hat), 0.0, 1.0) - to_unit(x)
        errors.append(np.mean(np.square(diff.astype(np.float64)), axis=(1, 2, 3)))
    mse = np.concatenate(errors)
    return {"psnr": float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-12)))),
            "psnr_of_mean_mse": float(10 * np.log10(1.0 / mse.mean())), "mse": float(mse.mean())}
