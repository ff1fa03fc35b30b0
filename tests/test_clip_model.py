"""CLIP in Flax against transformers' CLIPModel / CLIPTextModel (random small models saved with save_pretrained and
loaded without torch), parameter counts of the released architectures, the converter's errors, and the CLIP /
SigLIP losses against naive numpy, on one device and batch-sharded over eight."""

import hashlib
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors.numpy import load_file, save_file
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

from research.models import build_model
from research.models.clip import (
    CLIP,
    CLIPTextTransformer,
    clamp_logit_scale,
    clip_loss,
    count_params,
    named_architecture,
    siglip_loss,
    text_tower_fields,
)
from research.models.registry import check_input_shape
from research.pretrained.convert_clip import (
    ConversionError,
    load_hf_clip,
    load_hf_clip_text,
    main,
    read_hf_folder,
)

TEXT = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=1000,
    max_position_embeddings=16,
)
VISION = dict(
    hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)
BOS, EOS = 998, 999


def _tokens():
    """[4, 16]: padded by EOS, padded by 0, full length, and an early EOS followed by EOS padding."""
    rng = np.random.default_rng(0)
    t = rng.integers(1, 997, (4, 16))
    t[:, 0] = BOS
    t[0, 6:] = EOS
    t[1, 9], t[1, 10:] = EOS, 0
    t[2, 15] = EOS
    t[3, 2:] = EOS
    return t


def _images():
    return np.random.default_rng(1).normal(size=(3, 32, 32, 3)).astype(np.float32)


def _hf_clip(tmp_path_factory, name, act, eos):
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(TEXT, hidden_act=act, eos_token_id=eos, bos_token_id=BOS, pad_token_id=0),
        vision_config=dict(VISION, hidden_act=act),
        projection_dim=24,
    )
    model = CLIPModel(config).eval()
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder, safe_serialization=True)
    fields, params = load_hf_clip(str(folder))
    return model, folder, fields, params


@pytest.fixture(
    scope="module", params=[("quick_gelu", EOS), ("gelu", 2)], ids=["quick_gelu-first_eos", "gelu-legacy_eos2"]
)
def hf_clip(request, tmp_path_factory):
    act, eos = request.param
    return _hf_clip(tmp_path_factory, f"clip_{act}", act, eos)


@pytest.fixture(scope="module")
def hf_text(tmp_path_factory):
    torch.manual_seed(1)
    model = CLIPTextModel(CLIPTextConfig(**TEXT, eos_token_id=EOS, bos_token_id=BOS, pad_token_id=0)).eval()
    folder = tmp_path_factory.mktemp("clip_text")
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


def _text_apply(fields, params, tokens, output_layer=-1):
    module = CLIPTextTransformer(**fields)
    return jax.jit(lambda p, t: module.apply({"params": p}, t, output_layer=output_layer))(params, tokens)


# --- parity with transformers ---------------------------------------------------------------------------------------


def test_features_match_transformers(hf_clip):
    model, _, fields, params = hf_clip
    tokens, images = _tokens(), _images()
    ours = CLIP(**fields)
    out = jax.jit(lambda p, x, t: ours.apply({"params": p}, x, t))(params, images, tokens)
    with torch.no_grad():
        ref_image = model.get_image_features(torch.from_numpy(images.transpose(0, 3, 1, 2))).pooler_output.numpy()
        ref_text = model.get_text_features(torch.from_numpy(tokens)).pooler_output.numpy()
        ref = model.text_model(torch.from_numpy(tokens))
    np.testing.assert_allclose(np.asarray(out["image"]), ref_image, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out["text"]), ref_text, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(float(out["logit_scale"]), model.logit_scale.item(), rtol=1e-7)
    assert out["logit_bias"] is None

    hidden, pooled = _text_apply(text_tower_fields(fields), params["text"], tokens)
    np.testing.assert_allclose(np.asarray(hidden), ref.last_hidden_state.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(pooled), ref.pooler_output.numpy(), atol=1e-5, rtol=1e-5)
    # The pooling position matters: the first EOS, not the last (rows 0 and 3 are padded by EOS).
    last_eos = np.asarray(hidden)[np.arange(4), 15]
    assert np.abs(last_eos[[0, 3]] - np.asarray(pooled)[[0, 3]]).max() > 1e-2


