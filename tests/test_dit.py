"""DiT (Peebles & Xie 2023): paper sizes and Gflops, adaLN-Zero identity at init, the token layout, a numerical
match with diffusers' DiTTransformer2DModel, the null label and the Cond contract, and training through the
trainer.

FLOP convention: XLA's cost analysis counts a multiply-add as 2 FLOPs; the paper's "Gflops" (Table 4) count it
once, so the figures compared to the paper are XLA's FLOPs / 2.
"""

import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from research.config import ConfigError, apply_overrides
from research.models import build_model
from research.models.dit import (
    DiT,
    DiTBlock,
    dit_architecture,
    dit_model_config,
    dit_timestep_embedding,
    dit_variants,
    patchify,
    sincos_2d,
    unpatchify,
)
from research.tasks import get_config, validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs/dit_xl2_imagenet256.py")

# Table 4 of Peebles & Xie (2023), ImageNet 256x256 (32x32x4 latents): params (M) and Gflops (multiply-adds).
TABLE4 = {
    "DiT-S/8": (33, 0.36),
    "DiT-S/4": (33, 1.41),
    "DiT-S/2": (33, 6.06),
    "DiT-B/8": (131, 1.42),
    "DiT-B/4": (130, 5.56),
    "DiT-B/2": (130, 23.01),
    "DiT-L/8": (459, 5.01),
    "DiT-L/4": (458, 19.70),
    "DiT-L/2": (458, 80.71),
    "DiT-XL/8": (676, 7.39),
    "DiT-XL/4": (675, 29.05),
    "DiT-XL/2": (675, 118.64),
}
LATENT = (32, 4)  # side, channels
OUT_CHANNELS = 8  # learned sigma: eps and the variance interpolation, 4 channels each
NUM_CLASSES = 1000


def _abstract_params(model, side=32, channels=4, labels=True):
    x = jnp.zeros((1, side, side, channels))
    t = jnp.zeros((1,), jnp.int32)
    y = jnp.zeros((1,), jnp.int32) if labels else None
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, t, y))["params"]


def _count(tree) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(tree))


def expected_param_count(depth, hidden, patch, in_channels=4, out_channels=8, num_classes=1000, null_label=True):
    """The architecture counted by hand (weights + biases), fixed position embeddings excluded."""
    h = hidden
    patch_embed = patch * patch * in_channels * h + h
    t_embed = 256 * h + h + h * h + h
    label_embed = (num_classes + int(null_label)) * h
    block = (
        6 * h * h
        + 6 * h  # adaLN modulation
        + 3 * h * h
        + 3 * h  # qkv
        + h * h
        + h  # attention output
        + 4 * h * h
        + 4 * h  # MLP in
        + 4 * h * h
        + h
    )  # MLP out
    final = 2 * h * h + 2 * h + h * patch * patch * out_channels + patch * patch * out_channels
    return patch_embed + t_embed + label_embed + depth * block + final


