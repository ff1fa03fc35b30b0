"""ControlNet (research/models/controlnet.py, research/pretrained/convert_controlnet.py, task 'controlnet'):
identity at initialisation, parity with diffusers' ControlNetModel + UNet2DConditionModel through save_pretrained
folders, Stable Diffusion 1.5's parameter counts, guess mode and several ControlNets, the hint extractors and the
edge-F1 metric against closed forms, and a trained ControlNet leaving its base bit-identical."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.cond import Cond
from research.models.controlnet import (
    CondUNetControlNet,
    ControlledModel,
    UNetControlNet,
    guess_mode_scales,
    scale_residuals,
    sum_residuals,
)
from research.models.unet import UNet
from research.pretrained.convert_clip import ConversionError
from tests.test_cond_unet import SIZE, _diffusers_class, _one_torch_thread  # noqa: F401 (fixture)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNET = dict(
    out_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_classes=3, null_label=True,
    norm_groups=8, dropout=0.0,
)  # fmt: skip
COND_UNET = dict(
    out_channels=4, block_out_channels=(16, 32), layers_per_block=1, cross_attention_levels=(True, False),
    attention_head_dim=2, cross_attention_dim=24, norm_num_groups=8,
)  # fmt: skip


def _perturbed(params, key, scale=0.1):
    """Every leaf moved by Gaussian noise: the zero convs stop being zero."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def class_nets():
    """(base UNet, its ControlNet, base params, control params initialised from the base) for 8x8 inputs."""
    from research.tasks.controlnet import initial_control_params

    base, control = UNet(**UNET), UNetControlNet(**UNET, hint_channels=(8, 16))
    x, t, y = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)
    pb = _perturbed(base.init(jax.random.PRNGKey(0), x, t, Cond(label=y))["params"], jax.random.PRNGKey(1))
    pc = control.init(jax.random.PRNGKey(2), x, t, Cond(label=y, hint=jnp.zeros((1, 8, 8, 1))))["params"]
    return base, control, pb, initial_control_params(pc, pb)


def test_initial_controlnet_is_the_identity_for_any_hint(class_nets):
    """Zero convs: the controlled model equals the base bit for bit, for random hints, labels and the null label,
    and two ControlNets at once; the encoder copy starts as the base's own weights."""
    base, control, pb, pc = class_nets
    assert set(pb) - {"label_embed"} - {k for k in pb if k.startswith("up")} - {"norm_out", "conv_out"} <= set(pc)
    for key in ("conv_in", "down1_attn0", "mid_res1", "label_embed", "time_dense0"):
        jax.tree.map(np.testing.assert_array_equal, pc[key], pb[key])
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 8, 8, 1)), jnp.float32)
    t, y = jnp.array([0, 10, 500, 999]), jnp.array([0, 1, 2, 3])  # 3 is the null label
    hint = jnp.asarray(rng.standard_normal((4, 8, 8, 1)) * 5, jnp.float32)
    expected = base.apply({"params": pb}, x, t, Cond(label=y))
    one = ControlledModel(base, (control,), scales=2.5)
    out = one.apply({"params": {"base": pb, "controls": (pc,)}}, x, t, Cond(label=y, hint=hint))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
    two = ControlledModel(base, (control, control), scales=(1.0, 0.3), guess_mode=True)
    out2 = two.apply({"params": {"base": pb, "controls": (pc, pc)}}, x, t, Cond(label=y, hint=(hint, -hint)))
    np.testing.assert_array_equal(np.asarray(out2), np.asarray(expected))
    res = control.apply({"params": pc}, x, t, Cond(label=y, hint=hint))
    assert len(res["down"]) == 2 * 2 and all(float(jnp.abs(r).max()) == 0.0 for r in (*res["down"], res["mid"]))


