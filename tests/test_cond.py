"""research.cond: the Cond pytree, its helpers, classifier-free guidance's condition dropout, and the models'
rejection of conditions they do not use."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.cond import Cond, as_cond, check_supported, drop_condition, fields_set, null_cond_like
from research.models.dit import DiT
from research.models.unet import UNet


def _full_cond(b=4, length=6, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((b, length), bool)
    mask[:, 4:] = False
    return Cond(
        label=jnp.arange(b, dtype=jnp.int32) % 3,
        text=jnp.asarray(rng.standard_normal((b, length, dim)), jnp.float32),
        text_mask=jnp.asarray(mask),
        pooled_text=jnp.asarray(rng.standard_normal((b, dim)), jnp.float32),
        hint=jnp.ones((b, 8, 8, 3)),
        residuals={"down": (jnp.ones((b, 8, 8, 2)), jnp.ones((b, 4, 4, 2))), "mid": jnp.ones((b, 4, 4, 2))},
    )


# --- the pytree ---------------------------------------------------------------------------------------------


def test_cond_is_a_pytree():
    cond = _full_cond()
    leaves = jax.tree_util.tree_leaves(cond)
    # label, text, text_mask, pooled_text, hint, then the residuals dict: 'down' (2 arrays) before 'mid'.
    assert len(leaves) == 8
    np.testing.assert_array_equal(leaves[0], cond.label)
    assert leaves[5] is cond.residuals["down"][0] and leaves[7] is cond.residuals["mid"]
    # None fields are no leaves: a label-only Cond has exactly one.
    assert len(jax.tree_util.tree_leaves(Cond(label=jnp.zeros(3, jnp.int32)))) == 1

    out = jax.jit(lambda c: jax.tree.map(lambda a: a * 2, c))(cond)
    assert isinstance(out, Cond) and out.hint is not None
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, 2 * b), out, cond)

    # Through lax.scan as a constant closed over and as part of the carry.
    def body(carry, _):
        return carry.replace(label=carry.label + 1), carry.label.sum()

    final, sums = jax.lax.scan(body, cond, None, length=3)
    np.testing.assert_array_equal(final.label, cond.label + 3)
    np.testing.assert_array_equal(sums, [3, 7, 11])


def test_helpers():
    y = jnp.array([1, 2], jnp.int32)
    assert fields_set(Cond.from_label(y)) == ("label",)
    assert fields_set(_full_cond()) == ("label", "text", "text_mask", "pooled_text", "hint", "residuals")
    assert fields_set(None) == () and fields_set(Cond()) == ()

    assert as_cond(None) is None
    cond = Cond(label=y)
    assert as_cond(cond) is cond
    np.testing.assert_array_equal(as_cond(y).label, y)
    np.testing.assert_array_equal(as_cond(np.array([3, 4])).label, [3, 4])
    # Also inside a trace (the models call it on their traced argument).
    np.testing.assert_array_equal(jax.jit(lambda y: as_cond(y).label + 1)(y), [2, 3])
    with pytest.raises(TypeError, match="integer label array; got .*float32"):
        as_cond(jnp.zeros(2))
    with pytest.raises(TypeError, match="got str"):
        as_cond("cat")


def test_check_supported_messages():
    check_supported(None, ("label",), "DiT")
    check_supported(Cond(label=jnp.zeros(2, jnp.int32)), ("label",), "DiT")
    with pytest.raises(ValueError) as err:
        check_supported(Cond(label=jnp.zeros(2, jnp.int32), text=jnp.zeros((2, 3, 4))), ("label",), "DiT")
    assert str(err.value) == (
        "DiT does not use cond.text (it supports: label); remove it or use a model that takes text"
    )
    with pytest.raises(
        ValueError,
        match=r"^UNet does not use cond.hint \(it supports: label, residuals\); remove it "
        r"or use a model that takes a control image \(hint\)$",
    ):
        check_supported(Cond(hint=jnp.zeros((2, 4, 4, 3))), ("label", "residuals"), "UNet")


# --- condition dropout ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("prob", [0.1, 0.5])
def test_drop_condition_statistics_and_shared_draw(prob):
    n, null = 10_000, 7
    cond = _full_cond(b=n)
    out = jax.jit(lambda c, k: drop_condition(c, k, prob, null_label=null))(cond, jax.random.PRNGKey(0))
    assert jax.tree.map(jnp.shape, out) == jax.tree.map(jnp.shape, cond)
    dropped = np.asarray(out.label == null)
    sigma = np.sqrt(prob * (1 - prob) / n)
    assert abs(dropped.mean() - prob) < 3 * sigma, dropped.mean()
    # One draw per example shared by all fields: a dropped example loses label, text and pooled text together.
    text_zero = np.all(np.asarray(out.text) == 0, axis=(1, 2))
    pooled_zero = np.all(np.asarray(out.pooled_text) == 0, axis=1)
    np.testing.assert_array_equal(text_zero, dropped)
    np.testing.assert_array_equal(pooled_zero, dropped)
    first_only = np.zeros(6, bool)
    first_only[0] = True
    np.testing.assert_array_equal(np.asarray(out.text_mask)[dropped], np.broadcast_to(first_only, (dropped.sum(), 6)))
    # Kept examples are untouched.
    for name in ("label", "text", "text_mask", "pooled_text"):
        np.testing.assert_array_equal(
            np.asarray(getattr(out, name))[~dropped], np.asarray(getattr(cond, name))[~dropped]
        )
    # hint and residuals pass through.
    assert out.hint.shape == cond.hint.shape and np.all(np.asarray(out.hint) == 1)
    jax.tree.map(np.testing.assert_array_equal, out.residuals, cond.residuals)
    # A different key gives a different draw.
    other = drop_condition(cond, jax.random.PRNGKey(1), prob, null_label=null)
    assert np.any(np.asarray(other.label == null) != dropped)


def test_drop_condition_edge_cases():
    cond = _full_cond()
    key = jax.random.PRNGKey(0)
    assert drop_condition(cond, key, 0.0) is cond  # no null_label needed when nothing can be dropped
    assert drop_condition(None, key, 0.5) is None
    hint_only = Cond(hint=jnp.ones((2, 4, 4, 3)))
    assert drop_condition(hint_only, key, 1.0) is hint_only

    everything = drop_condition(cond, key, 1.0, null_label=3)
    np.testing.assert_array_equal(everything.label, 3)
    np.testing.assert_array_equal(everything.text, 0.0)
    np.testing.assert_array_equal(everything.text_mask, np.arange(6)[None].repeat(4, 0) == 0)
    np.testing.assert_array_equal(everything.pooled_text, 0.0)
    # null_cond_like is the same thing without a key.
    jax.tree.map(np.testing.assert_array_equal, null_cond_like(cond, null_label=3), everything)

    # Given null embeddings (the encoder's empty prompt) are broadcast; the mask defaults to all tokens.
    null_text = jnp.full((6, 8), 0.5)
    null_pooled = jnp.full((8,), -1.0)
    given = null_cond_like(cond, null_label=3, null_text=null_text, null_pooled=null_pooled)
    np.testing.assert_array_equal(given.text, np.broadcast_to(null_text, (4, 6, 8)))
    np.testing.assert_array_equal(given.text_mask, True)
    np.testing.assert_array_equal(given.pooled_text, np.broadcast_to(null_pooled, (4, 8)))
    with_mask = null_cond_like(cond, null_label=3, null_text=null_text, null_text_mask=np.arange(6) < 2)
    np.testing.assert_array_equal(with_mask.text_mask, np.broadcast_to(np.arange(6) < 2, (4, 6)))

    # Text without a mask gets one: all True where kept.
    no_mask = Cond(text=jnp.ones((4, 6, 8)))
    half = drop_condition(no_mask, key, 0.5)
    kept = np.asarray(half.text[:, 0, 0] == 1)
    assert 0 < kept.sum() < 4
    np.testing.assert_array_equal(np.asarray(half.text_mask)[kept], True)

    with pytest.raises(ValueError, match="null_label"):
        drop_condition(cond, key, 0.1)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        drop_condition(cond, key, 1.5, null_label=3)
    with pytest.raises(ValueError, match=r"null_text has shape \(5, 8\)"):
        null_cond_like(cond, null_label=3, null_text=jnp.zeros((5, 8)))
    with pytest.raises(ValueError, match="different batch sizes"):
        drop_condition(Cond(label=jnp.zeros(3, jnp.int32), pooled_text=jnp.zeros((4, 2))), key, 0.5, null_label=0)


# --- models reject what they do not use ------------------------------------------------------------------------


def test_models_reject_unsupported_fields():
    x, t = jnp.zeros((2, 8, 8, 4)), jnp.zeros((2,), jnp.int32)
    y = jnp.array([0, 1], jnp.int32)
    dit = DiT(out_channels=4, variant="", depth=1, hidden_size=32, num_heads=2, patch_size=2, num_classes=10)
    unet = UNet(
        out_channels=4, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), norm_groups=4, num_classes=10
    )
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match=r"DiT does not use cond.hint \(it supports: label\)"):
        dit.init(key, x, t, Cond(label=y, hint=jnp.zeros((2, 8, 8, 3))))
    with pytest.raises(ValueError, match=r"DiT does not use cond.residuals"):
        dit.init(key, x, t, Cond(label=y, residuals={"mid": jnp.zeros((2, 4, 4, 32))}))
    with pytest.raises(ValueError, match=r"UNet does not use cond.text \(it supports: label, residuals\)"):
        unet.init(key, x, t, Cond(label=y, text=jnp.zeros((2, 3, 8))))
    with pytest.raises(ValueError, match=r"UNet does not use cond.pooled_text"):
        unet.init(key, x, t, Cond(label=y, pooled_text=jnp.zeros((2, 8))))
    for model in (dit, unet):
        with pytest.raises(ValueError, match="class-conditional .* no labels were given"):
            model.init(key, x, t, None)
    # The supported forms initialise.
    assert "label_embed" in dit.init(key, x, t, Cond(label=y))["params"]
    assert unet.init(key, x, t, y)["params"]["label_embed"]["embedding"].shape == (10, 64)