def _randomise(params, key, scale=0.05):
    """Perturb every parameter: at init the outputs are exactly zero, which would make comparisons vacuous."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [p + scale * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]
    )


# --- paper figures ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", dit_variants())
def test_param_count_matches_paper_table4(variant):
    depth, hidden, _, patch = dit_architecture(variant)
    n = _count(_abstract_params(DiT(out_channels=OUT_CHANNELS, variant=variant)))
    assert n == expected_param_count(depth, hidden, patch)
    paper_millions = TABLE4[variant][0]
    assert abs(n / 1e6 - paper_millions) / paper_millions < 0.01


def test_xl2_param_count_equals_the_official_code_count():
    # The paper's code counts model.parameters(), which includes its frozen sin-cos position table
    # (an nn.Parameter with requires_grad=False); here it is a constant, not a parameter.
    n = _count(_abstract_params(DiT(out_channels=OUT_CHANNELS, variant="DiT-XL/2")))
    tokens, hidden = (32 // 2) ** 2, 1152
    assert n == 674_834_720
    assert n + tokens * hidden == 675_129_632


@pytest.mark.parametrize("variant", dit_variants())
def test_forward_gflops_match_paper_table4(variant):
    model = DiT(out_channels=OUT_CHANNELS, variant=variant)
    params = _abstract_params(model)
    x = jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    # The lowered (unoptimised) program's cost analysis needs no compilation: about a second for XL/2.
    lowered = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y)).lower(params, x, t, t)
    gmacs = lowered.cost_analysis()["flops"] / 2 / 1e9
    paper = TABLE4[variant][1]
    assert abs(gmacs - paper) / paper < 0.03, (variant, gmacs, paper)


def test_summary_cli_prints_xl2_figures(capsys):
    from research import summary

    assert summary.main(["--config", CONFIG]) == 0
    out = capsys.readouterr().out
    assert "model: dit" in out and "input: 32x32x4" in out
    assert int(out.split("params: ")[1].split()[0]) == 674_834_720
    gmacs = float(out.split("gmacs: ")[1].split()[0])
    assert gmacs == pytest.approx(float(out.split("gflops: ")[1].split()[0]) / 2, abs=2e-3)
    assert abs(gmacs - 118.64) / 118.64 < 0.03

    assert summary.main(["--config", CONFIG, "--config.model.variant=DiT-B/4"]) == 0
    out = capsys.readouterr().out
    assert abs(float(out.split("gmacs: ")[1].split()[0]) - 5.56) / 5.56 < 0.03


# --- adaLN-Zero --------------------------------------------------------------------------------------------

TINY = dict(variant="", depth=2, hidden_size=32, num_heads=4, patch_size=2, num_classes=10)


@pytest.fixture(scope="module")
def tiny():
    """A two-block DiT on 8x8x4 inputs (16 tokens), its initial parameters, inputs, and a jitted forward."""
    model = DiT(out_channels=8, **TINY)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 4))
    t, y = jnp.array([0, 17, 300, 999]), jnp.array([2, 10, 7, 0])  # 10 is the null label
    params = jax.jit(model.init)(jax.random.PRNGKey(1), x, t, y)["params"]
    forward = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))
    return types.SimpleNamespace(model=model, params=params, x=x, t=t, y=y, forward=forward)


def test_output_is_zero_and_blocks_are_identity_at_init(tiny):
    out = tiny.forward(tiny.params, tiny.x, tiny.t, tiny.y)
    assert out.shape == (4, 8, 8, 8) and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, 0.0)

    block = DiTBlock(num_heads=4)
    tokens = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 32))
    c = 3.0 * jax.random.normal(jax.random.PRNGKey(2), (2, 32))
    block_params = jax.jit(block.init)(jax.random.PRNGKey(0), tokens, c)
    apply = jax.jit(block.apply)
    np.testing.assert_array_equal(apply(block_params, tokens, c), tokens)
    # Only the gates hold the identity: with a non-zero modulation the block changes its input.
    perturbed = _randomise(block_params, jax.random.PRNGKey(3))
    assert float(jnp.abs(apply(perturbed, tokens, c) - tokens).max()) > 1e-3


def test_initialisation_follows_the_paper_code(tiny):
    names = ["/".join(k) for k in flatten_dict(_abstract_params(DiT(out_channels=8, variant="DiT-S/2")))]
    assert not any("pos" in n for n in names)  # the position table is a constant, not a parameter
    p = flatten_dict(tiny.params)
    for name in [
        ("block0", "adaLN", "kernel"),
        ("block0", "adaLN", "bias"),
        ("final", "adaLN", "kernel"),
        ("final", "proj", "kernel"),
        ("final", "proj", "bias"),
    ]:
        np.testing.assert_array_equal(p[name], 0.0)
    for name in [("t_embed0", "kernel"), ("t_embed1", "kernel"), ("label_embed", "embedding")]:
        assert abs(float(jnp.std(p[name])) - 0.02) < 0.004, name
    # Xavier uniform on the patch embedding seen as a linear map (p*p*C -> hidden), not as a conv.
    fan_in, fan_out = 2 * 2 * 4, 32
    limit = np.sqrt(6 / (fan_in + fan_out))
    kernel = p[("patch_embed", "kernel")]
    assert kernel.shape == (fan_in, fan_out)
    assert limit * 0.9 < float(jnp.abs(kernel).max()) <= limit


# --- token layout ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("patch", [2, 4, 8])
def test_patchify_round_trip_and_layout(patch):
    x = np.random.default_rng(0).standard_normal((2, 16, 24, 3)).astype(np.float32)
    tokens = patchify(x, patch)
    grid = (16 // patch, 24 // patch)
    assert tokens.shape == (2, grid[0] * grid[1], patch * patch * 3)
    np.testing.assert_array_equal(unpatchify(tokens, patch, grid), x)
    # Token i * w + j is the patch at row i, column j, flattened (row, column, channel)-major.
    i, j = grid[0] - 1, 1
    np.testing.assert_array_equal(
        tokens[1, i * grid[1] + j], x[1, i * patch : (i + 1) * patch, j * patch : (j + 1) * patch].reshape(-1)
    )


def test_position_embedding_is_the_closed_form():
    dim, (gh, gw) = 16, (3, 5)
    pe = sincos_2d(dim, (gh, gw))
    quarter = dim // 4
    expected = np.zeros((gh * gw, dim))
    for i in range(gh):
        for j in range(gw):
            for k in range(quarter):
                freq = 10000.0 ** (-k / quarter)
                # First half: column j, second half: row i; each half [sin | cos].
                expected[i * gw + j, k] = np.sin(j * freq)
                expected[i * gw + j, quarter + k] = np.cos(j * freq)
                expected[i * gw + j, 2 * quarter + k] = np.sin(i * freq)
                expected[i * gw + j, 3 * quarter + k] = np.cos(i * freq)
    np.testing.assert_allclose(pe, expected, rtol=0, atol=1e-12)


def test_timestep_embedding_layout():
    t = jnp.array([0.0, 7.0, 999.0])
    emb = np.asarray(dit_timestep_embedding(t, 8))
    freqs = 10000.0 ** (-np.arange(4) / 4)
    args = np.asarray(t)[:, None] * freqs[None]
    np.testing.assert_allclose(emb, np.concatenate([np.cos(args), np.sin(args)], 1), rtol=1e-5, atol=1e-5)


# --- diffusers reference -----------------------------------------------------------------------------------


def _import_diffusers_dit():
    """diffusers' DiTTransformer2DModel. Its package imports torchvision, whose CPU-incompatible operator
    registrations fail at import (see tests/reference.py): an empty stand-in for that one module."""
    name = "torchvision._meta_registrations"
    if "torchvision" not in sys.modules and name not in sys.modules:
        sys.modules[name] = types.ModuleType(name)
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel


def port_diffusers_dit(theirs) -> dict:
    """diffusers DiTTransformer2DModel state dict -> our DiT parameter tree.

    diffusers gives every block its own timestep/label embedder; the paper's model has one, so a faithful
    diffusers DiT has them tied (as in the converted official checkpoints) and block 0's copy is taken.
    """
    import torch

    sd = {k: v.detach() for k, v in theirs.state_dict().items()}

    def dense(prefix):
        return {"kernel": sd[prefix + ".weight"].T, "bias": sd[prefix + ".bias"]}

    w = sd["pos_embed.proj.weight"]  # [hidden, C, p, p] conv -> [(p1 p2 C), hidden], patchify's order
    emb = "transformer_blocks.0.norm1.emb."
    p = {
        "patch_embed": {"kernel": w.permute(2, 3, 1, 0).reshape(-1, w.shape[0]), "bias": sd["pos_embed.proj.bias"]},
        "t_embed0": dense(emb + "timestep_embedder.linear_1"),
        "t_embed1": dense(emb + "timestep_embedder.linear_2"),
        "label_embed": {"embedding": sd[emb + "class_embedder.embedding_table.weight"]},
        "final": {"adaLN": dense("proj_out_1"), "proj": dense("proj_out_2")},
    }
    for i in range(theirs.config.num_layers):
        b = f"transformer_blocks.{i}."
        q, k, v = (dense(b + f"attn1.to_{n}") for n in "qkv")
        p[f"block{i}"] = {
            "adaLN": dense(b + "norm1.linear"),
            "attn": {
                "qkv": {
                    "kernel": torch.cat([q["kernel"], k["kernel"], v["kernel"]], 1),
                    "bias": torch.cat([q["bias"], k["bias"], v["bias"]]),
                },
                "proj": dense(b + "attn1.to_out.0"),
            },
            "mlp_fc1": dense(b + "ff.net.0.proj"),
            "mlp_fc2": dense(b + "ff.net.2"),
        }
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a.numpy()), p)


def test_matches_diffusers_dit_with_ported_weights(tiny):
    import torch

    DiTTransformer2DModel = _import_diffusers_dit()
    torch.manual_seed(0)
    theirs = DiTTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_eps=1e-6,
    )  # the paper's LayerNorm eps (diffusers' default is 1e-5)
    blocks = theirs.transformer_blocks
    with torch.no_grad():
        for block in blocks[1:]:  # one shared conditioning embedder, as in the paper
            block.norm1.emb.load_state_dict(blocks[0].norm1.emb.state_dict())
    theirs.eval()  # no label dropout
    x, t, y = (np.asarray(a) for a in (tiny.x, tiny.t, tiny.y))

    def reference():
        with torch.no_grad():
            out = theirs(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(y)).sample
        return out.permute(0, 2, 3, 1).numpy()

    # diffusers spaces the timestep frequencies by k / (half - 1) (downscale_freq_shift=1) where the paper's
    # code uses k / half; with the paper's spacing the two networks are the same function.
    with_diffusers_spacing = reference()
    for block in blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    ref = reference()

    params = port_diffusers_dit(theirs)
    shapes = lambda tree: {k: v.shape for k, v in flatten_dict(tree).items()}
    assert shapes(params) == shapes(tiny.params)
    out = np.asarray(tiny.forward(params, x, t, y))
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-4)
    # ...and the frequency spacing is the only difference, a small but real one.
    assert np.abs(with_diffusers_spacing - ref).max() > 1e-4


# --- conditioning ------------------------------------------------------------------------------------------


def test_null_label_row_and_condition_dropout_before_the_model(tiny):
    from research.cond import Cond, drop_condition

    params = _randomise(tiny.params, jax.random.PRNGKey(2))
    assert params["label_embed"]["embedding"].shape == (11, 32)  # 10 classes + the null row
    assert _abstract_params(tiny.model.clone(null_label=False), 8, 4)["label_embed"]["embedding"].shape == (10, 32)
    y = jnp.array([0, 3, 5, 9])
    null = tiny.forward(params, tiny.x, tiny.t, jnp.full_like(y, 10))
    kept = tiny.forward(params, tiny.x, tiny.t, y)
    assert float(jnp.abs(kept - null).max(axis=(1, 2, 3)).min()) > 1e-4  # every label changes the output
    # The model drops nothing itself, in training either: the trainer calls drop_condition first.
    trained = jax.jit(lambda p, y: tiny.model.apply({"params": p}, tiny.x, tiny.t, y, train=True))
    np.testing.assert_array_equal(trained(params, y), kept)
    dropped = drop_condition(Cond(label=y), jax.random.PRNGKey(3), 1.0, null_label=10)
    np.testing.assert_allclose(trained(params, dropped), null, rtol=0, atol=1e-6)
    # A Cond and its bare label array are the same call.
    np.testing.assert_array_equal(tiny.forward(params, tiny.x, tiny.t, Cond(label=y)), kept)


def test_dit_rejects_conditions_it_does_not_use(tiny):
    from research.cond import Cond

    text = jnp.zeros((4, 5, 16))
    with pytest.raises(ValueError, match=r"DiT does not use cond.text \(it supports: label\)"):
        tiny.model.apply({"params": tiny.params}, tiny.x, tiny.t, Cond(label=tiny.y, text=text))
    with pytest.raises(ValueError, match="class-conditional.*no labels"):
        tiny.model.apply({"params": tiny.params}, tiny.x, tiny.t, Cond())
    with pytest.raises(TypeError, match="Cond"):
        tiny.model.apply({"params": tiny.params}, tiny.x, tiny.t, jnp.zeros((4,), jnp.float32))


def test_unconditional_dit_has_no_label_table():
    model = DiT(out_channels=1, variant="", depth=1, hidden_size=32, num_heads=2, patch_size=2, num_classes=0)
    params = _abstract_params(model, side=8, channels=1, labels=False)
    assert "label_embed" not in params


# --- configuration -----------------------------------------------------------------------------------------


def test_variants_resolve_and_errors_name_the_fix():
    assert len(dit_variants()) == 12
    assert dit_architecture("DiT-XL/2") == (28, 1152, 16, 2)
    assert dit_architecture("DiT-S/8") == (12, 384, 6, 8)
    assert dit_architecture("DiT-B/4", depth=3) == (3, 768, 12, 4)
    cfg = dit_model_config("DiT-L/4", num_classes=10)
    model = build_model(cfg, out_channels=4)
    assert isinstance(model, DiT) and model.architecture == (24, 1024, 16, 4)
    with pytest.raises(ValueError, match=r"DiT-XXL/2.*DiT-S/2.*DiT-XL/8"):
        dit_model_config("DiT-XXL/2")
    with pytest.raises(ValueError, match="unknown field 'heads'"):
        dit_model_config("DiT-S/2", heads=4)
    with pytest.raises(ValueError, match="num_heads"):
        dit_model_config("", depth=2, hidden_size=32, patch_size=2)
    with pytest.raises(ValueError, match="does not split"):
        dit_model_config("", depth=2, hidden_size=32, num_heads=5, patch_size=2)

    config = get_config(CONFIG)
    with pytest.raises(ConfigError, match=r"model.variant='DiT-M/2'.*DiT-B/2"):
        validate_config(apply_overrides(config, [("model.variant", "DiT-M/2")]))
    with pytest.raises(ConfigError, match="36x36x4 latents of latent.autoencoder.*patch size 8"):
        validate_config(apply_overrides(config, [("model.variant", "DiT-S/8"), ("data.image_size", "288")]))
    with pytest.raises(ConfigError, match="data.image_size=260 is not divisible by the autoencoder's downsampling"):
        validate_config(apply_overrides(config, [("data.image_size", "260")]))


def test_config_file_is_the_paper_recipe():
    c = get_config(CONFIG)
    assert (c.model.name, c.model.variant, c.model.num_classes, c.model.null_label) == ("dit", "DiT-XL/2", 1000, True)
    # 256x256 RGB pixels through the declared f8, 4-channel autoencoder: 32x32x4 latents
    assert (c.data.image_size, c.data.channels, c.data.num_classes) == (256, 3, 1000)
    assert (c.latent.downsample_factor, c.latent.channels, c.latent.normalization) == (8, 4, "scale")
    assert (c.diffusion.schedule, c.diffusion.timesteps, c.diffusion.beta_start, c.diffusion.beta_end) == (
        "linear",
        1000,
        1e-4,
        0.02,
    )
    assert (c.diffusion.var_type, c.diffusion.loss) == ("learned_range", "hybrid")
    assert (c.optim.optimizer, c.optim.lr, c.optim.weight_decay, c.optim.warmup_steps, c.optim.lr_schedule) == (
        "adamw",
        1e-4,
        0.0,
        0,
        "constant",
    )
    assert (c.train.batch_size, c.train.ema_decay, c.train.num_steps) == (256, 0.9999, 7_000_000)
    from research.shapes import output_channels

    assert output_channels(c) == 8


def test_remat_and_bfloat16_compute(tiny):
    params = _randomise(tiny.params, jax.random.PRNGKey(2))

    def grads(model):
        def loss(p):
            out = model.apply(
                {"params": p}, tiny.x, tiny.t, tiny.y, train=True, rngs={"dropout": jax.random.PRNGKey(3)}
            )
            return jnp.mean(out**2)

        return jax.jit(jax.grad(loss))(params)

    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        grads(tiny.model),
        grads(tiny.model.clone(remat=True)),
    )

    bf16 = tiny.model.clone(dtype=jnp.bfloat16)
    out32 = tiny.forward(params, tiny.x, tiny.t, tiny.y)
    out16 = jax.jit(lambda p: bf16.apply({"params": p}, tiny.x, tiny.t, tiny.y))(params)
    assert out16.dtype == jnp.float32
    assert float(jnp.abs(out16 - out32).max()) < 0.05 * float(jnp.abs(out32).max())
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(_abstract_params(bf16, 8, 4)))


# --- training ----------------------------------------------------------------------------------------------


def _tiny_dit_config(**diffusion):
    from tests.factories import make_tiny_config

    c = make_tiny_config()
    with c.unlocked():
        c.model = dit_model_config("", depth=2, hidden_size=32, num_heads=2, patch_size=2, num_classes=10)
    for k, v in diffusion.items():
        c.diffusion[k] = v
    c.train.num_steps = 30
    c.train.ckpt_every = 30
    c.optim.lr = 2e-3
    validate_config(c)
    return c


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return np.array([json.loads(line)["loss"] for line in f])


def test_tiny_dit_trains_and_samples(tmp_path):
    from research.sampling import Generator
    from research.train.loop import train

    config = _tiny_dit_config()
    result = train(config, str(tmp_path / "run"))
    losses = _losses(tmp_path / "run")
    assert len(losses) == 30 and np.isfinite(losses).all()
    # At init the model predicts eps = 0, so the loss starts at E[eps^2] = 1 and must drop.
    assert losses[:3].mean() > 0.9
    assert losses[-10:].mean() < 0.8 * losses[:3].mean()

    generator = Generator(build_model(config.model, out_channels=1), config, batch_size=8)
    samples, _, _ = generator.generate(result["state"].ema_params["net"], 8, seed=0, progress=False)
    assert np.asarray(samples).shape == (8, 8, 8, 1) and np.isfinite(np.asarray(samples)).all()


def test_tiny_dit_learned_sigma_trains_with_hybrid_loss(tmp_path):
    from research.data import make_train_iterator
    from research.shapes import build_network
    from research.train import mesh as mesh_lib
    from research.train.loop import build_trainer

    config = _tiny_dit_config(var_type="learned_range", loss="hybrid")
    trainer = build_trainer(config, mesh_lib.make_mesh(1, jax.devices()[:1]))
    assert build_network(config).out_channels == 2  # eps and the variance interpolation
    state = trainer.init(jax.random.PRNGKey(0))
    init = jax.device_get(state.params["net"])
    it = make_train_iterator(config.data, global_batch_size=16, seed=0)
    for _ in range(5):
        state, metrics = trainer.step(state, mesh_lib.global_batch(next(it), trainer.batch_sharding))
        assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["vlb_bpd_per_step"]))
    # The zero-initialised output layer moves in both heads: the mean through L_simple, the variance
    # (columns of channel 1 in each patch) only through L_vlb.
    kernel = np.asarray(jax.device_get(state.params["net"])["final"]["proj"]["kernel"]).reshape(32, 2, 2, 2)
    assert np.abs(kernel[..., 0]).max() > 1e-4 and np.abs(kernel[..., 1]).max() > 1e-4
    assert np.abs(init["final"]["proj"]["kernel"]).max() == 0
