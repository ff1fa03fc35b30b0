"""Stable Diffusion's conditional U-Net (research/models/cond_unet.py) and its diffusers converter
(research/pretrained/convert_unet.py): parameter counts of the released architectures, output parity with diffusers'
UNet2DConditionModel through a save_pretrained folder (with and without ControlNet residuals), converter errors,
and the cross-attention key mask."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.cond import Cond
from research.pretrained.convert_clip import ConversionError
from research.pretrained.convert_unet import load_diffusers_unet, port_unet, unet_fields_from_config
from research.pretrained.convert_vae import read_safetensors

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Two small diffusers configs: SD 1.x style (1x1-conv projections, heads given by count, a level without
# attention) and SD 2.x style (linear projections, per-level heads of 8 dims, two transformer layers per block).
SD1_STYLE = dict(
    block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    attention_head_dim=2,
    cross_attention_dim=24,
    norm_num_groups=8,
)
SD2_STYLE = dict(
    block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    attention_head_dim=(2, 4),
    cross_attention_dim=32,
    use_linear_projection=True,
    upcast_attention=True,
    transformer_layers_per_block=2,
    norm_num_groups=8,
)
SIZE, LENGTH = 16, 5


def _diffusers_class(name: str):
    import diffusers.utils.import_utils as diffusers_imports

    # diffusers imports torchvision for unrelated models when it is installed (see tests/test_vae.py).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(diffusers_imports, "_torchvision_available", False)
        import diffusers

        return getattr(diffusers, name)


def _torch_unet(config: dict, seed: int):
    import torch

    UNet2DConditionModel = _diffusers_class("UNet2DConditionModel")
    torch.manual_seed(seed)
    theirs = UNet2DConditionModel(in_channels=4, out_channels=3, sample_size=SIZE, **config)
    with torch.no_grad():  # the output layers and norm affines start at zero / one: randomise every tensor
        for name, prm in theirs.named_parameters():
            prm.add_(0.05 * torch.randn_like(prm) + (0.1 * torch.randn_like(prm) if "norm" in name else 0))
    return theirs.eval()


def _skip_shapes(config: dict, batch: int):
    """NHWC shapes of diffusers' down_block_res_samples and of the middle block's output."""
    chans, size = config["block_out_channels"], SIZE
    shapes = [(batch, size, size, chans[0])]
    for level, ch in enumerate(chans):
        shapes += [(batch, size, size, ch)] * config["layers_per_block"]
        if level != len(chans) - 1:
            size //= 2
            shapes.append((batch, size, size, ch))
    return shapes, (batch, size, size, chans[-1])


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """torch's tiny matmuls spin on both shared cores against XLA's threads (100x slower); one thread is enough."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def ported(request, tmp_path_factory):
    """(diffusers config, torch model, folder, fields, params) for one of the two small configs."""
    config = SD1_STYLE if request.param == "sd1" else SD2_STYLE
    theirs = _torch_unet(config, seed=0 if request.param == "sd1" else 1)
    folder = str(tmp_path_factory.mktemp(request.param) / "unet")
    theirs.save_pretrained(folder, safe_serialization=True)
    fields, params = load_diffusers_unet(folder)
    return config, theirs, folder, fields, jax.tree.map(jnp.asarray, params)


def _apply(fields, params, x, t, cond):
    from research.models.cond_unet import CondUNet

    fn = jax.jit(lambda p, x, t, c: CondUNet(**fields).apply({"params": p}, x, t, c))
    # Each program runs once: LLVM's optimisation passes would take most of the test's time (about 2x the compile).
    compiled = fn.lower(params, x, t, cond).compile(compiler_options={"xla_backend_optimization_level": 0})
    return compiled(params, x, t, cond)


@pytest.mark.parametrize(
    "path, expected",
    [("sd15.py", 859_520_964), ("sd15.py:fsdp", 859_520_964), ("sd21.py", 865_910_724), ("sd21.py:base", 865_910_724)],
)
def test_stable_diffusion_parameter_counts(path, expected):
    """The count `python -m research.summary --config configs/sd15.py` prints (the config validated by the
    text_to_image task, the U-Net's parameters from abstract shapes; the FLOP count is left out: lowering SD's
    program takes a while)."""
    from research.shapes import abstract_net_params, build_network
    from research.summary import count_params
    from research.tasks import get_config

    config = get_config(os.path.join(REPO_ROOT, "configs", path))
    assert count_params(abstract_net_params(build_network(config), config)) == expected


