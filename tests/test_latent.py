"""The latent-diffusion pipeline: a diffusion run on the scaled latents of a trained autoencoder, with the
training split cached once or encoded on the fly, and samples decoded to pixels."""

import json
import os

import jax
import numpy as np
import pytest

from research.config import ConfigError, base_config
from research.data import make_eval_arrays, to_model_range
from research.latents import (
    LatentCacheSource,
    latent_cache,
    load_autoencoder,
    load_run_autoencoder,
    make_latent_fn,
    model_input_shape,
    resolve_latent_config,
)
from research.models.dit import dit_model_config
from research.sampling import Generator
from research.tasks import get_config, validate_config
from research.train.loop import train
from tests.factories import make_tiny_vae_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_autoencoder_config():
    """test_vae's f=2 autoencoder (8x8 digits -> 4x4x2 latents) without its discriminator, for 6 steps."""
    c = make_tiny_vae_config()
    c.autoencoder.disc_weight = 0.0
    c.train.num_steps = 6
    c.train.ckpt_every = 3
    c.train.sample_every = 0
    return c


def latent_dit_config(autoencoder, cache=True):
    """A two-block class-conditional DiT (patch 2) on the 4x4x2 latents of the tiny autoencoder."""
    c = base_config()
    c.latent.autoencoder = autoencoder
    c.latent.cache = cache
    with c.unlocked():
        c.model = dit_model_config("", depth=2, hidden_size=32, num_heads=2, patch_size=2, num_classes=10)
    c.diffusion.timesteps = 100
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 0
    c.train.batch_size = 16
    c.train.num_steps = 4
    c.train.log_every = 1
    c.train.ckpt_every = 2
    c.train.sample_every = 0
    c.train.progress = False
    c.sample.clip_x0 = False
    c.sample.steps = "5"
    return c


@pytest.fixture(scope="module")
def autoencoder_dir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("latent") / "ae")
    train(tiny_autoencoder_config(), workdir)
    return workdir


def _leaves_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_model_input_shape_is_the_latent_shape(autoencoder_dir):
    config = latent_dit_config(autoencoder_dir)
    validate_config(config)
    assert model_input_shape(config) == (4, 4, 2)  # read from the autoencoder's config.json
    config.latent.downsample_factor, config.latent.channels = 2, 2
    assert model_input_shape(config) == (4, 4, 2)  # declared, no workdir needed
    pixel = base_config()
    assert model_input_shape(pixel) == (8, 8, 1)
    imagenet = get_config(os.path.join(REPO, "configs", "dit_xl2_imagenet256.py"))
    assert model_input_shape(imagenet) == (32, 32, 4)  # 256x256x3 pixels through an f8, 4-channel autoencoder