def test_penultimate_layer_is_hidden_states_minus_2_through_final_norm(hf_clip):
    model, _, fields, params = hf_clip
    tokens = _tokens()
    hidden, _ = _text_apply(text_tower_fields(fields), params["text"], tokens, output_layer=-2)
    with torch.no_grad():
        ref = model.text_model(torch.from_numpy(tokens), output_hidden_states=True)
        expected = model.text_model.final_layer_norm(ref.hidden_states[-2]).numpy()
    np.testing.assert_allclose(np.asarray(hidden), expected, atol=1e-5, rtol=1e-5)
    assert np.abs(expected - ref.last_hidden_state.numpy()).max() > 1e-2


def test_text_model_folder_with_and_without_prefix(hf_text, tmp_path):
    model, folder = hf_text
    tokens = _tokens()
    fields, params = load_hf_clip_text(str(folder))
    hidden, pooled = _text_apply(fields, params, tokens)
    with torch.no_grad():
        ref = model(torch.from_numpy(tokens))
    np.testing.assert_allclose(np.asarray(hidden), ref.last_hidden_state.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(pooled), ref.pooler_output.numpy(), atol=1e-5, rtol=1e-5)

    # Stable Diffusion's text_encoder files (and transformers < 5.6) prefix every key with `text_model.`.
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    assert not any(k.startswith("text_model.") for k in tensors)
    save_file({"text_model." + k: v for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    shutil.copy(os.path.join(folder, "config.json"), tmp_path / "config.json")
    _, prefixed = load_hf_clip_text(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, prefixed, params)


def test_sharded_bf16_folders_and_sha256(hf_clip, tmp_path):
    model, folder, fields, params = hf_clip
    folder_read = read_hf_folder(str(folder))
    with open(os.path.join(folder, "model.safetensors"), "rb") as f:
        assert folder_read.sha256 == hashlib.sha256(f.read()).hexdigest()

    model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    sharded = read_hf_folder(str(tmp_path / "sharded"))
    assert len(sharded.files) > 1
    fields2, params2 = load_hf_clip(sharded)
    assert fields2 == fields
    jax.tree.map(np.testing.assert_array_equal, params2, params)

    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", safe_serialization=True)
    model.to(torch.float32)
    _, params_bf16 = load_hf_clip(str(tmp_path / "bf16"))
    expected = model.vision_model.encoder.layers[1].mlp.fc1.weight.detach().to(torch.bfloat16).float().numpy().T
    np.testing.assert_array_equal(params_bf16["vision"]["block_1"]["fc1"]["kernel"], expected)
    assert not np.array_equal(expected, params["vision"]["block_1"]["fc1"]["kernel"])


# --- parameter counts -------------------------------------------------------------------------------------------------


def _our_count(name):
    fields = named_architecture(name)
    model = CLIP(**fields)
    images = jax.ShapeDtypeStruct((1, fields["image_size"], fields["image_size"], 3), jnp.float32)
    tokens = jax.ShapeDtypeStruct((1, fields["context_length"]), jnp.int32)
    return count_params(jax.eval_shape(lambda x, t: model.init(jax.random.PRNGKey(0), x, t), images, tokens)["params"])


def _hf_count(config):
    with torch.device("meta"):
        return sum(p.numel() for p in CLIPModel(config).parameters())


def test_parameter_counts_equal_transformers():
    # transformers' CLIPConfig defaults are OpenAI's ViT-B/32.
    assert _our_count("ViT-B/32") == _hf_count(CLIPConfig()) == 151_277_313
    large = CLIPConfig(
        text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12),
        vision_config=dict(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14
        ),
        projection_dim=768,
    )
    assert _our_count("ViT-L/14") == _hf_count(large) == 427_616_513
    b16 = CLIPConfig(vision_config=dict(patch_size=16))
    assert _our_count("ViT-B/16") == _hf_count(b16)


def test_tiny_architecture_through_the_registry():
    fields = named_architecture("tiny")
    model = build_model(dict(name="clip", **fields, dtype="float32"), out_channels=1)
    assert isinstance(model, CLIP)
    images = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)
    tokens = jax.ShapeDtypeStruct((2, fields["context_length"]), jnp.int32)
    key = jax.random.PRNGKey(0)
    # Shapes only: compiling the full initialiser takes seconds; the parity tests run the real computation.
    out, variables = jax.eval_shape(lambda x, t: model.init_with_output(key, x, t), images, tokens)
    assert out["image"].shape == out["text"].shape == (2, 128)
    assert out["logit_bias"] is None and "logit_bias" not in variables["params"]
    # logit_scale is created in setup, so an initialiser that only reads it is cheap and gives its initial value.
    scale = model.init(key, method=lambda m: m.logit_scale)["params"]["logit_scale"]
    np.testing.assert_allclose(math.exp(float(scale)), 1 / 0.07, rtol=1e-6)
    check_input_shape(dict(name="clip", **fields), (28, 28, 1))
    with pytest.raises(ValueError, match="not divisible by model.patch_size=5"):
        check_input_shape(dict(name="clip", **{**fields, "patch_size": 5}), (28, 28, 1))
    with pytest.raises(ValueError, match="32x32 but model.image_size=28"):
        check_input_shape(dict(name="clip", **fields), (32, 32, 1))
    siglip = CLIP(**fields, logit_scale_init=math.log(10), logit_bias_init=-10.0)
    out = jax.eval_shape(lambda x, t: siglip.init_with_output(key, x, t), images, tokens)[0]
    assert out["logit_bias"].shape == out["logit_scale"].shape == ()
    bias = siglip.init(key, method=lambda m: m.logit_bias)["params"]["logit_bias"]
    assert float(bias) == -10.0