@pytest.mark.parametrize("version, expected", [("1", 123_060_480), ("2", 340_387_840)])
def test_stable_diffusion_text_encoder_counts(version, expected):
    """CLIP ViT-L/14's text tower (SD 1.x) and OpenCLIP ViT-H/14's, cut to 23 layers (SD 2.x), counted from
    abstract shapes, equal transformers' CLIPTextModel of the same config on the meta device."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from research.models.clip import CLIPTextTransformer, count_params, stable_diffusion_text_encoder

    fields = stable_diffusion_text_encoder(version)
    tokens = jax.ShapeDtypeStruct((1, 77), jnp.int32)
    params = jax.eval_shape(lambda t: CLIPTextTransformer(**fields).init(jax.random.PRNGKey(0), t), tokens)
    hf = CLIPTextConfig(
        hidden_size=fields["width"],
        num_hidden_layers=fields["layers"],
        num_attention_heads=fields["heads"],
        intermediate_size=4 * fields["width"],
        hidden_act=fields["act"],
    )
    with torch.device("meta"):
        theirs = sum(p.numel() for p in CLIPTextModel(hf).parameters())
    assert count_params(params["params"]) == theirs == expected


def test_stable_diffusion_vae_count():
    """The KL-f8 autoencoder of every SD 1.x / 2.x release, from its diffusers config, has 83,653,863 parameters
    in our AutoencoderKL, as in diffusers'."""
    import torch

    from research.models import build_model
    from research.pretrained.convert_vae import model_fields

    sd_vae = dict(
        block_out_channels=[128, 256, 512, 512],
        layers_per_block=2,
        latent_channels=4,
        in_channels=3,
        out_channels=3,
        norm_num_groups=32,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
    )
    model = build_model(model_fields(sd_vae), out_channels=3)
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    ours = sum(leaf.size for leaf in jax.tree.leaves(jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)))
    with torch.device("meta"):
        theirs = sum(p.numel() for p in _diffusers_class("AutoencoderKL")(**sd_vae).parameters())
    assert ours == theirs == 83_653_863


