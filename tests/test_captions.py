"""Image-caption data: an imagefolder with metadata.jsonl, TFDS caption features, and CLIP trained on such data."""

import json
import os
import types

import jax
import numpy as np
import pytest
from PIL import Image

from research.data import DataError, ImageFolderSource, TfdsSource, get_source, make_train_iterator, read_fields
from tests.factories import make_tiny_clip_config

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _write_folder(root, rows, split=None):
    """Write images (uint8 arrays) and metadata.jsonl rows {file_name, text, ...} into root[/split]."""
    folder = os.path.join(root, split) if split else root
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metadata.jsonl"), "w", encoding="utf-8") as f:
        for row in rows:
            image = row.pop("pixels")
            Image.fromarray(image).save(os.path.join(folder, row["file_name"]))
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return folder


def _digits_rows(images, labels):
    """sklearn's 8x8 digits as PNGs captioned 'a handwritten seven', with their label column."""
    pixels = np.round(np.asarray(images) * (255.0 / 16.0)).astype(np.uint8)
    return [
        {"pixels": p, "file_name": f"{i:04d}.png", "text": f"a handwritten {DIGIT_WORDS[y]}", "label": int(y)}
        for i, (p, y) in enumerate(zip(pixels, labels))
    ]


def test_imagefolder_resizes_crops_and_reads_captions(tmp_path):
    wide = np.tile((np.arange(16, dtype=np.uint8) * 10)[None, :, None], (8, 1, 3))  # 8 x 16, column j = 10 j
    flat = np.full((20, 12, 3), 77, np.uint8)  # any resize of a constant image is that constant
    rows = [
        {"pixels": wide, "file_name": "wide.png", "text": "stripes, left to right", "label": 1},
        {"pixels": flat, "file_name": "flat.png", "text": "grau — überall", "label": 0},
    ]
    _write_folder(str(tmp_path), rows, "train")
    source = ImageFolderSource(str(tmp_path), "train", image_size=8, channels=3)
    assert len(source) == 2 and source.image_shape == (8, 8, 3) and source.num_classes == 2
    first = source[0]
    # The shorter side is already 8: no resampling, and the centre crop keeps columns 4..11.
    np.testing.assert_array_equal(first["image"], wide[:, 4:12])
    assert first["caption"] == "stripes, left to right" and first["label"] == 1
    np.testing.assert_array_equal(source[1]["image"], np.full((8, 8, 3), 77, np.uint8))
    assert source[1]["caption"] == "grau — überall"  # non-ASCII survives the round trip
    gray = ImageFolderSource(str(tmp_path), "train", image_size=8, channels=1)
    assert gray[1]["image"].shape == (8, 8, 1) and int(gray[1]["image"][0, 0, 0]) == 77

    fields = read_fields(source, [1, 0, 1])
    assert fields["image"].shape == (3, 8, 8, 3) and fields["caption"].dtype.kind == "U"
    assert list(fields["caption"]) == ["grau — überall", "stripes, left to right", "grau — überall"]
    np.testing.assert_array_equal(fields["label"], [0, 1, 0])

    # Through the config factory and the training pipeline: captions stay host-side strings, pixels are scaled.
    cfg = dict(name="imagefolder", data_dir=str(tmp_path), image_size=8, channels=3, num_classes=0, centered=True)
    batch = next(make_train_iterator(cfg, global_batch_size=2, seed=0))
    assert sorted(batch["caption"]) == sorted(r["text"] for r in rows)
    assert batch["image"].dtype == np.float32 and batch["image"].min() >= -1 and batch["image"].max() <= 1


def test_imagefolder_errors_name_the_fix(tmp_path):
    base = dict(name="imagefolder", image_size=8, channels=3)
    with pytest.raises(DataError, match="needs data.data_dir"):
        get_source(dict(base, data_dir=""))
    with pytest.raises(DataError, match="no metadata.jsonl for split 'test'"):
        get_source(dict(base, data_dir=str(tmp_path)), "test")
    folder = _write_folder(str(tmp_path), [{"pixels": np.zeros((8, 8, 3), np.uint8), "file_name": "a.png", "txt": "x"}])
    with pytest.raises(DataError, match="no text field 'text'.*data.caption_key"):
        get_source(dict(base, data_dir=str(tmp_path)))
    assert get_source(dict(base, data_dir=str(tmp_path), caption_key="txt"))[0]["caption"] == "x"
    with open(os.path.join(folder, "metadata.jsonl"), "a") as f:
        f.write(json.dumps({"file_name": "missing.png", "txt": "y"}) + "\n")
    with pytest.raises(DataError, match="line 2: image .*missing.png does not exist"):
        get_source(dict(base, data_dir=str(tmp_path), caption_key="txt"))