# --- converter errors and CLI -----------------------------------------------------------------------------------------


def _edited_copy(folder, dest, edit):
    os.makedirs(dest)
    shutil.copy(os.path.join(folder, "config.json"), os.path.join(dest, "config.json"))
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dest, "model.safetensors"))
    return str(dest)


def _one_line_error(folder, *parts):
    with pytest.raises(ConversionError) as info:
        load_hf_clip(folder)
    message = str(info.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, message


def test_conversion_errors_name_the_tensor(hf_text, tmp_path):
    folder = hf_text[1]
    with open(os.path.join(folder, "config.json")) as f:
        text_config = json.load(f)
    torch.manual_seed(0)
    clip_folder = tmp_path / "clip"
    CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=24)).save_pretrained(clip_folder)
    name = "vision_model.encoder.layers.1.mlp.fc1.weight"
    _one_line_error(_edited_copy(clip_folder, tmp_path / "missing", lambda t: t.pop(name)), repr(name), "missing")
    wrong = _edited_copy(clip_folder, tmp_path / "shape", lambda t: t.update({name: np.zeros((80, 47), np.float32)}))
    _one_line_error(wrong, repr(name), "(80, 47)", "(80, 48)")
    extra = _edited_copy(clip_folder, tmp_path / "extra", lambda t: t.update({"foo.weight": np.zeros(2, np.float32)}))
    _one_line_error(extra, "foo.weight", "does not use")
    os.makedirs(tmp_path / "noconfig")
    _one_line_error(str(tmp_path / "noconfig"), "config.json is missing")
    _one_line_error(str(folder), "not a CLIPModel")
    assert text_config["model_type"] == "clip_text_model"


