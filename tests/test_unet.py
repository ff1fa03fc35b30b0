"""Architecture tests for research.models.unet: parameter counts, a numerical match with diffusers, the null
label and ControlNet residuals (research.cond.Cond).

Porting a randomly initialised diffusers UNet2DModel into our parameter tree and getting the same output
is the strongest check that the two networks compute the same function (layer order, skip wiring,
timestep embedding, attention scaling, padding of the strided conv). torch is NCHW, ours NHWC.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # noqa: E402  (the test extra installs it; a missing reference must fail, not skip)
from diffusers import UNet2DModel  # noqa: E402
from flax.traverse_util import flatten_dict, unflatten_dict

from research.models.layers import AttentionBlock, ResBlock
from research.models.unet import UNet


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
    theirs = UNet2DModel(
        sample_size=28,
        in_channels=1,
        out_channels=1,
        layers_per_block=2,
        block_out_channels=(64, 128, 128),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_eps=1e-6,
        attention_head_dim=None,
        freq_shift=1,
        flip_sin_to_cos=False,
    )
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
    p = {
        "norm1": _norm(sd, prefix + ".norm1"),
        "conv1": _conv(sd, prefix + ".conv1"),
        "emb_proj": _dense(sd, prefix + ".time_emb_proj"),
        "norm2": _norm(sd, prefix + ".norm2"),
        "conv2": _conv(sd, prefix + ".conv2"),
    }
    if prefix + ".conv_shortcut.weight" in sd:
        p["skip"] = _dense(sd, prefix + ".conv_shortcut")
    return p


def _attn(sd, prefix):
    q, k, v = (_dense(sd, f"{prefix}.{n}") for n in ("to_q", "to_k", "to_v"))
    # Our fused qkv splits its 3C outputs as [q | k | v], each head-major inside.
    qkv = {
        "kernel": torch.cat([q["kernel"], k["kernel"], v["kernel"]], 1),
        "bias": torch.cat([q["bias"], k["bias"], v["bias"]]),
    }
    return {"norm": _norm(sd, prefix + ".group_norm"), "qkv": qkv, "proj_out": _dense(sd, prefix + ".to_out.0")}


def port_diffusers_unet(theirs: "UNet2DModel", num_res_blocks: int) -> dict:
    """diffusers UNet2DModel state dict -> our UNet parameter tree (NHWC kernels)."""
    sd = {k: v.detach() for k, v in theirs.state_dict().items()}
    p = {
        "conv_in": _conv(sd, "conv_in"),
        "conv_out": _conv(sd, "conv_out"),
        "norm_out": _norm(sd, "conv_norm_out"),
        "time_dense0": _dense(sd, "time_embedding.linear_1"),
        "time_dense1": _dense(sd, "time_embedding.linear_2"),
        "mid_res0": _res(sd, "mid_block.resnets.0"),
        "mid_attn": _attn(sd, "mid_block.attentions.0"),
        "mid_res1": _res(sd, "mid_block.resnets.1"),
    }
    levels = len(theirs.config.block_out_channels)
    for level in range(levels):
        for b in range(num_res_blocks):
            p[f"down{level}_res{b}"] = _res(sd, f"down_blocks.{level}.resnets.{b}")
            if f"down_blocks.{level}.attentions.{b}.to_q.weight" in sd:
                p[f"down{level}_attn{b}"] = _attn(sd, f"down_blocks.{level}.attentions.{b}")
        if level != levels - 1:
            prefix = f"down_blocks.{level}.downsamplers.0"
            resnet = prefix + ".conv1.weight" in sd  # downsample_type='resnet': ADM's resampling block
            p[f"down{level}_down"] = _res(sd, prefix) if resnet else {"conv": _conv(sd, prefix + ".conv")}
        up = levels - 1 - level  # diffusers numbers its decoder from the bottom
        for b in range(num_res_blocks + 1):
            p[f"up{level}_res{b}"] = _res(sd, f"up_blocks.{up}.resnets.{b}")
            if f"up_blocks.{up}.attentions.{b}.to_q.weight" in sd:
                p[f"up{level}_attn{b}"] = _attn(sd, f"up_blocks.{up}.attentions.{b}")
        if level != 0:
            prefix = f"up_blocks.{up}.upsamplers.0"
            resnet = prefix + ".conv1.weight" in sd
            p[f"up{level}_up"] = _res(sd, prefix) if resnet else {"conv": _conv(sd, prefix + ".conv")}
    if "class_embedding.weight" in sd:
        p["label_embed"] = {"embedding": sd["class_embedding.weight"]}
    return jax.tree_util.tree_map(lambda t: jnp.asarray(t.numpy()), p)


def test_matches_diffusers_unet2dmodel_with_ported_weights():
    torch.manual_seed(0)
    theirs = UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        norm_eps=1e-6,
        attention_head_dim=None,
        freq_shift=1,
        flip_sin_to_cos=False,
        downsample_padding=0,
    )  # 0 = TF 'SAME' (pad after only), as in DDPM and ours
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


def test_adm_resampling_blocks_and_scale_shift_match_diffusers():
    """ADM's network options (BigGAN-style resampling residual blocks, scale-shift norm, class embedding) against
    diffusers' UNet2DModel with downsample_type / upsample_type 'resnet' and resnet_time_scale_shift='scale_shift'."""
    torch.manual_seed(1)
    theirs = UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=6,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"),
        norm_num_groups=8,
        norm_eps=1e-5,
        attention_head_dim=16,
        freq_shift=1,
        flip_sin_to_cos=False,
        resnet_time_scale_shift="scale_shift",
        downsample_type="resnet",
        upsample_type="resnet",
        num_class_embeds=5,
        attn_norm_num_groups=8,  # diffusers drops the middle attention's GroupNorm under scale_shift unless set
    )
    with torch.no_grad():  # zero-initialised parts and unit norms would hide a wrong port
        for prm in theirs.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    theirs.eval()
    ours = UNet(
        out_channels=6,
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(16, 8),
        head_channels=16,
        use_scale_shift_norm=True,
        resblock_updown=True,
        num_classes=5,
        norm_groups=8,
        norm_eps=1e-5,
        dropout=0.0,
    )
    params = port_diffusers_unet(theirs, num_res_blocks=1)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
    t, y = np.array([5.0, 640.0], np.float32), np.array([1, 4])
    expected = ours.init(jax.random.PRNGKey(0), x, t, y)["params"]
    shapes = lambda tree: {k: tuple(v.shape) for k, v in flatten_dict(tree).items()}
    assert shapes(params) == shapes(expected)
    with torch.no_grad():
        ref = theirs(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), class_labels=torch.from_numpy(y))
    ref = ref.sample.permute(0, 2, 3, 1).numpy()
    out = jax.jit(lambda p, x, t, y: ours.apply({"params": p}, x, t, y))(params, x, t, y)
    assert np.abs(ref).max() > 0.1
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
    np.testing.assert_allclose(
        block.apply(params, x, emb, train=False), x @ skip["kernel"] + skip["bias"], atol=1e-5, rtol=1e-5
    )

    # conv_out is zero-initialised too, so the whole U-Net predicts exactly zero at init.
    unet = UNet(out_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), norm_groups=8)
    xi = jnp.ones((1, 16, 16, 3))
    out = unet.apply(unet.init(key, xi, jnp.zeros((1,))), xi, jnp.zeros((1,)))
    np.testing.assert_array_equal(out, 0.0)


