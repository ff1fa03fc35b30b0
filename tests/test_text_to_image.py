"""task='text_to_image': prompt dropout, the text mask, prompt-conditioned guided sampling and the sample command.
(Resume and the 8-device step are covered for every task by tests/test_tasks.py.)"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.config import ConfigError, apply_overrides
from research.data.text import load_tokenizer, tokenize
from research.diffusion import samplers
from research.sampling import Generator, sampling_schedule, schedule_from_config
from research.tasks import validate_config
from research.tasks.text_to_image import (
    build_text_encoder,
    make_t2i_loss_fn,
    prompt_tokens,
    text_conditioner,
    token_mask,
)
from research.train.loop import train
from tests.factories import make_tiny_t2i_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    config = make_tiny_t2i_config()
    workdir = str(tmp_path_factory.mktemp("t2i") / "run")
    result = train(config, workdir)
    return config, workdir, result


def test_token_mask_keeps_the_caption_through_its_end_token():
    tokenizer = load_tokenizer()
    tokens = tokenize(tokenizer, ["a photo of a coat.", "", "seven"], 12)
    mask = np.asarray(token_mask(jnp.asarray(tokens), tokenizer.eos_token_id))
    lengths = [len(tokenizer("a photo of a coat.", add_special_tokens=False)["input_ids"]), 0, 1]
    for row, n in zip(mask, lengths):
        np.testing.assert_array_equal(row, np.arange(12) <= n + 1)  # start token, n caption tokens, end token


def test_prompt_dropout_conditions_on_the_empty_prompt(run):
    """With dropout probability ~1 every caption becomes the empty prompt: the loss equals the loss of the same
    draw (t, noise, dropout) given the empty prompt's tokens directly and no dropout."""
    config, _, result = run
    from research.shapes import build_network

    unet, encoder = build_network(config), build_text_encoder(config)
    table, empty = prompt_tokens(config, encoder.context_length)
    schedule = schedule_from_config(config.diffusion)
    params = jax.device_get(result["state"].params)
    images = jax.random.uniform(jax.random.PRNGKey(3), (6, 8, 8, 1), minval=-1, maxval=1)
    batch, rng = {"image": images, "label": jnp.arange(6) % 10}, jax.random.PRNGKey(4)
    always = apply_overrides(config, [("diffusion.cond_drop_prob", "0.9999999")])
    never = apply_overrides(config, [("diffusion.cond_drop_prob", "0.0")])
    # Jitted: the eager forward and text encoder take most of a minute on 2 shared cores.
    loss = lambda cfg: jax.jit(make_t2i_loss_fn(unet, encoder, schedule, cfg, table, empty))  # noqa: E731
    dropped, _ = loss(always)(params, batch, rng, {})
    given = {**batch, "tokens": jnp.broadcast_to(jnp.asarray(empty), (6, empty.size))}
    plain = loss(never)
    direct, _ = plain(params, given, rng, {})
    captioned, _ = plain(params, batch, rng, {})
    np.testing.assert_allclose(float(dropped), float(direct), rtol=1e-6)
    assert abs(float(captioned) - float(direct)) > 1e-6  # the caption matters to this (trained) model


def test_guided_prompt_sampling_equals_a_hand_built_guided_sampler(run):
    """Generator with prompts: example i follows prompt labels[i]; guidance s combines the conditional and the
    empty-prompt branch as eps_u + s (eps_c - eps_u); DDIM on the respaced schedule, batch key fold_in(seed, 0)."""
    config, _, result = run
    from research.shapes import build_network

    unet, encoder = build_network(config), build_text_encoder(config)
    table, empty = prompt_tokens(config, encoder.context_length)
    state = result["state"]
    net, text_params = jax.device_get(state.sampling_params("net")), jax.device_get(state.sampling_params("text"))
    labels = np.array([3, 1, 4, 1])
    gen = Generator(
        unet,
        config,
        sampler="ddim",
        steps="5",
        batch_size=4,
        guidance=3.0,
        text=text_conditioner(encoder, text_params, table[:, 0], empty),
    )
    ours, _, nfe = gen.generate(net, 4, seed=7, labels=labels, progress=False)

    cond = encoder.cond(text_params, jnp.asarray(table[labels, 0]))
    null = encoder.cond(text_params, jnp.broadcast_to(jnp.asarray(empty), (4, empty.size)))

    def denoise(x, t, _):
        eps_c = unet.apply({"params": net}, x, t, cond)
        eps_u = unet.apply({"params": net}, x, t, null)
        return eps_u + 3.0 * (eps_c - eps_u)

    schedule = sampling_schedule(schedule_from_config(config.diffusion), "5")
    key = jax.random.fold_in(jax.random.PRNGKey(7), 0)
    theirs = samplers.sample("ddim", denoise, schedule, key, (4, 8, 8, 1), eta=0.0, prediction="eps", clip_x0=True)
    assert nfe == 5
    np.testing.assert_allclose(ours, np.asarray(theirs.samples), atol=2e-5)


def test_sample_command_draws_one_class_prompt_each(run, tmp_path):
    from research.sample import main as sample_main

    config, workdir, _ = run
    out = str(tmp_path / "samples")
    assert sample_main(["--workdir", workdir, "--num", "10", "--steps", "5", "--guidance", "2", "--out", out]) == 0
    (npz,) = [f for f in os.listdir(out) if f.endswith(".npz")]
    data = np.load(os.path.join(out, npz))
    assert data["images"].shape == (10, 8, 8, 1)
    np.testing.assert_array_equal(data["labels"], np.arange(10))
    assert "_cfg2_" in npz


def test_config_errors_name_the_fix(tmp_path):
    def check(overrides, match):
        with pytest.raises(ConfigError, match=match):
            validate_config(apply_overrides(make_tiny_t2i_config(), overrides))

    check([("model.cross_attention_dim", "48")], r"cross_attention_dim=48 but text.width is 32")
    check([("text.output_layer", "-3")], r"text.output_layer=-3; give -1 .. -2")
    check([("data.name", "synthetic")], "needs captions")
    check([("text.encoder", str(tmp_path))], "has no config.json: train a CLIP first")
    os.makedirs(tmp_path / "unet_run")
    with open(tmp_path / "unet_run" / "config.json", "w") as f:
        json.dump({"task": "diffusion"}, f)
    check([("text.encoder", str(tmp_path / "unet_run"))], "is a 'diffusion' run, not a CLIP run")


def test_demo_config_variants():
    """configs/t2i_mnist_fashion.py: the pixel demo U-Net (364,017 parameters: levels 16/32/32, cross-attention at
    7x7 and in the middle block) and the latent one validate; an unknown variant is refused."""
    from research.config import load_config_file
    from research.summary import summarize

    pixel = load_config_file("configs/t2i_mnist_fashion.py:pixel")
    assert not pixel.latent.autoencoder and pixel.model.cross_attention_levels == (False, False, True)
    validate_config(pixel)
    assert summarize(pixel)["params"] == 364_017
    assert load_config_file("configs/t2i_mnist_fashion.py").latent.autoencoder == "runs/vae_mnist_fashion"
    with pytest.raises(ValueError, match="unknown variant"):
        load_config_file("configs/t2i_mnist_fashion.py:pixels")
