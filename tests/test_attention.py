"""research.models.layers.attention and CrossAttention against independent references: a float64 numpy softmax,
torch's scaled_dot_product_attention, and diffusers' cross-attention with the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from research.models.layers import CrossAttention, attention


def naive_attention(q, k, v, mask=None):
    """float64 numpy softmax(q k^T / sqrt(d)) v; q [B, Nq, h, d], k, v [B, Nk, h, d], mask -> [B, h, Nq, Nk]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        logits = np.where(np.broadcast_to(mask, logits.shape), logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


def _qkv(seed=0, b=2, nq=5, nk=7, heads=3, d=8, scale=1.0):
    rng = np.random.default_rng(seed)
    return [
        scale * rng.standard_normal(s).astype(np.float32)
        for s in ((b, nq, heads, d), (b, nk, heads, d), (b, nk, heads, d))
    ]


def _random_mask(seed, shape):
    mask = np.random.default_rng(seed).random(shape) < 0.6
    mask[..., 0] = True  # every query keeps at least one key
    return mask


def test_attention_equals_naive_softmax_and_torch_sdpa():
    q, k, v = _qkv(scale=2.0)  # logits of several units: the softmax is far from uniform
    for mask in (None, _random_mask(1, (2, 3, 5, 7))):
        ours = np.asarray(jax.jit(lambda q, k, v, m: attention(q, k, v, mask=m))(q, k, v, mask))
        np.testing.assert_allclose(ours, naive_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)
        # torch is head-major: [B, heads, N, d]; a bool attn_mask is True where attention is allowed.
        tq, tk, tv = (torch.from_numpy(a).permute(0, 2, 1, 3) for a in (q, k, v))
        ref = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=None if mask is None else torch.from_numpy(mask))
        np.testing.assert_allclose(ours, ref.permute(0, 2, 1, 3).numpy(), rtol=1e-5, atol=1e-5)
    # The mask matters: without it the result is different.
    assert np.abs(naive_attention(q, k, v, mask) - naive_attention(q, k, v)).max() > 0.1


def test_attention_mask_broadcasting_and_key_padding():
    q, k, v = _qkv(seed=2)
    valid = np.array([[True] * 4 + [False] * 3, [True] * 7])  # example 0 has 4 real keys
    full = attention(q, k, v, mask=np.broadcast_to(valid[:, None, None, :], (2, 3, 5, 7)))
    for short in (valid[:, None, None, :], jnp.asarray(valid)[:, None, None, :]):
        np.testing.assert_array_equal(attention(q, k, v, mask=short), full)
    # Key padding is the same as removing the padded keys.
    trimmed = attention(q[:1], k[:1, :4], v[:1, :4])
    np.testing.assert_allclose(full[:1], trimmed, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(full[1:], attention(q[1:], k[1:], v[1:]), rtol=1e-6, atol=1e-6)
    # A [Nq, Nk] mask applies to every example and head.
    m2 = _random_mask(3, (5, 7))
    np.testing.assert_allclose(attention(q, k, v, mask=m2), naive_attention(q, k, v, m2), rtol=1e-5, atol=1e-5)


def test_attention_bfloat16_softmax_is_float32():
    q, k, v = _qkv(seed=4, nq=64, nk=64, d=64, scale=3.0)  # large logits, sharp softmax
    q16, k16, v16 = (jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))
    out = attention(q16, k16, v16)
    assert out.dtype == jnp.bfloat16
    # Reference on the same bf16-rounded inputs in float64: only the final rounding to bf16 should remain.
    ref = naive_attention(*(np.asarray(a.astype(jnp.float32)) for a in (q16, k16, v16)))
    err = np.abs(np.asarray(out.astype(jnp.float32)) - ref).max()
    assert err < 1e-2 * np.abs(ref).max(), err
    # An all-bf16 pipeline (bf16 logits and softmax) is measurably worse, so the check above has teeth.
    logits = jnp.einsum("bqhd,bkhd->bhqk", q16, k16) * jnp.bfloat16(1 / 8)
    w16 = jax.nn.softmax(logits, axis=-1)
    crude = np.asarray(jnp.einsum("bhqk,bkhd->bqhd", w16, v16).astype(jnp.float32))
    assert np.abs(crude - ref).max() > 2 * err
    # dtype= casts float32 inputs to the compute dtype.
    assert attention(q, k, v, dtype=jnp.bfloat16).dtype == jnp.bfloat16


# --- CrossAttention ----------------------------------------------------------------------------------------

B, N, C, L, D, HEADS, HEAD_DIM = 2, 6, 16, 5, 12, 2, 4


@pytest.fixture(scope="module")
def cross():
    module = CrossAttention(num_heads=HEADS, head_dim=HEAD_DIM)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, N, C)).astype(np.float32)
    context = rng.standard_normal((B, L, D)).astype(np.float32)
    mask = np.array([[True, True, True, False, False], [True] * L])
    params = module.init(jax.random.PRNGKey(0), x, context, mask)["params"]
    # to_out starts at zero (a residual branch starting as the identity); randomise it so outputs are non-trivial.
    params = dict(params)
    params["to_out"] = {
        "kernel": jnp.asarray(0.3 * rng.standard_normal((HEADS * HEAD_DIM, C)), jnp.float32),
        "bias": jnp.asarray(0.1 * rng.standard_normal(C), jnp.float32),
    }
    forward = jax.jit(lambda p, x, c, m: module.apply({"params": p}, x, c, m))
    return module, params, x, context, mask, forward


