"""Per-block rematerialisation (model.remat): each policy gives the gradients of no remat with the same parameter
tree (U-Net, Stable Diffusion's U-Net, DiT), and the recomputation survives XLA's optimisations.

The memory saving itself is not measurable from a CPU compile: the recomputation is in the CPU program (the test
below), yet its compiled temporary memory barely moves (710 vs 700 MB for a 6-block DiT at batch 16).
experiments/dit_memory.py reports the activations the backward pass keeps (backend-independent), and
experiments/accelerator_check.py the compiled peak on a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.cond import Cond
from research.models.cond_unet import CondUNet
from research.models.dit import DiT
from research.models.layers import REMAT_POLICIES, remat_policy_name
from research.models.unet import UNet

UNET = dict(out_channels=3, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), norm_groups=8, dropout=0.1)
COND_UNET = dict(
    out_channels=4,
    block_out_channels=(8, 16),
    cross_attention_levels=(True, False),
    cross_attention_dim=6,
    norm_num_groups=4,
    attention_head_dim=2,
    dropout=0.1,
)
DIT = dict(out_channels=8, variant="", depth=2, hidden_size=32, num_heads=2, patch_size=2, num_classes=0)


def _case(kind):
    size = 16 if kind == "dit" else 8
    x = jax.random.normal(jax.random.PRNGKey(0), (2, size, size, 4 if kind != "unet" else 3))
    t = jnp.array([3, 70])
    if kind == "unet":
        return UNet, UNET, x, t, None
    if kind == "cond_unet":
        return CondUNet, COND_UNET, x, t, Cond(text=jax.random.normal(jax.random.PRNGKey(1), (2, 5, 6)))
    return DiT, DIT, x, t, None


def _grads(cls, fields, x, t, cond, policy):
    model = cls(**fields, remat=policy)
    params = jax.jit(model.init)(jax.random.PRNGKey(2), x, t, cond)["params"]
    # Random (not zero-initialised) output layers, so every block's gradient is non-trivial.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])

    def loss(p):
        out = model.apply({"params": p}, x, t, cond, train=True, rngs={"dropout": jax.random.PRNGKey(4)})
        return jnp.mean(out**2)

    return params, jax.jit(jax.grad(loss))(params)


def _count_remat(cls, fields, x, t, cond, policy) -> int:
    model = cls(**fields, remat=policy)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, t, cond))["params"]
    loss = lambda p: jnp.mean(model.apply({"params": p}, x, t, cond) ** 2)  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.grad(loss))(params)
    return sum("remat" in eqn.primitive.name for eqn in jaxpr.jaxpr.eqns)


# unet: 5 ResBlocks + 2 attention blocks in the encoder and middle, 4 + 1 in the decoder; cond_unet: 9 ResBlocks
# and 4 SpatialTransformers in the encoder and middle... counted from the architectures: 12 and 18 blocks.
@pytest.mark.parametrize("kind,blocks", [("unet", 12), ("cond_unet", 18)])
def test_unets_checkpoint_every_block_with_the_same_parameters(kind, blocks):
    """Every ResBlock / attention block / SpatialTransformer is one checkpointed call (traced, not compiled: a
    U-Net gradient takes ~25 s to compile on 2 cores; the block-level gradients are compared below)."""
    cls, fields, x, t, cond = _case(kind)
    trees = {}
    for policy in REMAT_POLICIES:
        model = cls(**fields, remat=policy)
        trees[policy] = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, t, cond))["params"]
        assert _count_remat(cls, fields, x, t, cond, policy) == (0 if policy == "none" else blocks)
    assert jax.tree.structure(trees["full"]) == jax.tree.structure(trees["none"]) == jax.tree.structure(trees["dots"])


def test_checkpointed_blocks_give_the_same_gradients():
    from research.models.cond_unet import SpatialTransformer
    from research.models.layers import ResBlock, checkpointed

    h = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 8))
    emb = jax.random.normal(jax.random.PRNGKey(1), (2, 32))
    context = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 6))
    cases = [
        (ResBlock, dict(out_channels=16, dropout=0.1, norm_groups=4), (h, emb, True), (3,), "full"),
        (
            SpatialTransformer,
            dict(num_heads=2, num_layers=1, norm_groups=4, dropout=0.1),
            (h, context, None, True),
            (4,),
            "dots",
        ),
    ]
    for cls, kwargs, args, static, other in cases:  # one policy per block (each compile costs seconds)
        ref = None
        for policy in ("none", other):
            block = checkpointed(cls, policy, static_argnums=static)(**kwargs)
            params = block.init({"params": jax.random.PRNGKey(3), "dropout": jax.random.PRNGKey(4)}, *args)["params"]
            leaves, tree = jax.tree.flatten(params)
            keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
            params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])

            def loss(p, block=block):
                return jnp.mean(block.apply({"params": p}, *args, rngs={"dropout": jax.random.PRNGKey(6)}) ** 2)

            g = jax.jit(jax.grad(loss))(params)
            if ref is None:
                ref = g
                continue
            for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref)):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_dit_dots_policy_gives_the_same_gradients():  # full remat: tests/test_dit.py
    cls, fields, x, t, cond = _case("dit")
    params, ref = _grads(cls, fields, x, t, cond, "none")
    for policy in ("dots",):
        p, g = _grads(cls, fields, x, t, cond, policy)
        assert jax.tree.structure(p) == jax.tree.structure(params)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
        assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g)) > 0


def test_recomputation_survives_compilation():
    """Full remat recomputes each block's matrix products in the backward pass (more dots in the optimised HLO);
    'dots' stores them (as many dots as no remat)."""
    x = jnp.zeros((2, 16, 16, 4))
    t = jnp.zeros((2,), jnp.int32)
    dots = {}
    for policy in REMAT_POLICIES:
        model = DiT(**DIT, remat=policy)
        params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, t))["params"]
        grad = jax.jit(jax.grad(lambda p: jnp.mean(model.apply({"params": p}, x, t) ** 2)))
        dots[policy] = grad.lower(params).compile().as_text().count(" dot(")
    assert dots["full"] > dots["none"] and dots["dots"] == dots["none"], dots


def test_policy_names():
    assert remat_policy_name(True) == "full" and remat_policy_name(False) == "none"
    assert [remat_policy_name(p) for p in REMAT_POLICIES] == list(REMAT_POLICIES)
    with pytest.raises(ValueError, match="model.remat='some'"):
        remat_policy_name("some")
