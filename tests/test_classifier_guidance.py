"""Classifier guidance (Dhariwal & Nichol 2021): the gradient and the eps shift against closed forms, scale 0 is the
unguided sampler exactly, guidance with the exact classifier of a two-Gaussian mixture draws the requested class at
the analytic rate, ADM's attention pooling against a naive re-implementation, and the noisy classifier task trains."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from research.cond import Cond
from research.config import ConfigError
from research.diffusion import gaussian, samplers
from research.diffusion.classifier_guidance import (
    classifier_guided_ddpm_sample,
    classifier_guided_denoiser,
    classifier_guided_mean,
    log_prob_from_logits,
    log_prob_grad,
)
from research.diffusion.schedules import make_schedule, respace, space_timesteps
from research.tasks import SampleOptions, get_task, validate_config
from tests.factories import make_tiny_classifier_config

FULL = make_schedule("cosine", 1000)


def gaussian_classes(means, sigma):
    """Classes y with p(x | y) = N(means[y], sigma^2 I), equal priors: the logits -|x - mu_y|^2 / (2 sigma^2)."""
    mu = jnp.asarray(means, jnp.float32)  # [K, H, W, C]

    def logits(x, t_model):
        d = x[:, None] - mu[None]
        return -jnp.sum(d * d, axis=(2, 3, 4)) / (2.0 * sigma**2)

    return logits


def test_gradient_is_the_closed_form_class_posterior_score():
    # grad_x log p(y | x) = (mu_y - sum_k p(k | x) mu_k) / sigma^2 for Gaussian classes with a shared variance.
    rng = np.random.default_rng(0)
    means, sigma = rng.normal(size=(3, 2, 2, 1)), 0.7
    x = rng.normal(size=(5, 2, 2, 1)).astype(np.float32)
    y = np.array([0, 1, 2, 1, 0])
    grad = log_prob_grad(log_prob_from_logits(gaussian_classes(means, sigma)))(jnp.asarray(x), jnp.zeros(5), y)
    d2 = ((x[:, None] - means[None]) ** 2).sum(axis=(2, 3, 4))
    post = np.exp(-d2 / (2 * sigma**2) - np.max(-d2 / (2 * sigma**2), axis=1, keepdims=True))
    post /= post.sum(axis=1, keepdims=True)
    expected = (means[y] - np.einsum("bk,khwc->bhwc", post, means)) / sigma**2
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_guided_output_is_the_eps_shift_by_hand(prediction):
    # On a respaced chain the model sees original timesteps; the shift uses abar of those timesteps, and for v / x0
    # models the guided output, converted to eps, is eps - sqrt(1 - abar) s g.
    sched = respace(FULL, space_timesteps(1000, 10))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 2, 2, 1)), jnp.float32)
    raw = jnp.asarray(rng.normal(size=(4, 2, 2, 2)), jnp.float32)  # mean part + a learned-variance channel
    idx = np.array([0, 3, 7, 9])
    t_model = jnp.asarray(sched.timesteps[idx], jnp.int32)
    labels = jnp.array([0, 1, 1, 0])
    grad_fn = log_prob_grad(log_prob_from_logits(gaussian_classes(rng.normal(size=(2, 2, 2, 1)), 0.8)))
    scale = 2.5

    def model(x_t, t, cond):
        return raw * (1.0 + x_t.sum())  # depends on x_t, so the gradient must not flow through the model

    out = classifier_guided_denoiser(model, grad_fn, sched, scale, prediction)(x, t_model, Cond(label=labels))
    to_eps = {
        "eps": lambda o: o,
        "v": lambda o: gaussian.predict_eps_from_v(sched, x, idx, o),
        "x0": lambda o: gaussian.predict_eps_from_x0(sched, x, idx, o),
    }[prediction]
    base = model(x, t_model, None)
    g = np.asarray(grad_fn(x, t_model, labels))
    s1m = np.sqrt(1.0 - FULL.alphas_cumprod[np.asarray(t_model)]).reshape(-1, 1, 1, 1)
    expected = np.asarray(to_eps(base[..., :1])) - s1m * scale * g
    np.testing.assert_allclose(np.asarray(to_eps(out[..., :1])), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(out[..., 1:]), np.asarray(base[..., 1:]))
    with pytest.raises(ValueError, match="not timesteps of the schedule"):
        classifier_guided_denoiser(model, grad_fn, sched, scale, prediction)(x, t_model + 1, Cond(label=labels))


# ------------------------------------------------------------------ a toy problem with an exact model and classifier

MU = 0.5 * np.ones((2, 2, 1), np.float32)  # class 1 at +MU, class 0 at -MU; |MU| = 1
TAU = 0.5


def _mixture_terms(x, t_model):
    abar = jnp.asarray(FULL.alphas_cumprod, jnp.float32)[t_model].reshape(-1, 1, 1, 1)
    var = abar * TAU**2 + 1.0 - abar
    centres = jnp.stack([-jnp.sqrt(abar) * MU, jnp.sqrt(abar) * MU], axis=1)  # [B, 2, H, W, C]
    logits = -jnp.sum((x[:, None] - centres) ** 2, axis=(2, 3, 4)) / (2.0 * var[:, 0, 0, 0, None])
    return abar, var, centres, logits


def exact_eps(x, t_model, cond):
    """eps(x_t) = -sqrt(1 - abar) * score of the noised mixture 0.5 N(-sqrt(abar) MU, v) + 0.5 N(+sqrt(abar) MU, v)."""
    abar, var, centres, logits = _mixture_terms(x, t_model)
    w = jax.nn.softmax(logits, axis=1)[:, :, None, None, None]
    score = jnp.sum(w * (centres - x[:, None]), axis=1) / var
    return -jnp.sqrt(1.0 - abar) * score


def exact_class_logits(x, t_model):
    return _mixture_terms(x, t_model)[3]


def right_side_fraction(samples, label=1):
    side = np.sign(np.asarray(samples).reshape(len(samples), -1) @ MU.ravel())
    return float(np.mean(side == (1 if label == 1 else -1)))


def ddim(denoise_fn, sched, n, cond):
    """Deterministic DDIM samples [n, 2, 2, 1] from key 0, without clipping x0 (the toy data is not in [-1, 1])."""
    run = lambda key: samplers.sample("ddim", denoise_fn, sched, key, (n, 2, 2, 1), cond=cond, eta=0.0, clip_x0=False)
    return jax.jit(run)(jax.random.PRNGKey(0)).samples


def test_guidance_draws_the_requested_class_at_the_analytic_rate():
    # With the exact eps and the exact p(y | x_t), scale 1 samples p(x0 | y): the fraction on class 1's side of the
    # boundary is Phi(|MU| / TAU) = Phi(2); scale 0 gives the mixture's 1/2, and larger scales sharpen further.
    n, sched = 2000, respace(FULL, space_timesteps(1000, 50))
    grad_fn = log_prob_grad(log_prob_from_logits(exact_class_logits))
    cond = Cond(label=jnp.ones((n,), jnp.int32))
    fractions = {}
    for scale in (0.0, 0.5, 1.0, 3.0):
        f = classifier_guided_denoiser(exact_eps, grad_fn, sched, scale, "eps")
        fractions[scale] = right_side_fraction(ddim(f, sched, n, cond))
    assert abs(fractions[0.0] - 0.5) < 0.05, fractions
    assert fractions[0.0] < fractions[0.5] < fractions[1.0] < fractions[3.0], fractions
    assert abs(fractions[1.0] - norm.cdf(2.0)) < 0.02, fractions
    # the other label moves the samples the other way
    f = classifier_guided_denoiser(exact_eps, grad_fn, sched, 1.0, "eps")
    zeros = Cond(label=jnp.zeros((n,), jnp.int32))
    assert abs(right_side_fraction(ddim(f, sched, n, zeros), label=0) - norm.cdf(2.0)) < 0.02


def test_scale_zero_is_exactly_the_unguided_sampler():
    sched = respace(FULL, space_timesteps(1000, 20))
    grad_fn = log_prob_grad(log_prob_from_logits(exact_class_logits))
    cond = Cond(label=jnp.ones((64,), jnp.int32))
    assert classifier_guided_denoiser(exact_eps, grad_fn, sched, 0.0, "eps") is exact_eps
    key, shape = jax.random.PRNGKey(3), (64, 2, 2, 1)
    for name in ("ddim", "dpm++2m"):
        plain = samplers.sample(name, exact_eps, sched, key, shape, cond=cond, prediction="eps").samples
        guided = classifier_guided_denoiser(exact_eps, grad_fn, sched, 0.0, "eps")
        same = samplers.sample(name, guided, sched, key, shape, cond=cond, prediction="eps").samples
        np.testing.assert_array_equal(np.asarray(plain), np.asarray(same))
    # A traced zero scale takes the gradient but shifts by exactly 0.
    traced = jax.jit(
        lambda s: (
            samplers.sample(
                "ddim", classifier_guided_denoiser(exact_eps, grad_fn, sched, s, "eps"), sched, key, shape, cond=cond
            ).samples
        )
    )(jnp.float32(0.0))
    plain = jax.jit(lambda: samplers.sample("ddim", exact_eps, sched, key, shape, cond=cond).samples)()
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(plain))
    # Algorithm 1 at scale 0 is ddpm_sample draw for draw.
    ddpm = samplers.sample("ddpm", exact_eps, sched, key, shape, cond=cond, var_type="fixed_small").samples
    ours = classifier_guided_ddpm_sample(exact_eps, grad_fn, sched, key, shape, scale=0.0, cond=cond).samples
    np.testing.assert_array_equal(np.asarray(ddpm), np.asarray(ours))


def test_ancestral_form_shifts_the_mean_by_the_variance_and_guides():
    rng = np.random.default_rng(2)
    mean, g = rng.normal(size=(3, 2, 2, 1)), rng.normal(size=(3, 2, 2, 1))
    log_var = np.log(np.array([0.1, 0.2, 0.3])).reshape(-1, 1, 1, 1)
    out = classifier_guided_mean(jnp.asarray(mean), jnp.asarray(log_var), jnp.asarray(g), 1.5)
    np.testing.assert_allclose(np.asarray(out), mean + 1.5 * np.exp(log_var) * g, rtol=1e-6)
    # Algorithm 1 on the toy mixture also draws the requested class more often as the scale grows.
    n, sched = 2000, respace(FULL, space_timesteps(1000, 50))
    grad_fn = log_prob_grad(log_prob_from_logits(exact_class_logits))
    cond = Cond(label=jnp.ones((n,), jnp.int32))
    fr = [
        right_side_fraction(
            classifier_guided_ddpm_sample(
                exact_eps, grad_fn, sched, jax.random.PRNGKey(0), (n, 2, 2, 1), scale=s, cond=cond, clip_x0=False
            ).samples
        )
        for s in (0.0, 1.0, 3.0)
    ]
    assert abs(fr[0] - 0.5) < 0.05 and fr[0] < fr[1] < fr[2] and fr[1] > 0.9, fr


# ------------------------------------------------------------------ the classifier network and its task


def test_attention_pool_matches_a_naive_implementation():
    from research.models.classifier import AttentionPool

    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 3, 3, 8)).astype(np.float32)
    pool = AttentionPool(out_dim=5, num_heads=2)
    params = pool.init(jax.random.PRNGKey(0), jnp.asarray(x))["params"]
    params = jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32), params)  # nonzero biases
    out = np.asarray(pool.apply({"params": params}, jnp.asarray(x)))
    p = jax.tree.map(np.asarray, params)
    tokens = x.reshape(2, 9, 8)
    tokens = np.concatenate([tokens.mean(1, keepdims=True), tokens], axis=1) + p["pos_emb"][None]
    qkv = tokens @ p["qkv"]["kernel"] + p["qkv"]["bias"]
    q, k, v = (qkv[..., i * 8 : (i + 1) * 8].reshape(2, 10, 2, 4) for i in range(3))
    logits = np.einsum("bhd,bnhd->bhn", q[:, 0], k) / np.sqrt(4)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    pooled = np.einsum("bhn,bnhd->bhd", w, v).reshape(2, 8)
    np.testing.assert_allclose(out, pooled @ p["proj"]["kernel"] + p["proj"]["bias"], rtol=1e-5, atol=1e-5)


def test_task_validates_and_refuses_to_sample(tmp_path):
    config = make_tiny_classifier_config()
    validate_config(config)
    bad = make_tiny_classifier_config()
    bad.data.num_classes = 5
    with pytest.raises(ConfigError, match="model.num_classes=10 and data.num_classes=5"):
        validate_config(bad)
    bad = make_tiny_classifier_config()
    bad.model.ch_mult = (1, 2, 2, 2, 2)  # 8x8 cannot be halved 4 times
    with pytest.raises(ConfigError, match="cannot be downsampled"):
        validate_config(bad)
    with pytest.raises(ConfigError, match="no sampler.*--classifier"):
        get_task("noisy_classifier").sampler(str(tmp_path), config, SampleOptions())


def test_tiny_classifier_trains_on_slightly_noisy_digits():
    from research.data import make_train_iterator
    from research.train import mesh as mesh_lib
    from research.train.loop import build_trainer

    config = make_tiny_classifier_config()
    # small noise at every step (abar_T ~ 0.95), so the labels are learnable within a few dozen steps
    config.diffusion.schedule, config.diffusion.beta_start, config.diffusion.beta_end = "linear", 1e-4, 1e-3
    config.model.dropout, config.optim.lr, config.optim.warmup_steps = 0.0, 3e-3, 0
    config.train.num_steps, config.train.batch_size = 30, 32
    trainer = build_trainer(config, mesh_lib.make_mesh(1, jax.devices()[:1]))
    it = make_train_iterator(config.data, global_batch_size=32, seed=0)
    state = trainer.init(jax.random.PRNGKey(0))
    first = None
    for step in range(30):
        batch = mesh_lib.global_batch(next(it), trainer.batch_sharding)
        if first is None:
            first = jax.device_get(batch)
            # The step's loss is the cross-entropy of the network on x_t drawn with the step's key, by hand.
            rng = jax.random.fold_in(state.rng, state.step)
            t_rng, noise_rng, _ = jax.random.split(rng, 3)
            t = jax.random.randint(t_rng, (32,), 0, 100)
            x_t = gaussian.q_sample(
                trainer.schedule, batch["image"], t, jax.random.normal(noise_rng, batch["image"].shape)
            )
            logits = np.asarray(trainer.model.apply({"params": state.params["net"]}, x_t, t), np.float64)
            logp = logits - logits.max(1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(1, keepdims=True))
            by_hand = -np.mean(logp[np.arange(32), np.asarray(first["label"])])
        state, metrics = trainer.step(state, batch)
        if step == 0:
            np.testing.assert_allclose(float(metrics["loss"]), by_hand, rtol=1e-4)
            losses = []
        losses.append(float(metrics["loss"]))
    assert set(metrics) == {"loss", "accuracy", "grad_norm", "lr"}
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
    assert float(metrics["accuracy"]) > 0.5, losses


def test_generator_with_a_classifier_shifts_samples_and_scale_zero_is_unguided():
    """The sampler-level wiring: scale 0 reproduces the unguided samples bit for bit; a positive scale changes them
    while spending one network evaluation per step (the classifier's gradient is not counted as NFE)."""
    import jax

    from research.sampling import Generator
    from research.shapes import build_network, init_net_params
    from tests.factories import make_tiny_classifier_config, make_tiny_config

    config = make_tiny_config()
    model = build_network(config)
    params = init_net_params(model, config, jax.random.PRNGKey(0))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    clf_config = make_tiny_classifier_config()
    clf = build_network(clf_config)
    clf_params = init_net_params(clf, clf_config, jax.random.PRNGKey(2))
    plain, _, _ = Generator(model, config, batch_size=4, steps="5").generate(params, 4, progress=False)
    zero, _, _ = Generator(model, config, batch_size=4, steps="5", classifier=(clf, clf_params, 0.0)).generate(
        params, 4, progress=False
    )
    np.testing.assert_array_equal(plain, zero)
    guided_gen = Generator(model, config, batch_size=4, steps="5", classifier=(clf, clf_params, 50.0))
    guided, labels, nfe = guided_gen.generate(params, 4, progress=False)
    assert nfe == 5 and np.abs(guided - plain).max() > 1e-4
    np.testing.assert_array_equal(labels, [0, 1, 2, 3])