def test_scales_guess_mode_and_several_controlnets(class_nets):
    """ControlledModel = the base with sum_k scale_k * residuals_k (guess mode: times 0.825 ** (n - 1 - i)), for
    trained-looking (perturbed) ControlNets; the scales themselves against the closed form."""
    base, control, pb, pc = class_nets
    np.testing.assert_allclose(guess_mode_scales(13), [0.825 ** (12 - i) for i in range(13)], rtol=1e-6)
    # diffusers' torch.logspace(-1, 0, 13) is the same geometric sequence with ratio 10 ** (-1 / 12)
    np.testing.assert_allclose(guess_mode_scales(13, 10 ** (-1 / 12)), np.logspace(-1, 0, 13), rtol=1e-6)
    c1, c2 = _perturbed(pc, jax.random.PRNGKey(5)), _perturbed(pc, jax.random.PRNGKey(6))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 1)), jnp.float32)
    t, y = jnp.array([7, 700]), jnp.array([2, 0])
    h1, h2 = (jnp.asarray(rng.standard_normal((2, 8, 8, 1)), jnp.float32) for _ in range(2))
    r1 = control.apply({"params": c1}, x, t, Cond(label=y, hint=h1))
    r2 = control.apply({"params": c2}, x, t, Cond(label=y, hint=h2))
    for guess in (False, True):
        model = ControlledModel(base, (control, control), scales=(0.7, 1.3), guess_mode=guess)
        out = model.apply({"params": {"base": pb, "controls": (c1, c2)}}, x, t, Cond(label=y, hint=(h1, h2)))
        n = len(r1["down"]) + 1
        w = 0.825 ** np.arange(n - 1, -1, -1) if guess else np.ones(n)
        down = tuple(0.7 * w[i] * a + 1.3 * w[i] * b for i, (a, b) in enumerate(zip(r1["down"], r2["down"])))
        manual = {"down": down, "mid": 0.7 * w[-1] * r1["mid"] + 1.3 * w[-1] * r2["mid"]}
        expected = base.apply({"params": pb}, x, t, Cond(label=y, residuals=manual))
        np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5, rtol=1e-5)
    plain = base.apply({"params": pb}, x, t, Cond(label=y))
    assert float(jnp.abs(out - plain).max()) > 1e-2  # the perturbed controls do act
    summed = sum_residuals([scale_residuals(r1, 2.0), scale_residuals(r2, 0.0)])
    np.testing.assert_allclose(np.asarray(summed["mid"]), 2.0 * np.asarray(r1["mid"]), rtol=1e-6)


def test_inputs_are_checked(class_nets):
    base, control, pb, pc = class_nets
    x, t, y = jnp.zeros((2, 8, 8, 1)), jnp.zeros((2,)), jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="needs cond.hint"):
        control.apply({"params": pc}, x, t, Cond(label=y))
    with pytest.raises(ValueError, match=r"cond.hint has shape \(2, 16, 16, 1\).*\[2, 8, 8, C\]"):
        control.apply({"params": pc}, x, t, Cond(label=y, hint=jnp.zeros((2, 16, 16, 1))))
    with pytest.raises(ValueError, match="does not use cond.residuals"):
        control.apply({"params": pc}, x, t, Cond(label=y, hint=jnp.zeros((2, 8, 8, 1)), residuals={}))
    with pytest.raises(ValueError, match="2 ControlNets but 1 hint"):
        ControlledModel(base, (control, control)).apply(
            {"params": {"base": pb, "controls": (pc, pc)}}, x, t, Cond(label=y, hint=jnp.zeros((2, 8, 8, 1)))
        )
    with pytest.raises(ValueError, match="hint_downsample=3 must be a power of two"):
        UNetControlNet(**UNET, hint_channels=(8, 16), hint_downsample=3).init(
            jax.random.PRNGKey(0), x, t, Cond(label=y, hint=jnp.zeros((2, 24, 24, 1)))
        )


# ------------------------------------------------------------------------------------------- diffusers parity

SD_CONFIG = dict(
    block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    layers_per_block=1,
    attention_head_dim=2,
    cross_attention_dim=24,
    norm_num_groups=8,
)
HINT_CHANNELS = (4, 8, 8, 16)


