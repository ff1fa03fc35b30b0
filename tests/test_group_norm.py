"""research.models.layers.GroupNorm against torch's group_norm in float64: values, the three gradients, a large
mean that a one-pass variance would get wrong, token-shaped inputs, the compute dtype, and bad channel counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from research.models.layers import GroupNorm


def _torch_group_norm(x, scale, bias, groups, eps):
    """float64 torch group_norm of a channels-last array [B, ..., C]; returns a channels-last tensor."""
    xt = torch.from_numpy(np.asarray(x, np.float64)).movedim(-1, 1)
    out = F.group_norm(xt, groups, torch.from_numpy(scale), torch.from_numpy(bias), eps)
    return out.movedim(1, -1)


def _setup(shape, seed=0, mean=0.0):
    rng = np.random.default_rng(seed)
    x = (mean + 2.0 * rng.standard_normal(shape)).astype(np.float32)
    c = shape[-1]
    scale, bias = 1 + 0.3 * rng.standard_normal(c), 0.5 * rng.standard_normal(c)
    return x, scale, bias


def _module(scale, bias, groups, eps=1e-6, dtype=jnp.float32):
    module = GroupNorm(groups, eps, dtype=dtype)
    params = {"scale": jnp.asarray(scale, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}
    return module, params


@pytest.mark.parametrize("shape,groups", [((3, 6, 5, 64), 32), ((2, 7, 24), 8), ((2, 4, 4, 16), 32)])
def test_group_norm_forward_equals_torch(shape, groups):
    x, scale, bias = _setup(shape)
    module, params = _module(scale, bias, groups)
    ours = module.apply({"params": params}, jnp.asarray(x))
    ref = _torch_group_norm(x, scale, bias, min(groups, shape[-1]), 1e-6).numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=2e-5)


def test_group_norm_gradients_equal_torch_autograd():
    shape, groups = (2, 5, 6, 32), 8
    x, scale, bias = _setup(shape, seed=1)
    dy = np.random.default_rng(2).standard_normal(shape)
    module, params = _module(scale, bias, groups)

    def f(x, p):
        return jnp.sum(module.apply({"params": p}, x) * jnp.asarray(dy, jnp.float32))

    gx, gp = jax.grad(f, argnums=(0, 1))(jnp.asarray(x), params)

    xt = torch.from_numpy(np.asarray(x, np.float64)).requires_grad_(True)
    st, bt = (torch.from_numpy(v).requires_grad_(True) for v in (scale, bias))
    out = F.group_norm(xt.movedim(-1, 1), groups, st, bt, 1e-6).movedim(1, -1)
    (out * torch.from_numpy(dy)).sum().backward()
    np.testing.assert_allclose(np.asarray(gx), xt.grad.numpy(), rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(gp["scale"]), st.grad.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(gp["bias"]), bt.grad.numpy(), rtol=1e-5, atol=1e-4)


def test_group_norm_is_accurate_far_from_zero_mean():
    """Mean 1e3, std 2: E[x^2] - E[x]^2 in float32 loses about 6 of its 7 digits here; the two-pass form does not."""
    shape, groups = (2, 8, 8, 32), 8
    x, scale, bias = _setup(shape, seed=3, mean=1e3)
    module, params = _module(scale, bias, groups)
    ours = np.asarray(module.apply({"params": params}, jnp.asarray(x)))
    ref = _torch_group_norm(x, scale, bias, groups, 1e-6).numpy()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-4)
    # The same data through a one-pass float32 variance is far off: the check above can fail.
    xg = x.reshape(2, -1, groups, 4).astype(np.float32)
    one_pass_var = (xg * xg).mean((1, 3)) - xg.mean((1, 3)) ** 2
    assert np.abs(one_pass_var - xg.astype(np.float64).var((1, 3))).max() > 0.05


def test_group_norm_output_dtype_and_statistics_in_float32():
    shape, groups = (2, 4, 4, 64), 32
    x, scale, bias = _setup(shape, seed=4)
    module, params = _module(scale, bias, groups, dtype=jnp.bfloat16)
    out = module.apply({"params": params}, jnp.asarray(x, jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    ref = _torch_group_norm(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64), scale, bias, groups, 1e-6).numpy()
    # Only the final rounding to bfloat16 (8 significant bits) separates it from the float64 result.
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=2**-7, atol=2**-7)


def test_group_norm_rejects_indivisible_channels():
    with pytest.raises(ValueError, match="not divisible"):
        GroupNorm(32).init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 48)))