def test_main_prints_count_and_sha256(hf_text, capsys):
    model, folder = hf_text
    assert main(["--hf", str(folder)]) == 0
    printed = capsys.readouterr().out
    assert f"{sum(p.numel() for p in model.parameters()):,} parameters" in printed
    assert read_hf_folder(str(folder)).sha256 in printed
    assert main(["--hf", str(folder) + "-absent"]) == 2
    assert "not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["-h"])
    assert info.value.code == 0 and "--hf" in capsys.readouterr().out


# --- losses -----------------------------------------------------------------------------------------------------------


def _naive_clip_loss(img, txt, scale):
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    logits = np.exp(min(scale, np.log(100))) * img @ txt.T
    b = len(img)
    i2t = -np.mean([logits[i, i] - np.log(np.sum(np.exp(logits[i]))) for i in range(b)])
    t2i = -np.mean([logits[i, i] - np.log(np.sum(np.exp(logits[:, i]))) for i in range(b)])
    return 0.5 * (i2t + t2i)


def _naive_siglip_loss(img, txt, scale, bias):
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    total = 0.0
    for i in range(len(img)):
        for j in range(len(txt)):
            z = (1.0 if i == j else -1.0) * (np.exp(scale) * img[i] @ txt[j] + bias)
            total += np.log(1 / (1 + np.exp(-z)))
    return -total / len(img)


def _embeddings(b=6, d=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(b, d)), rng.normal(size=(b, d))


def test_clip_loss_matches_numpy_and_clamps_at_100():
    img, txt = _embeddings()
    for scale in (math.log(1 / 0.07), 1.3):
        np.testing.assert_allclose(float(clip_loss(img, txt, scale)), _naive_clip_loss(img, txt, scale), rtol=1e-5)
    above = float(clip_loss(img, txt, 6.0))
    np.testing.assert_allclose(above, _naive_clip_loss(img, txt, math.log(100)), rtol=1e-5)
    assert float(jax.grad(clip_loss, argnums=2)(jnp.asarray(img), jnp.asarray(txt), 6.0)) == 0.0
    clamped = clamp_logit_scale({"params": {"logit_scale": jnp.float32(6.0), "w": 1}})
    np.testing.assert_allclose(float(clamped["params"]["logit_scale"]), math.log(100), rtol=1e-6)
    assert float(clamp_logit_scale({"logit_scale": jnp.float32(-1.0)})["logit_scale"]) == 0.0


def test_siglip_loss_matches_numpy_loop():
    img, txt = _embeddings(seed=1)
    for scale, bias in ((math.log(10), -10.0), (0.5, 1.5)):
        np.testing.assert_allclose(
            float(siglip_loss(img, txt, scale, bias)), _naive_siglip_loss(img, txt, scale, bias), rtol=1e-5
        )


def test_losses_sharded_over_eight_devices_equal_one_device():
    devices = jax.devices()
    assert len(devices) == 8
    img, txt = (jnp.asarray(x, jnp.float32) for x in _embeddings(b=16, d=8, seed=2))
    sharding = NamedSharding(Mesh(np.array(devices), ("data",)), PartitionSpec("data"))
    single = jax.sharding.SingleDeviceSharding(devices[0])
    losses = {
        "clip": lambda a, b: clip_loss(a, b, jnp.float32(math.log(1 / 0.07))),
        "siglip": lambda a, b: siglip_loss(a, b, jnp.float32(math.log(10)), jnp.float32(-10.0)),
    }
    for name, loss in losses.items():
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        one = fn(jax.device_put(img, single), jax.device_put(txt, single))
        a, b = jax.device_put(img, sharding), jax.device_put(txt, sharding)
        assert len(a.addressable_shards) == 8 and a.addressable_shards[0].data.shape == (2, 8)
        many = fn(a, b)
        np.testing.assert_allclose(float(many[0]), float(one[0]), rtol=1e-6, err_msg=name)
        for g_many, g_one in zip(many[1], one[1]):
            np.testing.assert_allclose(np.asarray(g_many), np.asarray(g_one), atol=1e-6, err_msg=name)