def _randomised(module, seed):
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():  # zero convs and norm affines start at zero / one: randomise every tensor
        for name, prm in module.named_parameters():
            prm.add_(0.05 * torch.randn_like(prm) + (0.1 * torch.randn_like(prm) if "norm" in name else 0))
    return module.eval()


@pytest.fixture(scope="module")
def sd_pair(tmp_path_factory):
    """diffusers ControlNetModel + UNet2DConditionModel (small SD 1.x-style config, every tensor randomised), saved
    with save_pretrained and converted: (torch controlnet, torch unet, control fields, control params, unet fields,
    unet params, folder of the ControlNet)."""
    from research.pretrained.convert_controlnet import load_diffusers_controlnet
    from research.pretrained.convert_unet import load_diffusers_unet

    ControlNetModel = _diffusers_class("ControlNetModel")
    UNet2DConditionModel = _diffusers_class("UNet2DConditionModel")
    unet = UNet2DConditionModel(
        in_channels=4, out_channels=4, sample_size=SIZE, up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **SD_CONFIG
    )
    _randomised(unet, 0)
    controlnet = _randomised(
        ControlNetModel(
            in_channels=4, conditioning_channels=3, conditioning_embedding_out_channels=HINT_CHANNELS, **SD_CONFIG
        ),
        1,
    )
    root = tmp_path_factory.mktemp("sd_controlnet")
    unet.save_pretrained(str(root / "unet"), safe_serialization=True)
    controlnet.save_pretrained(str(root / "controlnet"), safe_serialization=True)
    cfields, cparams = load_diffusers_controlnet(str(root / "controlnet"))
    ufields, uparams = load_diffusers_unet(str(root / "unet"))
    to_jnp = lambda p: jax.tree.map(jnp.asarray, p)  # noqa: E731
    return controlnet, unet, cfields, to_jnp(cparams), ufields, to_jnp(uparams), str(root / "controlnet")


def test_matches_diffusers_controlnet_and_unet(sd_pair):
    """Same x, t, text and a 64x64 hint (8x the 16x16 latents): the residuals of diffusers' ControlNetModel at
    conditioning scale 0.7, with and without guess mode (diffusers' logspace ratio), and the U-Net's output with
    them added, equal ours to 1e-4."""
    import torch

    controlnet, unet, cfields, cparams, ufields, uparams, _ = sd_pair
    assert cfields["hint_downsample"] == 8 and cfields["hint_channels"] == HINT_CHANNELS
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, SIZE, SIZE, 4)).astype(np.float32)
    text = rng.standard_normal((2, 5, 24)).astype(np.float32)
    hint = rng.uniform(0, 1, (2, 8 * SIZE, 8 * SIZE, 3)).astype(np.float32)
    t = np.array([999.0, 41.0], np.float32)
    nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)  # noqa: E731
    nhwc = lambda a: a.permute(0, 2, 3, 1).numpy()  # noqa: E731

    control = CondUNetControlNet(**cfields)
    base = _cond_unet(ufields)
    raw = jax.jit(lambda p, x, t, c: control.apply({"params": p}, x, t, c))(cparams, x, t, Cond(text=text, hint=hint))
    assert max(float(jnp.abs(r).max()) for r in raw["down"]) > 0.05  # the converted zero convs are not zero
    for guess in (False, True):
        with torch.no_grad():
            down, mid = controlnet(
                nchw(x), torch.from_numpy(t), torch.from_numpy(text), controlnet_cond=nchw(hint),
                conditioning_scale=0.7, guess_mode=guess, return_dict=False,
            )  # fmt: skip
            expected = unet(
                nchw(x), torch.from_numpy(t), torch.from_numpy(text),
                down_block_additional_residuals=down, mid_block_additional_residual=mid,
            ).sample  # fmt: skip
        ours = scale_residuals(raw, 0.7, guess_mode=guess, ratio=10 ** (-1 / len(raw["down"])))
        assert len(ours["down"]) == len(down)
        for a, b in zip(ours["down"], down):
            np.testing.assert_allclose(np.asarray(a), nhwc(b), atol=1e-4, rtol=0)
        np.testing.assert_allclose(np.asarray(ours["mid"]), nhwc(mid), atol=1e-4, rtol=0)
        model = ControlledModel(base, (control,), scales=0.7, guess_mode=guess, ratio=10 ** (-1 / len(down)))
        out = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))(
            {"base": uparams, "controls": (cparams,)}, x, t, Cond(text=text, hint=hint)
        )
        np.testing.assert_allclose(np.asarray(out), nhwc(expected), atol=1e-4, rtol=0)


