"""Gradient accumulation and float16 dynamic loss scaling (research/train/grads.py): accumulated gradients equal the
whole batch's, a loss-scaled step equals the unscaled one, a step with non-finite gradients is skipped and the run
recovers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.config import ConfigError, apply_overrides
from research.shapes import build_network
from research.tasks import validate_config
from research.train import grads as grads_lib
from research.train import mesh as mesh_lib
from research.train.loop import build_trainer


def _regression():
    """A per-example squared error of a two-layer model: a mean over examples, deterministic (rng unused)."""
    rng = np.random.default_rng(0)
    params = {"w1": jnp.asarray(rng.normal(size=(5, 7)), jnp.float32), "w2": jnp.asarray(rng.normal(size=(7,)))}
    batch = {"x": jnp.asarray(rng.normal(size=(12, 5)), jnp.float32), "y": jnp.asarray(rng.normal(size=(12,)))}

    def loss_fn(p, b, key, offset):
        pred = jnp.tanh(b["x"] @ p["w1"]) @ p["w2"] + offset
        per_example = (pred - b["y"]) ** 2
        return per_example.mean(), {"per_example": per_example, "mean_pred": pred.mean()}

    return loss_fn, params, batch


@pytest.mark.parametrize("k", [2, 3, 4])
def test_accumulated_gradients_equal_the_whole_batch(k):
    loss_fn, params, batch = _regression()
    key = jax.random.PRNGKey(0)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key, 0.5)
    (loss_k, aux_k), grads_k = jax.jit(lambda p, b: grads_lib.value_and_grad(loss_fn, p, b, key, 0.5, microbatches=k))(
        params, batch
    )
    np.testing.assert_allclose(loss_k, loss, rtol=1e-5)
    np.testing.assert_allclose(aux_k["per_example"], aux["per_example"], rtol=1e-5, atol=1e-6)  # back in batch order
    np.testing.assert_allclose(aux_k["mean_pred"], aux["mean_pred"], rtol=1e-5, atol=1e-6)
    for name in params:
        np.testing.assert_allclose(grads_k[name], grads[name], rtol=1e-5, atol=1e-6)


def test_accumulation_rejects_a_batch_it_cannot_split():
    loss_fn, params, batch = _regression()
    with pytest.raises(ValueError, match="does not divide the batch's 12 rows"):
        grads_lib.value_and_grad(loss_fn, params, batch, jax.random.PRNGKey(0), 0.0, microbatches=5)


def test_loss_scaled_gradients_equal_unscaled_ones():
    loss_fn, params, batch = _regression()
    key = jax.random.PRNGKey(0)
    (loss, _), grads = grads_lib.value_and_grad(loss_fn, params, batch, key, 0.0)
    scale = grads_lib.init_loss_scale(2.0**12)
    (loss_s, _), grads_s = grads_lib.value_and_grad(loss_fn, params, batch, key, 0.0, loss_scale=scale)
    assert float(loss_s) == float(loss)  # the reported loss is unscaled
    for name in params:  # a power-of-two scale is exact in float32
        np.testing.assert_array_equal(grads_s[name], grads[name])


def test_loss_scale_halves_on_overflow_and_doubles_after_a_period():
    s = grads_lib.init_loss_scale(8.0, period=3)
    s = s.adjust(jnp.asarray(False))
    assert (float(s.scale), int(s.good_steps)) == (4.0, 0)
    for expected in (1, 2):
        s = s.adjust(jnp.asarray(True))
        assert (float(s.scale), int(s.good_steps)) == (4.0, expected)
    s = s.adjust(jnp.asarray(True))  # the third finite step in a row
    assert (float(s.scale), int(s.good_steps)) == (8.0, 0)
    low = grads_lib.init_loss_scale(1.0).adjust(jnp.asarray(False))
    assert float(low.scale) == 1.0  # never below 1


def _one_level(config, *overrides):
    """The tiny U-Net cut to one level (with its attention block), to keep the compiles short."""
    return apply_overrides(
        config, [("model.ch_mult", "(1,)"), ("model.attn_resolutions", "(8,)"), ("model.dropout", "0.0"), *overrides]
    )


def test_diffusion_step_accumulates_microbatches(tiny_config):
    """The compiled step with grad_accum=2 takes the mean gradient of rows 0,2,4,... and 1,3,5,... drawn with
    fold_in(key, i), then one optimizer update: checked against those two gradients computed by hand."""
    import optax

    from research.tasks.diffusion import make_loss_fn
    from research.train.state import apply_gradients, ema_decay_at, make_optimizer

    cfg = _one_level(tiny_config, ("train.grad_accum", "2"))
    trainer = build_trainer(cfg, mesh_lib.make_mesh(1, jax.devices()[:1]))
    state = trainer.init(jax.random.PRNGKey(0))
    batch = {
        "image": jax.random.uniform(jax.random.PRNGKey(1), (16, 8, 8, 1), minval=-1, maxval=1),
        "label": jnp.arange(16) % 10,
    }
    state0 = jax.device_get(state)
    new_state, metrics = trainer.step(state, batch)

    loss_fn = make_loss_fn(trainer.model, trainer.schedule, cfg)
    rng = jax.random.fold_in(state0.rng, state0.step)
    halves = [jax.tree.map(lambda x, i=i: x[i::2], batch) for i in range(2)]
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    outs = [grad_fn(state0.params["net"], h, jax.random.fold_in(rng, i), None) for i, h in enumerate(halves)]
    grads = jax.tree.map(lambda a, b: (a + b) / 2, outs[0][1], outs[1][1])
    np.testing.assert_allclose(metrics["loss"], (outs[0][0][0] + outs[1][0][0]) / 2, rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], optax.global_norm(grads), rtol=1e-5)
    ref = apply_gradients(
        state0,
        {"net": grads},
        {"net": make_optimizer(cfg.optim, cfg.train.num_steps)},
        ema_decay_at(state0.step, cfg.train.ema_decay, cfg.train.ema_warmup),
        keep_extra=False,
        extra=None,
    )
    for a, b in zip(jax.tree.leaves(jax.device_get(new_state.params)), jax.tree.leaves(ref.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_float16_run_skips_a_step_with_non_finite_gradients_and_recovers(tiny_config):
    cfg = _one_level(tiny_config, ("model.dtype", "float16"))
    trainer = build_trainer(cfg, mesh_lib.make_mesh(1, jax.devices()[:1]))
    state = trainer.init(jax.random.PRNGKey(0))
    assert float(state.loss_scale.scale) == grads_lib.INITIAL_LOSS_SCALE
    good = {
        "image": jax.random.uniform(jax.random.PRNGKey(1), (16, 8, 8, 1), minval=-1, maxval=1),
        "label": jnp.arange(16) % 10,
    }
    bad = dict(good, image=good["image"].at[3, 2, 2, 0].set(jnp.inf))
    before = jax.device_get(state)
    state, metrics = trainer.step(state, bad)
    after = jax.device_get(state)
    assert not np.isfinite(float(metrics["loss"]))
    assert int(after.step) == 1  # the counter advances
    assert float(after.loss_scale.scale) == grads_lib.INITIAL_LOSS_SCALE / 2
    for tree in ("params", "ema_params", "opt_state"):
        for a, b in zip(jax.tree.leaves(getattr(before, tree)), jax.tree.leaves(getattr(after, tree))):
            np.testing.assert_array_equal(a, b)
    losses = []
    for _ in range(3):
        state, metrics = trainer.step(state, good)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    assert int(jax.device_get(state.loss_scale.good_steps)) == 3
    moved = [
        np.abs(a - b).max()
        for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(before.params))
    ]
    assert max(moved) > 0  # the finite steps were taken
    # The float16 network's loss agrees with the float32 network's on the same parameters (float16 tolerance).
    from research.tasks.diffusion import make_loss_fn

    key = jax.random.PRNGKey(5)
    losses = {}
    for dtype in ("float16", "float32"):
        c = apply_overrides(cfg, [("model.dtype", dtype)])
        model = build_network(c)
        loss_fn = jax.jit(make_loss_fn(model, trainer.schedule, c))
        losses[dtype] = float(loss_fn(before.params["net"], good, key, None)[0])
    np.testing.assert_allclose(losses["float16"], losses["float32"], rtol=1e-2)


def test_gradient_options_are_checked_before_compiling(tiny_config):
    with pytest.raises(ConfigError, match="train.grad_accum=3 must divide train.batch_size=16"):
        validate_config(apply_overrides(tiny_config, [("train.grad_accum", "3")]))
    with pytest.raises(ConfigError, match="train.loss_scale='sometimes' is not valid"):
        validate_config(apply_overrides(tiny_config, [("train.loss_scale", "sometimes")]))
    from tests.factories import make_tiny_vae_config

    with pytest.raises(ConfigError, match="task 'autoencoder' does not support it"):
        validate_config(apply_overrides(make_tiny_vae_config(), [("train.grad_accum", "2")]))
    validate_config(apply_overrides(tiny_config, [("train.grad_accum", "4"), ("model.dtype", "float16")]))


@pytest.mark.slow
def test_bfloat16_training_reaches_the_float32_loss(tiny_config, tmp_path):
    """The tiny U-Net trained 400 steps on digits in bfloat16 and in float32 compute (same seed, data, t and noise):
    the mean loss of the last 100 steps agrees within 2%. (The MNIST U-Net's figures: README "Scale".)"""
    import json

    from research.train.loop import train

    means = {}
    for dtype in ("float32", "bfloat16"):
        cfg = apply_overrides(
            tiny_config,
            [
                ("model.dtype", dtype),
                ("train.num_steps", "400"),
                ("train.ckpt_every", "400"),
                ("optim.warmup_steps", "20"),
            ],
        )
        train(cfg, str(tmp_path / dtype))
        with open(tmp_path / dtype / "metrics.jsonl") as f:
            losses = [json.loads(line)["loss"] for line in f]
        assert len(losses) == 400
        means[dtype] = float(np.mean(losses[-100:]))
    assert abs(means["bfloat16"] / means["float32"] - 1) < 0.02, means
