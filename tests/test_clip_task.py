"""task='clip' and the CLIP evaluation commands: the training step's pieces against direct computations, a tiny
captioned-digits run that learns, and the zeroshot / retrieval / probe / clipscore commands against the same numbers
computed by hand (and, for a Hugging Face folder, against transformers)."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.config import ConfigError
from research.data import make_eval_arrays, to_model_range
from research.evaluate import main as evaluate_main
from research.loader import load_run
from research.models.clip import clip_loss
from research.shapes import build_network, init_net_params
from research.tasks import get_task
from research.tasks.clip import caption_tokens, make_clip_loss_fn, random_shift
from research.train import mesh as mesh_lib
from research.train.loop import build_trainer, train
from tests.factories import make_tiny_clip_config


@pytest.fixture(scope="module")
def tiny():
    config = make_tiny_clip_config()
    model = build_network(config)
    params = init_net_params(model, config, jax.random.PRNGKey(0))
    return config, model, params


def test_caption_gather_equals_encoding_every_caption(tiny):
    """With fewer distinct captions than examples the step encodes each caption once and gathers; the loss and its
    gradients equal encoding the batch's captions one by one."""
    config, model, params = tiny
    table = caption_tokens(config)
    assert table.shape[0] * table.shape[1] < 200  # the gather path is taken for this batch
    images = jax.random.uniform(jax.random.PRNGKey(1), (200, 8, 8, 1), minval=-1, maxval=1)
    labels = jnp.arange(200) % 10
    batch, rng = {"image": images, "label": labels}, jax.random.PRNGKey(2)
    loss_fn = make_clip_loss_fn(model, config, table)
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)

    def direct(p):
        template_key, shift_key = jax.random.split(rng)
        index = labels * table.shape[1] + jax.random.randint(template_key, labels.shape, 0, table.shape[1])
        tokens = table.reshape(-1, table.shape[-1])[index]
        out = model.apply({"params": p}, random_shift(images, shift_key, config.clip.shift, -1.0), tokens)
        return clip_loss(out["image"], out["text"], out["logit_scale"])

    ref_loss, ref_grads = jax.value_and_grad(direct)(params)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads, ref_grads)


def test_random_shift_translates_and_fills_with_background():
    x = jnp.arange(2 * 5 * 5, dtype=jnp.float32).reshape(2, 5, 5, 1) + 1
    key = jax.random.PRNGKey(3)
    out = np.asarray(random_shift(x, key, 2, -1.0))
    offsets = np.asarray(jax.random.randint(key, (2, 2), 0, 5))
    for i in range(2):
        padded = np.pad(np.asarray(x[i]), ((2, 2), (2, 2), (0, 0)), constant_values=-1.0)
        dy, dx = offsets[i]
        np.testing.assert_array_equal(out[i], padded[dy : dy + 5, dx : dx + 5])
    assert (offsets != 2).any()  # some example actually moved
    np.testing.assert_array_equal(random_shift(x, key, 0, -1.0), x)


def test_logit_scale_is_clamped_after_every_step():
    config = make_tiny_clip_config()
    trainer = build_trainer(config, mesh_lib.make_mesh(1, jax.devices()[:1]))
    state = trainer.init(jax.random.PRNGKey(0))
    net = dict(state.params["net"])
    net["logit_scale"] = jnp.asarray(6.0)  # above log 100
    state = state.replace(params={"net": net})
    images, labels = make_eval_arrays(config.data, "train", 16)
    batch = {"image": to_model_range(images), "label": labels}
    state, metrics = trainer.step(state, mesh_lib.global_batch(batch, trainer.batch_sharding))
    assert float(state.params["net"]["logit_scale"]) == pytest.approx(math.log(100), abs=1e-6)
    assert float(state.ema_params["net"]["logit_scale"]) <= math.log(100) + 1e-6
    assert float(metrics["logit_scale"]) == pytest.approx(100.0, rel=1e-5)  # the loss used the clamped scale


