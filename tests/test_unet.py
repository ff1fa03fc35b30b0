"""Architecture tests for research.models.unet: parameter counts and a numerical match with diffusers.

Porting a randomly initialised diffusers UNet2DModel into our parameter tree and getting the same output
is the strongest check that the two networks compute the same function (layer order, skip wiring,
timestep embedding, attention scaling, padding of the strided conv). torch is NCHW, ours NHWC.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from research.models.layers import AttentionBlock, ResBlock
from research.models.unet import UNet

import torch  # noqa: E402  (the test extra installs it; a missing reference must fail, not skip)
import diffusers  # noqa: E402
from diffusers import UNet2DModel  # noqa: E402


def _count(tree) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(tree))


def _param_shapes(model, hw, channels):
    x = jnp.zeros((1, hw, hw, channels))
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, jnp.zeros((1,))))["params"]


def test_cifar_unet_param_count_matches_paper_and_diffusers():
    n = _count(_param_shapes(UNet(out_channels=3), 32, 3))
    assert n == 35_746_307  # diffusers' equivalent UNet2DModel (see experiments/benchmark_unet.py)
    assert abs(n - 35.7e6) / 35.7e6 < 0.005  # Ho et al. 2020 report 35.7M


def test_mnist_unet_param_count_matches_diffusers():
    ours = UNet(out_channels=1, ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(14,))
    theirs = UNet2DModel(sample_size=28, in_channels=1, out_channels=1, layers_per_block=2,
                         block_out_channels=(64, 128, 128),
                         down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_eps=1e-6,
                         attention_head_dim=None, freq_shift=1, flip_sin_to_cos=False)
    assert _count(_param_shapes(ours, 28, 1)) == sum(p.numel() for p in theirs.parameters()) == 6_469_889


# --- weight port -------------------------------------------------------------------------------------

def _conv(sd, prefix):
    out = {"kernel": sd[prefix + ".weight"].permute(2, 3, 1, 0)}  # OIHW -> HWIO
    if prefix + ".bias" in sd:
        out["bias"] = sd[prefix + ".bias"]
    return out


def _dense(sd, prefix):
    w = sd[prefix + ".weight"]
    return {"kernel": w.reshape(w.shape[0], w.shape[1]).T, "bias": sd[prefix + ".bias"]}  # 1x1 conv too


def _norm(sd, prefix):
    return {"scale": sd[prefix + ".weight"], "bias": sd[prefix + ".bias"]}


def _res(sd, prefix):
    p = {"norm1": _norm(sd, prefix + ".norm1"), "conv1": _conv(sd, prefix + ".conv1"),
         "emb_proj": _dense(sd, prefix + ".time_emb_proj"), "norm2": _norm(sd, prefix + ".norm2"),
         "conv2": _conv(sd, prefix + ".conv2")}
    if prefix + ".conv_shortcut.weight" in sd:
        p["skip"] = _dense(sd, prefix + ".conv_shortcut")
    return p


def _attn(sd, prefix):
    q, k, v = (_dense(sd, f"{prefix}.{n}") for n in ("to_q", "to_k", "to_v"))
    # Our fused qkv splits its 3C outputs as [q | k | v], each head-major inside.
    qkv = {"kernel": torch.cat([q["kernel"], k["kernel"], v["kernel"]], 1),
           "bias": torch.cat([q["bias"], k["bias"], v["bias"]])}
    return {"norm": _norm(sd, prefix + ".group_norm"), "qkv": qkv, "proj_out": _dense(sd, prefix + ".to_out.0")}


def port_diffusers_unet(theirs: "UNet2DModel", num_res_blocks: int) -> dict:
    """diffusers UNet2DModel state dict -> our UNet parameter tree (NHWC kernels)."""
    sd = {k: v.detach() for k, v in theirs.state_dict().items()}
    p = {"conv_in": _conv(sd, "conv_in"), "conv_out": _conv(sd, "conv_out"),
         "norm_out": _norm(sd, "conv_norm_out"), "time_dense0": _dense(sd, "time_embedding.linear_1"),
         "time_dense1": _dense(sd, "time_embedding.linear_2"),
         "mid_res0": _res(sd, "mid_block.resnets.0"), "mid_attn": _attn(sd, "mid_block.attentions.0"),
         "mid_res1": _res(sd, "mid_block.resnets.1")}
    levels = len(theirs.config.block_out_channels)
    for level in range(levels):
        for b in range(num_res_blocks):
            p[f"down{level}_res{b}"] = _res(sd, f"down_blocks.{level}.resnets.{b}")
            if f"down_blocks.{level}.attentions.{b}.to_q.weight" in sd:
                p[f"down{level}_attn{b}"] = _attn(sd, f"down_blocks.{level}.attentions.{b}")
        if level != levels - 1:
            p[f"down{level}_down"] = {"conv": _conv(sd, f"down_blocks.{level}.downsamplers.0.conv")}
        up = levels - 1 - level  # diffusers numbers its decoder from the bottom
        for b in range(num_res_blocks + 1):
            p[f"up{level}_res{b}"] = _res(sd, f"up_blocks.{up}.resnets.{b}")
            if f"up_blocks.{up}.attentions.{b}.to_q.weight" in sd:
                p[f"up{level}_attn{b}"] = _attn(sd, f"up_blocks.{up}.attentions.{b}")
        if level != 0:
            p[f"up{level}_up"] = {"conv": _conv(sd, f"up_blocks.{up}.upsamplers.0.conv")}
    return jax.tree_util.tree_map(lambda t: jnp.asarray(t.numpy()), p)


def test_matches_diffusers_unet2dmodel_with_ported_weights():
    torch.manual_seed(0)
    theirs = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                         block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                         up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, norm_eps=1e-6,
                         attention_head_dim=None, freq_shift=1, flip_sin_to_cos=False,
                         downsample_padding=0)  # 0 = TF 'SAME' (pad after only), as in DDPM and ours
    with torch.no_grad():  # GroupNorm affine params start at 1/0; randomise them so the port is checked
        for name, prm in theirs.named_parameters():
            if "norm" in name:
                prm.add_(0.1 * torch.randn_like(prm))
    theirs.eval()
    ours = UNet(out_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), norm_groups=8)

    params = port_diffusers_unet(theirs, num_res_blocks=1)
    expected = _param_shapes(ours, 16, 3)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(expected)
    shapes = lambda tree: {k: v.shape for k, v in flatten_dict(tree).items()}
    assert shapes(params) == shapes(expected)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
    t = np.array([3.0, 717.0], np.float32)
    with torch.no_grad():
        ref = theirs(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t)).sample.permute(0, 2, 3, 1)
    out = jax.jit(lambda p, x, t: ours.apply({"params": p}, x, t))(unflatten_dict(flatten_dict(params)), x, t)
    ref = ref.numpy()
    assert np.abs(ref).max() > 0.1  # a meaningful, non-degenerate output
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=1e-4)


# --- zero init -----------------------------------------------------------------------------------------

def test_blocks_are_identity_at_init():
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (2, 8, 8, 32))
    emb = jax.random.normal(jax.random.PRNGKey(1), (2, 64))
    for shift in (False, True):
        block = ResBlock(32, norm_groups=8, use_scale_shift_norm=shift)
        params = block.init(key, x, emb, train=False)
        np.testing.assert_array_equal(block.apply(params, x, emb, train=False), x)
    attn = AttentionBlock(num_heads=2, norm_groups=8)
    np.testing.assert_array_equal(attn.apply(attn.init(key, x), x), x)

    # A channel-changing block reduces to its 1x1 skip projection.
    block = ResBlock(48, norm_groups=8)
    params = block.init(key, x, emb, train=False)
    skip = params["params"]["skip"]
    np.testing.assert_allclose(block.apply(params, x, emb, train=False), x @ skip["kernel"] + skip["bias"],
                               atol=1e-5, rtol=1e-5)

    # conv_out is zero-initialised too, so the whole U-Net predicts exactly zero at init.
    unet = UNet(out_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), norm_groups=8)
    xi = jnp.ones((1, 16, 16, 3))
    out = unet.apply(unet.init(key, xi, jnp.zeros((1,))), xi, jnp.zeros((1,)))
    np.testing.assert_array_equal(out, 0.0)
