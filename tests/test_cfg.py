"""Classifier-free guidance through the task and the sampler: condition dropout at the configured rate, guidance
scale 1 equal to the conditional model, guided sampling one batched forward per step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.config import apply_overrides
from research.sampling import Generator, schedule_from_config
from research.shapes import build_network, init_net_params
from research.tasks import validate_config
from research.tasks.diffusion import make_loss_fn
from tests.factories import make_tiny_config


def _conditional_config(**overrides):
    c = make_tiny_config()
    c.model.num_classes = 10
    c.model.null_label = True
    c.diffusion.cond_drop_prob = 0.3
    return apply_overrides(c, list(overrides.items()))


class _Recorder:
    """Stands in for the network: records the labels it is given and returns zeros."""

    def __init__(self):
        self.labels = None

    def apply(self, variables, x, t, cond, train=False, rngs=None):
        self.labels = cond.label
        return jnp.zeros_like(x)


def test_condition_dropout_rate_equals_the_config():
    config = _conditional_config()
    recorder = _Recorder()
    loss_fn = make_loss_fn(recorder, schedule_from_config(config.diffusion), config)
    n = 20_000
    labels = jnp.asarray(np.arange(n) % 10, jnp.int32)
    batch = {"image": jnp.zeros((n, 8, 8, 1)), "label": labels}
    loss_fn({}, batch, jax.random.PRNGKey(3), None)
    dropped = np.asarray(recorder.labels) == 10
    # Binomial(n, 0.3): 3 sigma is 0.0097; kept labels are untouched.
    assert abs(dropped.mean() - 0.3) < 3 * np.sqrt(0.3 * 0.7 / n)
    np.testing.assert_array_equal(np.asarray(recorder.labels)[~dropped], np.asarray(labels)[~dropped])
    # probability 0 leaves every label as it is
    config0 = _conditional_config(**{"diffusion.cond_drop_prob": "0.0"})
    loss0 = make_loss_fn(recorder, schedule_from_config(config0.diffusion), config0)
    loss0({}, batch, jax.random.PRNGKey(3), None)
    np.testing.assert_array_equal(np.asarray(recorder.labels), np.asarray(labels))


def test_dropout_needs_a_null_label_and_a_conditional_model():
    from research.config import ConfigError

    with pytest.raises(ConfigError, match="model.null_label=True"):
        validate_config(_conditional_config(**{"model.null_label": "false"}))
    with pytest.raises(ConfigError, match="model.num_classes"):
        validate_config(_conditional_config(**{"model.num_classes": "0", "model.null_label": "false"}))
    validate_config(_conditional_config())


@pytest.fixture(scope="module")
def conditional_model():
    config = _conditional_config(**{"sample.steps": "4"})
    model = build_network(config)
    params = init_net_params(model, config, jax.random.PRNGKey(0))
    # the output layer starts at zero: perturb every weight so the network depends on its label
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    return config, model, params


def test_guidance_scale_one_is_the_conditional_model_and_scales_differ(conditional_model):
    config, model, params = conditional_model
    plain = Generator(model, config, batch_size=4).generate(params, 4, seed=0, progress=False)
    one = Generator(model, config, batch_size=4, guidance=1.0).generate(params, 4, seed=0, progress=False)
    np.testing.assert_array_equal(plain[0], one[0])
    guided = Generator(model, config, batch_size=4, guidance=3.0)
    samples, labels, nfe = guided.generate(params, 4, seed=0, progress=False)
    assert nfe == 4  # one batched forward (conditional + unconditional) per step
    assert np.abs(samples - plain[0]).max() > 1e-3
    np.testing.assert_array_equal(labels, [0, 1, 2, 3])


def test_guidance_is_refused_for_a_model_without_a_null_label():
    config = make_tiny_config()
    model = build_network(config)
    with pytest.raises(ValueError, match="needs a class-conditional model trained with condition dropout"):
        Generator(model, config, batch_size=2, guidance=2.0)