def test_config_errors_name_the_fix():
    task = get_task("clip")
    config = make_tiny_clip_config()
    config.clip.loss = "siglip"
    with pytest.raises(ConfigError, match="logit_bias_init"):
        task.validate(config)
    config = make_tiny_clip_config()
    config.model.image_size = 16
    with pytest.raises(ConfigError, match="data.image_size"):
        task.validate(config)
    config = make_tiny_clip_config()
    config.data.name = "cifar10"
    with pytest.raises(ConfigError, match="captioned"):
        task.build_trainer(config, mesh_lib.make_mesh(1, jax.devices()[:1]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny CLIP trained on captioned digits (800 steps, under a minute), with the zero-shot check every 200."""
    config = make_tiny_clip_config()
    config.train.num_steps, config.train.batch_size = 800, 64
    config.train.ckpt_every, config.train.log_every, config.train.sample_every = 800, 50, 200
    config.optim.warmup_steps, config.optim.lr_schedule = 40, "cosine"
    config.optim.lr = 3e-3
    config.train.ema_decay = 0.0
    workdir = str(tmp_path_factory.mktemp("clip") / "run")
    train(config, workdir)
    return workdir


def _cli_json(tmp_path, *argv):
    out = str(tmp_path / "result.json")
    assert evaluate_main([*argv, "--json", out]) == 0
    return json.load(open(out))


@pytest.mark.slow
def test_tiny_clip_learns_zero_shot_digits_with_held_out_templates(trained):
    rows = [json.loads(line) for line in open(os.path.join(trained, "zeroshot.jsonl"))]
    assert [r["step"] for r in rows] == [200, 400, 600, 800]
    assert os.path.isfile(os.path.join(trained, "samples", "step_0000800.png"))  # the learning curve
    assert rows[0]["top1"] < rows[-1]["top1"]
    assert rows[-1]["top1"] >= 0.8, rows  # chance is 0.1; the captions at test time were never trained on


@pytest.mark.slow
def test_zeroshot_command_equals_a_direct_computation(trained, tmp_path):
    result = _cli_json(tmp_path, "zeroshot", "--workdir", trained)
    config, model, params, _ = load_run(trained)
    images, labels = make_eval_arrays(config.data, "test")
    img = np.asarray(model.apply({"params": params}, to_model_range(images), method=model.encode_image))
    table = caption_tokens(config, "heldout")
    txt = np.asarray(model.apply({"params": params}, table.reshape(-1, table.shape[-1]), method=model.encode_text))
    txt = txt / np.linalg.norm(txt, axis=-1, keepdims=True)
    classes = txt.reshape(table.shape[0], table.shape[1], -1).mean(axis=1)  # CLIP's prompt ensemble
    classes /= np.linalg.norm(classes, axis=-1, keepdims=True)
    predicted = np.argmax(img @ classes.T, axis=1)
    assert result["num"] == len(images)
    assert result["top1"] == pytest.approx(float(np.mean(predicted == labels)), abs=1e-9)
    # the number the trainer logged on the first eval_num test images is the same computation
    rows = [json.loads(line) for line in open(os.path.join(trained, "zeroshot.jsonl"))]
    first = rows[-1]["num"]
    assert rows[-1]["top1"] == pytest.approx(float(np.mean(predicted[:first] == labels[:first])), abs=1e-9)


@pytest.mark.slow
def test_retrieval_probe_and_clipscore_commands(trained, tmp_path):
    from research.metrics.clip import class_retrieval, linear_probe_result

    config, model, params, _ = load_run(trained)
    images, labels = make_eval_arrays(config.data, "test")
    img = np.asarray(model.apply({"params": params}, to_model_range(images), method=model.encode_image))
    table = caption_tokens(config, "heldout")
    txt = np.asarray(model.apply({"params": params}, table.reshape(-1, table.shape[-1]), method=model.encode_text))
    retrieval = _cli_json(tmp_path, "retrieval", "--workdir", trained)
    expected = class_retrieval(img, labels, txt, np.repeat(np.arange(10), table.shape[1]))
    for key, value in expected.items():
        assert retrieval[key] == pytest.approx(value, abs=1e-9)
    assert retrieval["i2t@1"] > 0.5

    probe = _cli_json(tmp_path, "probe", "--workdir", trained)
    train_images, train_labels = make_eval_arrays(config.data, "train")
    train_img = np.asarray(model.apply({"params": params}, to_model_range(train_images), method=model.encode_image))
    assert probe["accuracy"] == pytest.approx(linear_probe_result(train_img, train_labels, img, labels).accuracy)
    assert probe["accuracy"] > 0.8

    # CLIP score of test digits against captions of their own class and of a wrong class
    npz = str(tmp_path / "samples.npz")
    np.savez(npz, images=images[:100], labels=labels[:100])
    right = _cli_json(tmp_path, "clipscore", "--samples", npz, "--clip", trained, "--template", "a photo of a {}.")
    np.savez(npz, images=images[:100], labels=(labels[:100] + 5) % 10)
    wrong = _cli_json(tmp_path, "clipscore", "--samples", npz, "--clip", trained, "--template", "a photo of a {}.")
    from research.data.text import class_names, load_tokenizer, tokenize

    names = class_names("digits")
    tokens = tokenize(load_tokenizer(), [f"a photo of a {names[y]}." for y in labels[:100]], 16)
    t = np.asarray(model.apply({"params": params}, tokens, method=model.encode_text))
    cos = np.sum(img[:100] * t, axis=1) / np.linalg.norm(img[:100], axis=1) / np.linalg.norm(t, axis=1)
    assert right["clip_score"] == pytest.approx(float(np.mean(100 * np.maximum(cos, 0))), rel=1e-5)
    assert right["clip_score"] > wrong["clip_score"]


def test_clipscore_of_a_hugging_face_folder_equals_transformers(tmp_path):
    """A local transformers CLIPModel folder: our preprocessing equals CLIPImageProcessor's, and the CLIP score
    equals the one computed with transformers' features."""
    import shutil

    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from research.evaluate_clip import OPENAI_MEAN, OPENAI_STD, preprocess_for_clip

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            vocab_size=49408,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    theirs = CLIPModel(config).eval()
    folder = tmp_path / "hf_clip"
    theirs.save_pretrained(folder, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(os.environ["RESEARCH_DATA_DIR"], "clip", name), folder / name)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 28, 28, 1), dtype=np.uint8)
    prompts = ["a photo of a cat.", "a drawing of a seven.", "dog", "the digit 3.", "a sneaker", "a coat."]
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pixel_values = processor(images=[np.repeat(i, 3, axis=-1) for i in images], return_tensors="np")["pixel_values"]
    ours = preprocess_for_clip(images, 32, OPENAI_MEAN, OPENAI_STD)
    # The same resize and crop; transformers rounds the resized image once more, so a few pixels (0.2% here)
    # differ by one grey level out of 255.
    levels = np.abs(ours - pixel_values.transpose(0, 2, 3, 1)) * np.asarray(OPENAI_STD) * 255
    assert levels.max() < 1.001 and (levels > 1e-3).mean() < 0.01

    npz = str(tmp_path / "samples.npz")
    np.savez(npz, images=images, prompts=np.array(prompts))
    result = _cli_json(tmp_path, "clipscore", "--samples", npz, "--clip", str(folder))
    from transformers import CLIPTokenizer

    ids = CLIPTokenizer.from_pretrained(str(folder))(prompts, padding="max_length", max_length=16, truncation=True)
    with torch.no_grad():
        img = theirs.get_image_features(pixel_values=torch.from_numpy(pixel_values))
        txt = theirs.get_text_features(input_ids=torch.tensor(ids["input_ids"]))
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        cos = torch.nn.functional.cosine_similarity(img, txt).numpy()
    assert result["clip_score"] == pytest.approx(float(np.mean(100 * np.maximum(cos, 0))), rel=1e-3, abs=1e-3)


def test_decay_matrices_only_spares_gains_biases_and_scalars():
    """optim.decay_matrices_only (CLIP's recipe): AdamW's decoupled decay reaches matrices and embeddings only."""
    from research.config import base_config
    from research.train.state import make_optimizer

    optim = base_config().optim
    optim.optimizer, optim.lr, optim.weight_decay, optim.warmup_steps, optim.grad_clip = "adamw", 0.1, 0.5, 0, 0.0
    params = {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,)), "logit_scale": jnp.ones(())}
    zero = jax.tree.map(jnp.zeros_like, params)
    for only, expected in ((True, {"kernel": 0.95, "bias": 1.0, "logit_scale": 1.0}), (False, None)):
        optim.decay_matrices_only = only
        tx = make_optimizer(optim, 10)
        updates, _ = tx.update(zero, tx.init(params), params)
        new = jax.tree.map(lambda p, u: p + u, params, updates)
        for name, value in (expected or {k: 0.95 for k in params}).items():
            np.testing.assert_allclose(new[name], value, rtol=1e-6)