# --- conditioning: null label, ControlNet residuals ---------------------------------------------------------

TINY = dict(out_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), norm_groups=8)
# Storage order: conv_in, down0_res0, down0_down, down1_res0 (+attn at 8x8): len(ch_mult) * (num_res_blocks + 1).
SKIP_SHAPES = [(2, 16, 16, 32), (2, 16, 16, 32), (2, 8, 8, 32), (2, 8, 8, 64)]
MID_SHAPE = (2, 8, 8, 64)


@pytest.fixture(scope="module")
def tiny_unet():
    model = UNet(**TINY)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
    t = jnp.array([3, 500])
    params = model.init(jax.random.PRNGKey(1), x, t)["params"]
    # Every zero-initialised layer gets weights, so the residuals' effect reaches the output.
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    params = jax.tree_util.tree_unflatten(
        treedef, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
    )
    return model, params, x, t


def _residuals(seed, scale=1.0):
    keys = jax.random.split(jax.random.PRNGKey(seed), len(SKIP_SHAPES) + 1)
    down = tuple(scale * jax.random.normal(k, s) for k, s in zip(keys, SKIP_SHAPES))
    return {"down": down, "mid": scale * jax.random.normal(keys[-1], MID_SHAPE)}


def _shifted_reference(model, params, x, t, residuals):
    """The U-Net run unchanged, with flax's method interception doing what ControlNet residuals mean: the mid
    block's output (mid_res1) is shifted by residuals['mid'], and each skip, as the decoder block that consumes
    it sees it (the trailing channels of its concatenated input; decoder ResBlocks consume skips last-stored
    first), by its residuals['down'] entry. The encoder itself is untouched."""
    down = list(residuals.get("down", ()))
    calls = []

    def interceptor(next_fun, args, kwargs, context):
        name = context.module.name
        if context.method_name != "__call__" or not isinstance(context.module, ResBlock):
            return next_fun(*args, **kwargs)
        if name.startswith("up") and down:
            r = down[len(down) - 1 - len(calls)]
            calls.append(name)
            h = args[0]
            args = (h.at[..., h.shape[-1] - r.shape[-1] :].add(r),) + args[1:]
        out = next_fun(*args, **kwargs)
        if name == "mid_res1" and residuals.get("mid") is not None:
            out = out + residuals["mid"]
        return out

    with nn.intercept_methods(interceptor):
        out = model.apply({"params": params}, x, t)
    assert not down or len(calls) == len(down)
    return out