def test_matches_diffusers_unet2dconditionmodel(ported):
    """Same x, t, text: diffusers' output, and with ControlNet residuals (down_block_additional_residuals,
    mid_block_additional_residual) as cond.residuals; one batch holds both cases, the plain one as zero residuals
    (the residual-free path is compared in the text-mask test)."""
    import torch

    config, theirs, _, fields, params = ported
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, SIZE, SIZE, 4)).astype(np.float32)
    text = rng.standard_normal((3, LENGTH, config["cross_attention_dim"])).astype(np.float32)
    t = np.array([999.0, 3.0, 417.25], np.float32)  # both ends of the schedule and a fractional timestep
    skips, mid = _skip_shapes(config, 3)
    down = [0.5 * rng.standard_normal(s).astype(np.float32) for s in skips]
    mid = 0.5 * rng.standard_normal(mid).astype(np.float32)
    nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)

    with torch.no_grad():
        args = (nchw(x), torch.from_numpy(t), torch.from_numpy(text))
        expected = theirs(*args).sample.permute(0, 2, 3, 1).numpy()
        expected_res = (
            theirs(
                *args,
                down_block_additional_residuals=tuple(nchw(d) for d in down),
                mid_block_additional_residual=nchw(mid),
            )
            .sample.permute(0, 2, 3, 1)
            .numpy()
        )

    both = lambda a, b: np.concatenate([a, b])
    residuals = {"down": tuple(both(np.zeros_like(d), d) for d in down), "mid": both(np.zeros_like(mid), mid)}
    out = np.asarray(_apply(fields, params, both(x, x), both(t, t), Cond(text=both(text, text), residuals=residuals)))
    assert out.shape == (6, SIZE, SIZE, 3) and out.dtype == jnp.float32
    assert np.abs(expected).max() > 0.1 and np.abs(expected_res - expected).max() > 0.1  # the residuals matter
    np.testing.assert_allclose(out[:3], expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(out[3:], expected_res, atol=1e-4, rtol=0)


def test_converter_rejects_missing_misshapen_and_extra_tensors(ported):
    config, _, folder, fields, _ = ported
    state = read_safetensors(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    key = "up_blocks.1.resnets.0.conv_shortcut.weight"
    assert state[key].ndim == 4  # a 1x1 conv in diffusers, a Dense kernel here

    missing = dict(state)
    del missing[key]
    with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
        port_unet(missing, fields)
    target = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    wrong = dict(state, **{target: np.zeros((3, 3), np.float32)})
    with pytest.raises(ConversionError, match=target.replace(".", r"\.") + r".*\[3, 3\].*expected"):
        port_unet(wrong, fields)
    with pytest.raises(ConversionError, match="add_embedding.linear_1.weight"):
        port_unet(dict(state, **{"add_embedding.linear_1.weight": np.zeros((4, 4), np.float32)}), fields)

    full = dict(config, in_channels=4, out_channels=3)
    for key, value in [
        ("class_embed_type", "timestep"),
        ("addition_embed_type", "text_time"),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("time_embedding_type", "fourier"),
        ("down_block_types", ("SimpleCrossAttnDownBlock2D",) + tuple(config["down_block_types"][1:])),
        ("some_future_option", True),
    ]:
        with pytest.raises(ConversionError, match=f"{key}="):
            unet_fields_from_config(dict(full, **{key: value}))


def test_text_mask_equals_dropping_the_padding_tokens(ported):
    """Masked padding keys give diffusers' output for the caption without them (integer timesteps here)."""
    import torch

    config, theirs, _, fields, params = ported
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, SIZE, SIZE, 4)).astype(np.float32)
    t = np.array([999, 3, 500], np.int32)
    text = rng.standard_normal((3, LENGTH + 2, config["cross_attention_dim"])).astype(np.float32)
    lengths = (LENGTH, LENGTH + 2, 1)  # padding after each caption's real tokens; the second has none
    mask = np.arange(LENGTH + 2)[None] < np.array(lengths)[:, None]
    masked = np.asarray(_apply(fields, params, x, t, Cond(text=text, text_mask=mask)))

    def reference(i, n):
        with torch.no_grad():
            args = (torch.from_numpy(x[i : i + 1]).permute(0, 3, 1, 2), torch.from_numpy(t[i : i + 1]))
            return theirs(*args, torch.from_numpy(text[i : i + 1, :n])).sample.permute(0, 2, 3, 1).numpy()[0]

    for i, n in enumerate(lengths):
        np.testing.assert_allclose(masked[i], reference(i, n), atol=1e-4, rtol=0)
    assert np.abs(reference(0, LENGTH + 2) - reference(0, LENGTH)).max() > 1e-3  # padding would change it


def test_inputs_are_checked():
    from research.models.cond_unet import CondUNet
    from research.models.registry import check_input_shape

    small = dict(block_out_channels=(8, 16), cross_attention_levels=(True, False), cross_attention_dim=6)
    model = CondUNet(out_channels=4, norm_num_groups=4, attention_head_dim=2, **small)
    x, t = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,))
    with pytest.raises(ValueError, match="cond.text"):
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, t, None))
    with pytest.raises(ValueError, match="cond.label"):
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, t, Cond(text=jnp.zeros((1, 3, 6)), label=t)))
    with pytest.raises(ValueError, match="heads"):
        bad = CondUNet(out_channels=4, norm_num_groups=4, attention_head_dim=3, **small)
        jax.eval_shape(lambda: bad.init(jax.random.PRNGKey(0), x, t, Cond(text=jnp.zeros((1, 3, 6)))))
    cfg = dict(name="cond_unet", block_out_channels=(32, 64, 64), norm_num_groups=32)
    check_input_shape(cfg, (64, 64, 4))
    with pytest.raises(ValueError, match="divisible by 4"):
        check_input_shape(cfg, (30, 30, 4))
    with pytest.raises(ValueError, match="norm_num_groups"):
        check_input_shape(dict(cfg, block_out_channels=(32, 48)), (64, 64, 4))