def _cond_unet(fields):
    from research.models.cond_unet import CondUNet

    return CondUNet(**fields)


def test_controlnet_converter_errors(sd_pair, tmp_path):
    import json
    import shutil

    from research.pretrained.convert_controlnet import controlnet_fields_from_config, load_diffusers_controlnet
    from research.pretrained.convert_unet import port_unet
    from research.pretrained.convert_vae import read_safetensors

    cfields, folder = sd_pair[2], sd_pair[6]
    state = read_safetensors(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    key = "controlnet_cond_embedding.blocks.3.weight"
    assert key in state and "controlnet_down_blocks.3.weight" in state and "controlnet_mid_block.bias" in state
    missing = dict(state)
    del missing[key]
    with pytest.raises(ConversionError, match="ControlNet weights lack tensor " + key.replace(".", r"\.")):
        port_unet(missing, cfields, control=True)
    with pytest.raises(ConversionError, match=r"controlnet_mid_block\.weight has shape \[2, 2\]"):
        port_unet(dict(state, **{"controlnet_mid_block.weight": np.zeros((2, 2), np.float32)}), cfields, control=True)
    with pytest.raises(ConversionError, match="no place for: up_blocks.0.x"):
        port_unet(dict(state, **{"up_blocks.0.x": np.zeros((2,), np.float32)}), cfields, control=True)
    config = json.load(open(os.path.join(folder, "config.json")))
    for key, value in [("controlnet_conditioning_channel_order", "bgr"), ("global_pool_conditions", True)]:
        with pytest.raises(ConversionError, match=f"{key}="):
            controlnet_fields_from_config(dict(config, **{key: value}))
    other = tmp_path / "unet_as_controlnet"
    shutil.copytree(folder, other)
    (other / "config.json").write_text(json.dumps(dict(config, _class_name="UNet2DConditionModel")))
    with pytest.raises(ConversionError, match="has _class_name 'UNet2DConditionModel', expected ControlNetModel"):
        load_diffusers_controlnet(str(other))


def test_stable_diffusion_controlnet_parameter_count():
    """`python -m research.summary --config configs/controlnet_sd15.py`'s counts: 361,279,120 parameters, 1,086,480 in
    the hint encoder, as diffusers' ControlNetModel with SD 1.5's config has (counted on the meta device)."""
    import torch

    from research.shapes import abstract_net_params, build_network
    from research.summary import count_params
    from research.tasks import get_config

    config = get_config(os.path.join(REPO_ROOT, "configs", "controlnet_sd15.py"))
    params = abstract_net_params(build_network(config), config)
    with torch.device("meta"):
        theirs = _diffusers_class("ControlNetModel")(cross_attention_dim=768)
    hint_theirs = sum(p.numel() for p in theirs.controlnet_cond_embedding.parameters())
    assert count_params(params) == sum(p.numel() for p in theirs.parameters()) == 361_279_120
    assert count_params(params["hint"]) == hint_theirs == 1_086_480


# -------------------------------------------------------------------------------------- hints and the metric


def test_hint_extractors_against_closed_forms():
    """A bright 6x6 square on a dark 16x16 image: Canny finds its outline (one pixel thick, on the square's inner
    or outer border), the mask is the square, Sobel's thresholded magnitude covers the border band, blur keeps the
    mean; a blank image has no edges."""
    from research.data.hints import extract_hint

    img = -np.ones((1, 16, 16, 1), np.float32)
    img[:, 5:11, 5:11] = 1.0
    mask = np.asarray(extract_hint("mask", jnp.asarray(img)))[0, ..., 0]
    np.testing.assert_array_equal(mask, (img[0, ..., 0] > 0).astype(np.float32))
    canny = np.asarray(extract_hint("canny", jnp.asarray(img)))[0, ..., 0] > 0
    square = np.zeros((16, 16), bool)
    square[5:11, 5:11] = True
    ring = np.zeros((16, 16), bool)  # the band of the square's border: its outermost pixels and those just outside
    ring[4:12, 4:12] = True
    ring[6:10, 6:10] = False
    assert canny.sum() >= 20 and not (canny & ~ring).any()  # only border pixels
    for side in (canny[:, 4:6].any(), canny[:, 10:12].any(), canny[4:6].any(), canny[10:12].any()):
        assert side  # every side of the square is found
    sobel = np.asarray(extract_hint("sobel", jnp.asarray(img)))[0, ..., 0] > 0
    assert not (sobel & ~ring).any() and sobel[5, 5:11].all()
    blur = np.asarray(extract_hint("blur", jnp.asarray(img)))
    assert abs(blur.mean() - img.mean()) < 0.05 and blur.max() < 1.0
    blank = -np.ones((1, 16, 16, 1), np.float32)
    assert float(np.asarray(extract_hint("canny", jnp.asarray(blank))).sum()) == 0.0
    with pytest.raises(ValueError, match="hint 'depth' is not known"):
        extract_hint("depth", jnp.asarray(img))


def test_edge_f1_against_closed_forms():
    """Identical maps score 1; a one-pixel shift scores 1 with tolerance 1 and its exact P/R/F1 without; disjoint
    maps 0; empty maps 1; precision and recall from counts."""
    from research.metrics.control import edge_f1, edge_scores

    ref = np.zeros((1, 10, 10), np.float32)
    ref[0, 2, 2:8] = 1  # a 6-pixel horizontal line
    shifted = np.roll(ref, 1, axis=1)
    assert edge_f1(ref, ref) == 1.0 and edge_f1(shifted, ref, tolerance=1) == 1.0
    assert edge_f1(shifted, ref, tolerance=0) == 0.0
    half = ref.copy()
    half[0, 2, 5:8] = 0  # predicts 3 of the 6 pixels, all correct: P = 1, R = 1/2, F1 = 2/3
    s = edge_scores(half, ref, tolerance=0)
    np.testing.assert_allclose([s.precision[0], s.recall[0], s.f1[0]], [1.0, 0.5, 2 / 3])
    extra = ref.copy()
    extra[0, 8, :] = 1  # 6 correct + 10 far-away pixels: P = 6/16, R = 1
    s = edge_scores(extra[..., None], ref[..., None], tolerance=1)
    np.testing.assert_allclose([s.precision[0], s.recall[0]], [6 / 16, 1.0])
    empty = np.zeros((2, 10, 10), np.float32)
    assert edge_f1(empty, empty) == 1.0
    np.testing.assert_allclose(edge_scores(np.concatenate([ref, ref]), empty).f1, [0.0, 0.0])


# ------------------------------------------------------------------------------------------------------ the task


def test_training_changes_only_the_control_and_starts_as_the_base(tmp_path):
    """A few ControlNet steps on the tiny base: the base checkpoint's parameters are bit-identical afterwards (read
    again from its workdir) and equal the trainer's frozen copy; the state holds one trainable part, the ControlNet,
    whose encoder copy started as the base's weights and moved; the first step's loss equals the base's own loss on
    the same batch (zero convs); the saved config.json carries the base's architecture."""
    import json

    from research.data import make_train_iterator
    from research.data.sources import get_source, read_fields
    from research.run import load_params
    from research.tasks import get_task
    from research.train import mesh as mesh_lib
    from research.train.loop import build_trainer, train
    from tests.factories import make_tiny_controlnet_config

    config = make_tiny_controlnet_config()
    test_labels = read_fields(get_source(config.data, "test"), np.arange(6))["label"]
    _, before, base_step = load_params(config.controlnet.base)
    trainer = build_trainer(config, mesh_lib.make_mesh(1, jax.devices()[:1]))
    state = trainer.init(jax.random.PRNGKey(0))
    assert set(state.params) == {"net"}
    jax.tree.map(np.testing.assert_array_equal, state.params["net"]["down0_res0"], before["down0_res0"])
    out = train(config, str(tmp_path / "control"))
    _, after, _ = load_params(config.controlnet.base, base_step)
    jax.tree.map(np.testing.assert_array_equal, after, before)
    jax.tree.map(np.testing.assert_array_equal, trainer.context["base_params"], before)
    trained = jax.device_get(out["state"].params["net"])
    assert float(np.abs(trained["down0_res0"]["conv1"]["kernel"] - before["down0_res0"]["conv1"]["kernel"]).max()) > 0
    assert float(np.abs(trained["zero_mid"]["kernel"]).max()) > 0
    # research.sample on the run: controlled samples for the hints of the first test images, with their labels,
    # also with classifier-free guidance (the hint kept in both branches).
    from research.run import read_config
    from research.tasks import SampleOptions

    run_config = read_config(str(tmp_path / "control"))
    for options in (SampleOptions(steps="4"), SampleOptions(steps="4", guidance=2.0)):
        sampler = get_task("controlnet").sampler(str(tmp_path / "control"), run_config, options)
        drawn = sampler(6, seed=1, progress=False)
        assert drawn.images.shape == (6, 8, 8, 1) and drawn.images.dtype == np.uint8 and drawn.nfe == 4
        assert drawn.name.startswith("controlled_") and list(drawn.labels) == list(test_labels)
    saved = json.load(open(tmp_path / "control" / "config.json"))
    assert (
        saved["model"]["ch"] == 16
        and saved["model"]["num_classes"] == 10
        and saved["model"]["name"] == "unet_controlnet"
    )
    assert saved["controlnet"]["base_step"] == base_step

    # At initialisation the controlled loss is the base's loss: same t, noise and dropped labels.
    from research.tasks.controlnet import make_control_loss_fn
    from research.tasks.diffusion import make_loss_fn

    config = get_task("controlnet").resolve(config)  # the base's model section, as train() saves it

    batch = next(make_train_iterator(config.data, global_batch_size=config.train.batch_size, seed=0))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    rng = jax.random.PRNGKey(3)
    ours, _ = make_control_loss_fn(trainer.model, trainer.context["base"], trainer.schedule, config)(
        state.params["net"], batch, rng, before
    )
    theirs, _ = make_loss_fn(trainer.context["base"], trainer.schedule, config)(before, batch, rng, None)
    np.testing.assert_allclose(float(ours), float(theirs), rtol=1e-6)


def test_controlnet_config_errors(tmp_path):
    from research.config import ConfigError
    from research.tasks import validate_config
    from tests.factories import make_tiny_controlnet_config

    config = make_tiny_controlnet_config()
    bad = config.copy_and_resolve_references()
    bad.controlnet.base = str(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="has no config.json: train the base first"):
        validate_config(bad)
    bad = config.copy_and_resolve_references()
    bad.controlnet.hint = "depth"
    with pytest.raises(ConfigError, match="controlnet.hint='depth'"):
        validate_config(bad)
    bad = config.copy_and_resolve_references()
    bad.model.ch = 32
    with pytest.raises(ConfigError, match="model.ch=32 but the base run .* has 16"):
        validate_config(bad)
    bad = config.copy_and_resolve_references()
    bad.data.image_size = 16
    with pytest.raises(ConfigError, match="data.image_size=16 but the base run was trained with 8"):
        validate_config(bad)