def test_tfds_caption_feature(monkeypatch):
    """A nested caption feature (COCO's captions/text: several per image, as bytes) gives each example's first
    caption, decoded; a missing feature is named."""
    import tensorflow_datasets as tfds

    records = [
        {
            "image": np.full((4, 4, 3), i, np.uint8),
            "label": i,
            "captions": {"text": np.array(["first of {}".format(i).encode(), b"second"], dtype=object)},
        }
        for i in range(3)
    ]

    class Fake(list):
        dataset_info = types.SimpleNamespace(
            features={
                "image": types.SimpleNamespace(shape=(4, 4, 3)),
                "label": types.SimpleNamespace(num_classes=3),
                "captions": {"text": None},
            }
        )

    monkeypatch.setattr(tfds, "data_source", lambda *a, **k: Fake(records))
    source = TfdsSource("coco_like", "train", caption_key="captions/text")
    assert [source[i]["caption"] for i in range(3)] == ["first of 0", "first of 1", "first of 2"]
    assert source[2]["label"] == 2 and int(source[2]["image"][0, 0, 0]) == 2
    config_source = get_source(dict(name="tfds", tfds_name="coco_like", caption_key="captions/text", image_size=4))
    assert config_source[1]["caption"] == "first of 1"
    with pytest.raises(DataError, match="no caption feature 'captions/title'"):
        TfdsSource("coco_like", "train", caption_key="captions/title")
    assert "caption" not in TfdsSource("coco_like", "train")[0]


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = str(tmp_path_factory.mktemp("captioned_digits"))
    _write_folder(root, _digits_rows(digits.images[:1500], digits.target[:1500]), "train")
    _write_folder(root, _digits_rows(digits.images[1500:1700], digits.target[1500:1700]), "test")
    return root


def test_clip_trains_on_folder_captions(digits_folder, tmp_path):
    """task='clip' on an imagefolder: the batch preparer tokenizes each example's own caption, the loss is CLIP's
    over those (image, caption) pairs, and the periodic check's recall equals one computed from the final weights."""
    from research.data import to_model_range
    from research.data.text import load_tokenizer, tokenize
    from research.metrics.clip import retrieval_recall
    from research.models.clip import clip_loss
    from research.shapes import build_network, init_net_params
    from research.tasks.clip import encoders, make_clip_loss_fn
    from research.train.loop import train

    config = make_tiny_clip_config()
    config.data.name, config.data.data_dir = "imagefolder", digits_folder
    config.clip.shift = 0
    model = build_network(config)
    params = init_net_params(model, config, jax.random.PRNGKey(0))
    tokenizer = load_tokenizer()
    fields = read_fields(get_source(config.data, "test"), np.arange(32))
    images = to_model_range(fields["image"], centered=True)
    tokens = tokenize(tokenizer, list(fields["caption"]), 16)
    assert tokenizer.decode(tokens[3][1 : int(np.argmax(tokens[3] == tokenizer.eos_token_id))]) == fields["caption"][3]
    loss, (accuracy, _) = make_clip_loss_fn(model, config, np.zeros((1, 1, 16), np.int32))(
        params, {"image": images, "label": fields["label"], "tokens": tokens}, jax.random.PRNGKey(1)
    )
    out = model.apply({"params": params}, images, tokens)
    np.testing.assert_allclose(float(loss), float(clip_loss(out["image"], out["text"], out["logit_scale"])), rtol=1e-6)
    sims = np.asarray(out["image"]) @ np.asarray(out["text"]).T
    assert float(accuracy) == pytest.approx(np.mean(np.argmax(sims, axis=1) == np.arange(32)))

    config.train.num_steps, config.train.sample_every, config.clip.eval_num = 10, 10, 100
    config.optim.lr, config.train.batch_size, config.train.ema_decay = 2e-3, 32, 0.0
    result = train(config, str(tmp_path / "run"))
    (row,) = [json.loads(line) for line in open(tmp_path / "run" / "retrieval.jsonl")]
    assert row["step"] == 10 and row["num"] == 100
    test = read_fields(get_source(config.data, "test"), np.arange(100))
    encode_images, encode_tokens = encoders(model)
    final = jax.device_get(result["state"].params["net"])
    expected = retrieval_recall(
        encode_images(final, to_model_range(test["image"], centered=True)),
        encode_tokens(final, tokenize(tokenizer, list(test["caption"]), 16)),
    )
    assert row["i2t@1"] == pytest.approx(expected["i2t@1"]) and row["t2i@5"] == pytest.approx(expected["t2i@5"])
    assert os.path.isfile(tmp_path / "run" / "samples" / "step_0000010.png")


def test_mnist_and_fashion_together_interleave_with_shifted_labels():
    """mnist_fashion: example 2i is MNIST's i with its label, 2i + 1 Fashion-MNIST's i with label + 10; each class
    is captioned with its own data set's templates, the shorter list repeated to the longer one's length."""
    from research.data.text import captions

    both = get_source(dict(name="mnist_fashion", image_size=28, channels=1, num_classes=20), "test")
    mnist = get_source(dict(name="mnist", image_size=28, channels=1), "test")
    fashion = get_source(dict(name="fashion_mnist", image_size=28, channels=1), "test")
    assert len(both) == 20_000 and both.num_classes == 20
    for i in (0, 1, 4321):
        np.testing.assert_array_equal(both[2 * i]["image"], mnist[i]["image"])
        np.testing.assert_array_equal(both[2 * i + 1]["image"], fashion[i]["image"])
        assert both[2 * i]["label"] == mnist[i]["label"] and both[2 * i + 1]["label"] == fashion[i]["label"] + 10
    text = captions("mnist_fashion")
    digit, clothing = captions("mnist"), captions("fashion_mnist")
    width = max(len(digit[0]), len(clothing[0]))
    assert len(text) == 20 and all(len(row) == width for row in text)
    assert text[7][: len(digit[7])] == digit[7] and text[17] == [
        clothing[7][t % len(clothing[7])] for t in range(width)
    ]