def test_zero_residuals_are_bit_identical(tiny_unet):
    from research.cond import Cond

    model, params, x, t = tiny_unet
    forward = jax.jit(lambda p, c: model.apply({"params": p}, x, t, c))
    plain = forward(params, None)
    assert float(jnp.abs(plain).max()) > 0.1
    zeros = jax.tree.map(jnp.zeros_like, _residuals(0))
    np.testing.assert_array_equal(forward(params, Cond(residuals=zeros)), plain)


def test_bfloat16_and_float16_forward_agree_with_float32(tiny_unet):
    """Reduced-precision compute (model.dtype) on the same float32 parameters: within bfloat16's 8-bit mantissa
    (float16's 11) of the float32 output; the output is float32 and the parameters stay float32."""
    model, params, x, t = tiny_unet
    ref = jax.jit(lambda p: model.apply({"params": p}, x, t))(params)
    scale = float(jnp.abs(ref).max())
    for dtype, tol in ((jnp.bfloat16, 2e-2), (jnp.float16, 3e-3)):
        low = model.clone(dtype=dtype)
        out = jax.jit(lambda p, low=low: low.apply({"params": p}, x, t))(params)
        assert out.dtype == jnp.float32
        err = float(jnp.abs(out - ref).max()) / scale
        assert err < tol, (dtype, err)
        assert err > 1e-6  # the computation really ran in the lower precision
        abstract = jax.eval_shape(lambda low=low: low.init(jax.random.PRNGKey(0), x, t))["params"]
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(abstract))


def test_residuals_shift_the_mid_output_and_the_skips(tiny_unet):
    from research.cond import Cond

    model, params, x, t = tiny_unet
    forward = jax.jit(lambda p, c: model.apply({"params": p}, x, t, c))
    plain = forward(params, None)
    full = _residuals(1, scale=0.5)
    for residuals in ({"mid": full["mid"]}, {"down": full["down"]}, full):
        out = forward(params, Cond(residuals=residuals))
        ref = _shifted_reference(model, params, x, t, residuals)
        assert float(jnp.abs(out - plain).max()) > 1e-2  # the residuals matter
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # Only skip 0 (conv_in's output, consumed by the last decoder block): not the same as shifting conv_in itself.
    only_first = {"down": (full["down"][0],) + tuple(jnp.zeros(s) for s in SKIP_SHAPES[1:])}
    out = forward(params, Cond(residuals=only_first))
    np.testing.assert_allclose(out, _shifted_reference(model, params, x, t, only_first), rtol=1e-5, atol=1e-5)


def test_residual_errors_name_the_mismatch(tiny_unet):
    from research.cond import Cond

    model, params, x, t = tiny_unet
    apply = lambda residuals: model.apply({"params": params}, x, t, Cond(residuals=residuals))
    full = _residuals(0)
    with pytest.raises(ValueError, match=r"has 3 arrays but this U-Net stores 4 skips"):
        apply({"down": full["down"][:3]})
    with pytest.raises(
        ValueError,
        match=r"\['down'\]\[2\] has shape \(2, 8, 8, 64\) but skip 2 has shape "
        r"\(2, 8, 8, 32\)",
    ):
        apply({"down": full["down"][:2] + (full["down"][3], full["down"][3])})
    with pytest.raises(ValueError, match=r"\['mid'\] has shape \(2, 8, 8, 32\).*\(2, 8, 8, 64\)"):
        apply({"mid": full["mid"][..., :32]})
    with pytest.raises(ValueError, match=r"keys 'down' and/or 'mid'; got \['middle'\]"):
        apply({"middle": full["mid"]})


def test_null_label_row_and_label_contract():
    from research.cond import Cond

    x, t, y = jnp.zeros((2, 16, 16, 3)), jnp.zeros((2,)), jnp.array([0, 4])
    for null_label, rows in ((False, 5), (True, 6)):
        model = UNet(num_classes=5, null_label=null_label, **TINY)
        params = _param_shapes_with_labels(model, x, t, y)
        assert params["label_embed"]["embedding"].shape == (rows, 128)
    model = UNet(num_classes=5, null_label=True, **TINY)
    variables = model.init(jax.random.PRNGKey(0), x, t, y)
    variables = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(1), p.shape), variables)
    label_out = model.apply(variables, x, t, y)
    np.testing.assert_array_equal(model.apply(variables, x, t, Cond(label=y)), label_out)
    null_out = model.apply(variables, x, t, jnp.array([5, 5]))  # the null row is a real, distinct embedding
    assert float(jnp.abs(null_out - label_out).max()) > 1e-3


def _param_shapes_with_labels(model, x, t, y):
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, t, y))["params"]