def test_cross_attention_parameters_and_init(cross):
    module, params, x, context, mask, _ = cross
    shapes = {name: {k: v.shape for k, v in p.items()} for name, p in params.items()}
    inner = HEADS * HEAD_DIM
    assert shapes == {
        "to_q": {"kernel": (C, inner)},
        "to_k": {"kernel": (D, inner)},
        "to_v": {"kernel": (D, inner)},
        "to_out": {"kernel": (inner, C), "bias": (C,)},
    }
    fresh = module.init(jax.random.PRNGKey(1), x, context, mask)
    np.testing.assert_array_equal(module.apply(fresh, x, context, mask), 0.0)


def test_cross_attention_equals_numpy_from_its_parameters(cross):
    _, params, x, context, mask, forward = cross
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    q = (x @ p["to_q"]["kernel"]).reshape(B, N, HEADS, HEAD_DIM)
    k = (context @ p["to_k"]["kernel"]).reshape(B, L, HEADS, HEAD_DIM)
    v = (context @ p["to_v"]["kernel"]).reshape(B, L, HEADS, HEAD_DIM)
    expected = np.zeros((B, N, C))
    for b in range(B):
        for h in range(HEADS):
            logits = q[b, :, h] @ k[b, :, h].T / np.sqrt(HEAD_DIM)  # [N, L]
            logits[:, ~mask[b]] = -np.inf
            w = np.exp(logits - logits.max(1, keepdims=True))
            w /= w.sum(1, keepdims=True)
            head_out = w @ v[b, :, h]  # [N, head_dim]
            expected[b] += head_out @ p["to_out"]["kernel"][h * HEAD_DIM : (h + 1) * HEAD_DIM]
    expected += p["to_out"]["bias"]
    out = np.asarray(forward(params, x, context, mask))
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # [B, H, W, C] input is flattened to tokens and restored.
    grid = np.asarray(forward(params, x.reshape(B, 2, 3, C), context, mask))
    np.testing.assert_allclose(grid.reshape(B, N, C), out, rtol=1e-6, atol=1e-6)


def test_cross_attention_ignores_padded_context(cross):
    _, params, x, context, mask, forward = cross
    out = forward(params, x, context, mask)
    scrambled = context.copy()
    scrambled[0, 3:] = 100.0 * np.random.default_rng(1).standard_normal((2, D))  # example 0's padding
    np.testing.assert_array_equal(forward(params, x, scrambled, mask), out)
    # ...while a real token, or the same padding without the mask, does change the output.
    changed = context.copy()
    changed[0, 1] += 1.0
    assert float(jnp.abs(forward(params, x, changed, mask) - out)[0].max()) > 1e-3
    assert float(jnp.abs(forward(params, x, scrambled, None) - forward(params, x, context, None))[0].max()) > 1e-3
    with pytest.raises(ValueError, match=r"mask has shape \(2, 4\); it must be \[B, L\]"):
        forward(params, x, context, mask[:, :4])


def test_cross_attention_matches_diffusers_attention(cross):
    from diffusers.models.attention_processor import Attention

    _, params, x, context, mask, forward = cross
    theirs = Attention(
        query_dim=C, cross_attention_dim=D, heads=HEADS, dim_head=HEAD_DIM, bias=False, out_bias=True
    ).eval()
    with torch.no_grad():
        for name in ("to_q", "to_k", "to_v"):
            getattr(theirs, name).weight.copy_(torch.from_numpy(np.asarray(params[name]["kernel"]).T))
        theirs.to_out[0].weight.copy_(torch.from_numpy(np.asarray(params["to_out"]["kernel"]).T))
        theirs.to_out[0].bias.copy_(torch.from_numpy(np.asarray(params["to_out"]["bias"])))
        # diffusers takes an additive key mask [B, 1, L] (UNet2DConditionModel builds it as (1 - mask) * -10000).
        bias = torch.from_numpy((~mask).astype(np.float32) * -10000.0)[:, None, :]
        ref = theirs(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(context), attention_mask=bias)
    np.testing.assert_allclose(np.asarray(forward(params, x, context, mask)), ref.numpy(), rtol=1e-5, atol=1e-5)


def test_fused_attention_is_chosen_only_where_cudnn_takes_it():
    from research.models.layers import attention_implementation

    assert attention_implementation(jnp.bfloat16, 64, "gpu") == "cudnn"
    assert attention_implementation(jnp.float16, 128, "cuda") == "cudnn"
    assert attention_implementation(jnp.float32, 64, "gpu") == "xla"  # no fused float32 kernel
    assert attention_implementation(jnp.bfloat16, 160, "gpu") == "xla"  # head too large
    assert attention_implementation(jnp.bfloat16, 36, "gpu") == "xla"  # not a multiple of 8
    assert attention_implementation(jnp.bfloat16, 64, "gpu", masked=True) == "xla"  # padding masks: XLA
    assert attention_implementation(jnp.bfloat16, 64, "cpu") == "xla"
    assert attention_implementation(jnp.bfloat16, 64, "tpu") == "xla"


def test_float16_attention_on_cpu_matches_float32():
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 5, 2, 8)) for i in range(3))
    out16 = attention(q, k, v, dtype=jnp.float16)
    assert out16.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(out16, np.float32), attention(q, k, v), atol=3e-3)