def test_cache_holds_scaled_posterior_moments_and_matches_encoding_on_the_fly(autoencoder_dir):
    config = resolve_latent_config(latent_dit_config(autoencoder_dir))
    ae = load_run_autoencoder(config)
    cache = latent_cache(config, ae, progress=False)
    images, labels = make_eval_arrays(config.data, "train")
    assert len(cache) == len(images) == 1500 and cache.image_shape == (4, 4, 4)
    idx = np.array([0, 5, 17, 1000, 1499, 3, 9, 11, 12, 13, 14, 15, 16, 18, 19, 20])
    moments, cached_labels = cache.read_batch(idx)
    np.testing.assert_array_equal(cached_labels, labels[idx])
    x = to_model_range(images[idx])
    posterior = ae.model.apply({"params": ae.params}, x, method="encode")
    np.testing.assert_allclose(moments[..., :2], np.asarray(posterior.mean) * ae.scale, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(moments[..., 2:], np.asarray(posterior.std) * ae.scale, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(moments[..., :2], np.asarray(ae.encode_to_latents(x)), rtol=1e-5, atol=1e-6)
    # Both data paths draw z = mean + std * eps with the same step key: the same latents.
    from_cache = make_latent_fn(ae, cached=True, seed=3)
    from_pixels = make_latent_fn(ae, cached=False, seed=3)
    for step in (0, 7):
        np.testing.assert_allclose(
            np.asarray(from_cache(moments, step)), np.asarray(from_pixels(x, step)), rtol=1e-5, atol=1e-5
        )
    z0, z1 = np.asarray(from_cache(moments, 0)), np.asarray(from_cache(moments, 1))
    assert np.abs(z0 - z1).max() > 1e-3  # every step a new posterior draw
    # With the scale applied, the latents are roughly unit variance (the scale was set on 256 training images).
    assert 0.5 < float(np.asarray(from_cache(cache.read_batch(np.arange(512))[0], 0)).std()) < 1.5


def test_channel_normalization_standardises_each_latent_channel_and_inverts_exactly(autoencoder_dir):
    scaled = load_autoencoder(autoencoder_dir)
    channel = load_autoencoder(autoencoder_dir, normalization="channel")
    images, _ = make_eval_arrays(scaled.config.data, "train", 256)  # the images the statistics were taken on
    x = to_model_range(images)
    key = jax.random.PRNGKey(scaled.config.seed)
    z = np.concatenate([np.asarray(channel.encode_to_latents(x[:256], jax.random.fold_in(key, 0)))])
    np.testing.assert_allclose(z.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(z.std(axis=(0, 1, 2)), 1.0, rtol=1e-3)
    # The same affine map as the global scale up to per-channel constants: decoding inverts either exactly.
    np.testing.assert_allclose(
        np.asarray(channel.decode_latents(channel.encode_to_latents(x[:16]))),
        np.asarray(scaled.decode_latents(scaled.encode_to_latents(x[:16]))),
        rtol=1e-4,
        atol=1e-4,
    )
    with pytest.raises(ValueError, match="normalization='global'"):
        load_autoencoder(autoencoder_dir, normalization="global")


def test_cache_is_reused_and_keyed_by_the_exact_weights(autoencoder_dir):
    config = resolve_latent_config(latent_dit_config(autoencoder_dir))
    first = latent_cache(config, load_run_autoencoder(config), progress=False)
    stamp = os.path.getmtime(os.path.join(first.directory, "mean.npy"))
    again = latent_cache(config, load_run_autoencoder(config), progress=False)
    assert again.directory == first.directory
    assert os.path.getmtime(os.path.join(again.directory, "mean.npy")) == stamp  # not re-encoded
    config.latent.step = 3  # another checkpoint of the same autoencoder: other weights, other cache
    other = latent_cache(config, load_run_autoencoder(config), progress=False)
    assert other.directory != first.directory
    assert not np.array_equal(np.asarray(other.mean[:8]), np.asarray(first.mean[:8]))
    assert isinstance(other, LatentCacheSource) and other.meta["step"] == 3


def test_latent_run_resumes_exactly_decodes_samples_and_records_its_autoencoder(autoencoder_dir, tmp_path):
    config = latent_dit_config(autoencoder_dir)
    straight = train(config, str(tmp_path / "straight"))
    workdir = str(tmp_path / "resumed")
    train(config, workdir, stop_at=2)
    resumed = train(config, workdir)
    _leaves_equal(straight["state"].params["net"], resumed["state"].params["net"])
    _leaves_equal(straight["state"].ema_params["net"], resumed["state"].ema_params["net"])

    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)["latent"]
    assert saved["autoencoder"] == os.path.abspath(autoencoder_dir) and saved["step"] == 6

    from research.loader import load_run

    run_config, model, params, _ = load_run(workdir)
    gen = Generator(model, run_config, batch_size=4)
    samples, labels, nfe = gen.generate(params, 6, seed=0, progress=False)
    assert samples.shape == (6, 8, 8, 1) and nfe == 5  # decoded pixels, not 4x4x2 latents
    # Decoding is the autoencoder's: re-running the sampler in latent space and decoding by hand agrees.
    raw = np.asarray(
        gen._run(
            params, jax.random.fold_in(jax.random.PRNGKey(0), 0), jax.numpy.asarray(np.arange(4) % 10, np.int32)
        ).samples
    )
    assert raw.shape == (4, 4, 4, 2)
    ae = load_autoencoder(autoencoder_dir)
    np.testing.assert_allclose(samples[:4], np.asarray(ae.decode_latents(raw)), rtol=1e-5, atol=1e-5)


def test_on_the_fly_encoding_trains_like_the_cache(autoencoder_dir, tmp_path):
    cached = train(latent_dit_config(autoencoder_dir, cache=True), str(tmp_path / "cached"), stop_at=2)
    fly = train(latent_dit_config(autoencoder_dir, cache=False), str(tmp_path / "fly"), stop_at=2)
    for a, b in zip(jax.tree.leaves(cached["state"].params["net"]), jax.tree.leaves(fly["state"].params["net"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_latent_config_errors_name_the_fix(autoencoder_dir, tmp_path):
    config = latent_dit_config(autoencoder_dir)
    config.sample.clip_x0 = True
    with pytest.raises(ConfigError, match="sample.clip_x0=False"):
        validate_config(config)
    config = latent_dit_config(autoencoder_dir)
    config.data.random_flip = True
    with pytest.raises(ConfigError, match="latent.cache=False"):
        validate_config(config)
    config = latent_dit_config(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="has no config.json: train one first"):
        validate_config(config)
    config = latent_dit_config(autoencoder_dir)
    config.latent.channels = 4
    with pytest.raises(ConfigError, match="latent.channels=4 but the autoencoder"):
        load_run_autoencoder(resolve_latent_config(config))
    config = latent_dit_config(autoencoder_dir)
    config.data.centered = False
    with pytest.raises(ConfigError, match="data.centered=False but the autoencoder"):
        load_run_autoencoder(resolve_latent_config(config))
    config = latent_dit_config(autoencoder_dir)
    config.latent.step = 4
    with pytest.raises(ConfigError, match=r"latent.step=4: .* has checkpoints \[3, 6\]"):
        resolve_latent_config(config)


# The end-to-end quality check of the latent recipe on digits (both stages from scratch, about 5 minutes) is
# experiments/latent_digits.py, outside the test suite's CI budget.
