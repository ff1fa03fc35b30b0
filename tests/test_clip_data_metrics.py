"""Captions and tokens for CLIP on MNIST / Fashion-MNIST, and the CLIP metrics against brute-force references.

The tokenizer reference is transformers' CLIPTokenizer itself (its own padding and truncation); the metrics are
checked against naive per-example loops on random embeddings with planted matches and exact ties."""

import json
import os
import shutil

import numpy as np
import pytest

from research.data.sources import DataError
from research.data.text import (
    caption_table,
    caption_templates,
    captions,
    class_names,
    load_tokenizer,
    tokenize,
)
from research.metrics.clip import (
    clip_score,
    embed_in_batches,
    linear_probe,
    linear_probe_result,
    mean_clip_score,
    retrieval_recall,
    retrieval_recall_multi,
    zeroshot_accuracy,
    zeroshot_classifier,
)

CLIP_DIR = os.path.join(os.environ.get("RESEARCH_DATA_DIR", "/work/shared/data"), "clip")
DATASETS = ("mnist", "fashion_mnist")

SHORT = ["a photo of a cat", "A handwritten SEVEN.", "", "an ankle boot, a type of clothing!"]
LONG = [
    "a very long caption " * 30,
    "the digit seven written in blue ink on lined paper, slightly rotated, " * 8,
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(CLIP_DIR)


@pytest.fixture(scope="module")
def pad0_tokenizer(tmp_path_factory):
    """An OpenCLIP-style folder (SD 2.x): same vocabulary, pad token '!' (id 0)."""
    folder = tmp_path_factory.mktemp("openclip_tokenizer")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(CLIP_DIR, name), folder / name)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps({**special, "pad_token": "!"}))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({**special, "pad_token": "!", "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"})
    )
    return load_tokenizer(str(folder))


def _reference_tokens(tok, texts, length):
    return np.asarray(tok(texts, padding="max_length", truncation=True, max_length=length)["input_ids"], np.int32)


@pytest.mark.parametrize("length", [77, 16])
def test_tokenize_matches_tokenizer_padding_and_truncation(tokenizer, pad0_tokenizer, length):
    assert tokenizer.pad_token_id == 49407 and pad0_tokenizer.pad_token_id == 0
    for tok in (tokenizer, pad0_tokenizer):
        texts = SHORT + LONG
        ours = tokenize(tok, texts, length)
        assert ours.dtype == np.int32 and ours.shape == (len(texts), length)
        np.testing.assert_array_equal(ours, _reference_tokens(tok, texts, length))
        # The layout itself: start token first, end token right after the text (last position when cut).
        assert (ours[:, 0] == 49406).all()
        assert (ours[len(SHORT) :, -1] == 49407).all()
    cat = tokenize(tokenizer, "a photo of a cat", 10)
    np.testing.assert_array_equal(cat[0], [49406, 320, 1125, 539, 320, 2368, 49407, 49407, 49407, 49407])
    np.testing.assert_array_equal(tokenize(pad0_tokenizer, "a photo of a cat", 10)[0, 6:], [49407, 0, 0, 0])


def test_load_tokenizer_cache_and_errors(tmp_path, monkeypatch):
    assert load_tokenizer(CLIP_DIR) is load_tokenizer(CLIP_DIR + "/")
    monkeypatch.setenv("RESEARCH_DATA_DIR", os.path.dirname(CLIP_DIR))
    assert load_tokenizer() is load_tokenizer(CLIP_DIR)
    with pytest.raises(DataError, match=r"lacks vocab.json, merges.txt.*RESEARCH_DATA_DIR"):
        load_tokenizer(str(tmp_path))
    monkeypatch.delenv("RESEARCH_DATA_DIR")
    with pytest.raises(DataError, match=r"set \$RESEARCH_DATA_DIR"):
        load_tokenizer()


def test_templates_and_class_names():
    assert class_names("mnist")[7] == "seven" and len(class_names("mnist")) == 10
    assert class_names("fashion_mnist") == (
        "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
    )  # fmt: skip
    for dataset in DATASETS:
        train, heldout = caption_templates(dataset, "train"), caption_templates(dataset, "heldout")
        assert len(train) >= 12 and 5 <= len(heldout) <= 8
        assert len(set(train)) == len(train) and len(set(heldout)) == len(heldout)
        assert not set(train) & set(heldout)
        # Disjoint as filled-in captions too, and every caption names its class (word or numeral).
        train_caps, heldout_caps = captions(dataset, "train"), captions(dataset, "heldout")
        assert not {c for row in train_caps for c in row} & {c for row in heldout_caps for c in row}
        for c, name in enumerate(class_names(dataset)):
            for caption in train_caps[c] + heldout_caps[c]:
                assert name in caption or (dataset == "mnist" and str(c) in caption), caption
    assert captions("mnist", "train")[3][caption_templates("mnist").index("the digit {digit}.")] == "the digit 3."
    with pytest.raises(DataError, match="captions exist for"):
        class_names("cifar100")
    with pytest.raises(DataError, match="split must be one of"):
        caption_templates("mnist", "test")


@pytest.mark.parametrize("dataset", DATASETS)
def test_caption_table(tokenizer, pad0_tokenizer, dataset):
    for split in ("train", "heldout"):
        texts = captions(dataset, split)
        table = caption_table(tokenizer, dataset, split, 32)
        assert table.dtype == np.int32 and table.shape == (10, len(caption_templates(dataset, split)), 32)
        flat = [t for row in texts for t in row]
        np.testing.assert_array_equal(table.reshape(-1, 32), _reference_tokens(tokenizer, flat, 32))
    # A decoded entry: class 9, template 0 (the tokenizer lower-cases and splits punctuation).
    entry = caption_table(pad0_tokenizer, dataset, "train", 24)[9, 0]
    decoded = pad0_tokenizer.decode(entry[entry != 0], skip_special_tokens=True)
    expected = {"mnist": "a handwritten nine.", "fashion_mnist": "a photo of a ankle boot."}[dataset]
    assert decoded.replace(" ", "") == expected.replace(" ", "")
    assert entry[0] == 49406 and entry[-1] == 0
    with pytest.raises(DataError, match="raise the text context length"):
        caption_table(tokenizer, dataset, "train", 8)


def test_zeroshot_classifier_equals_naive_loop():
    rng = np.random.default_rng(0)
    text = rng.normal(size=(5, 7, 16)) * rng.uniform(0.1, 10, size=(5, 7, 1))
    ours = zeroshot_classifier(text)
    for c in range(5):
        acc = np.zeros(16)
        for t in range(7):
            acc += text[c, t] / np.sqrt(np.sum(text[c, t] ** 2))
        acc /= 7
        np.testing.assert_allclose(ours[c], acc / np.sqrt(np.sum(acc**2)), rtol=1e-5, atol=1e-6)


def _naive_topk(images, labels, classes, k):
    hits = 0
    for x, y in zip(images, labels):
        scores = [float(np.dot(x, c)) for c in classes]
        rivals = sum(1 for j, s in enumerate(scores) if j != y and s >= scores[y])
        hits += rivals < k
    return hits / len(images)


def _exact_cosine_rivals(images, labels, classes):
    """Per image, with integer vectors and exact integer arithmetic: how many other classes have a strictly
    higher cosine, and how many an equal one. cos_j >= cos_y  <=>  d_j / |c_j| >= d_y / |c_y| (d = dot product)."""
    images, classes = images.astype(np.int64), classes.astype(np.int64)
    norms = [int(c @ c) for c in classes]

    def compare(dj, nj, dy, ny):  # sign of d_j / sqrt(n_j) - d_y / sqrt(n_y)
        if (dj >= 0) != (dy >= 0):
            return 1 if dj >= 0 else -1
        squares = int(np.sign(dj * dj * ny - dy * dy * nj))  # the sign for two non-negative sides
        return squares if dj >= 0 else -squares

    better, equal = np.zeros(len(images), int), np.zeros(len(images), int)
    for i, (x, y) in enumerate(zip(images, labels)):
        dots = [int(x @ c) for c in classes]
        signs = [compare(dots[j], norms[j], dots[y], norms[y]) for j in range(len(classes)) if j != y]
        better[i], equal[i] = signs.count(1), signs.count(0)
    return better, equal


def test_zeroshot_accuracy_against_brute_force():
    rng = np.random.default_rng(1)
    # Small integers: every dot product is exact, so the planted ties are ties in any summation order.
    classes = rng.integers(-3, 4, size=(10, 8)).astype(np.float64)
    classes[3] = classes[2]  # classes 2 and 3 tie for every image
    labels = rng.integers(0, 10, size=300)
    images = classes[labels] + rng.integers(-6, 7, size=(300, 8))
    ours = zeroshot_accuracy(images, labels, classes, ks=(1, 5), normalize=False)
    for k in (1, 5):
        assert ours[f"top{k}"] == pytest.approx(_naive_topk(images, labels, classes, k))
    assert 0.2 < ours["top1"] < ours["top5"] < 1
    # A tie with the right class is a miss: images of class 2 or 3 are never top-1 correct.
    tied = np.isin(labels, [2, 3])
    assert zeroshot_accuracy(images[tied], labels[tied], classes, normalize=False)["top1"] == 0.0
    # Cosine ranking (the default) against exact integer arithmetic. Cosines that are mathematically equal (the
    # planted pair, or two distinct integer vectors) may differ in the last bit in floating point, and which way
    # depends on the BLAS kernel; so the exact ranking brackets the result: ties as misses <= ours <= ties as hits.
    cos = zeroshot_accuracy(images, labels, classes, ks=(1, 3))
    assert set(cos) == {"top1", "top3"}
    distinct = np.delete(classes, 3, axis=0)
    keep = labels != 3
    sub_images, sub_labels = images[keep], np.where(labels[keep] > 3, labels[keep] - 1, labels[keep])
    better, equal = _exact_cosine_rivals(sub_images, sub_labels, distinct)
    assert equal.sum() > 0  # the data holds mathematically equal cosines of distinct classes
    ours = zeroshot_accuracy(sub_images, sub_labels, distinct, ks=(1, 3))
    for k in (1, 3):
        worst, best = np.mean(better + equal < k), np.mean(better < k)
        assert best - worst < 0.01 and worst <= ours[f"top{k}"] <= best
    # Fewer classes than k: no top-5.
    assert set(zeroshot_accuracy(images[:5], labels[:5] % 3, classes[:3])) == {"top1"}


def _naive_recall(images, texts, owner, k):
    """Per image: rank of its best caption among the non-matching ones; per text: rank of its image."""
    sim = np.array([[float(np.dot(i, t)) for t in texts] for i in images])
    i2t, t2i = [], []
    for i in sorted(set(owner.tolist())):
        best = max(sim[i, j] for j in range(len(texts)) if owner[j] == i)
        i2t.append(sum(1 for j in range(len(texts)) if owner[j] != i and sim[i, j] >= best) < k)
    for j in range(len(texts)):
        own = sim[owner[j], j]
        t2i.append(sum(1 for i in range(len(images)) if i != owner[j] and sim[i, j] >= own) < k)
    return np.mean(i2t), np.mean(t2i)


def test_retrieval_recall_against_brute_force(monkeypatch):
    import research.metrics.clip as clip_metrics

    monkeypatch.setattr(clip_metrics, "_ROW_CHUNK", 17)  # several row chunks, one partial
    rng = np.random.default_rng(2)
    n = 60
    images = rng.integers(-3, 4, size=(n, 6)).astype(np.float64)
    texts = images + rng.integers(-3, 4, size=(n, 6))  # planted matches, blurred
    images[5] = images[4]  # images 4 and 5 tie for every text
    texts[9] = texts[8]
    ours = retrieval_recall(images, texts, ks=(1, 5), normalize=False)
    for k in (1, 5):
        i2t, t2i = _naive_recall(images, texts, np.arange(n), k)
        assert ours[f"i2t@{k}"] == pytest.approx(i2t) and ours[f"t2i@{k}"] == pytest.approx(t2i)
    assert 0.1 < ours["t2i@1"] < ours["t2i@5"] < 1
    # Several captions per image; image 0 has none (skipped on the image->text side).
    owner = rng.integers(1, n, size=150)
    many = images[owner] + rng.integers(-4, 5, size=(150, 6))
    multi = retrieval_recall_multi(images, many, owner, ks=(1, 5), normalize=False)
    for k in (1, 5):
        i2t, t2i = _naive_recall(images, many, owner, k)
        assert multi[f"i2t@{k}"] == pytest.approx(i2t) and multi[f"t2i@{k}"] == pytest.approx(t2i)
    # Cosine (default) is invariant to rescaling the rows; a collapsed encoder retrieves nothing.
    scaled = retrieval_recall(images[:40] * rng.uniform(0.5, 3, (40, 1)), texts[:40] * 7.0)
    assert scaled == retrieval_recall(images[:40], texts[:40])
    collapsed = retrieval_recall(np.ones((20, 4)), np.ones((20, 4)), ks=(1, 19, 20))
    assert collapsed == {"i2t@1": 0.0, "t2i@1": 0.0, "i2t@19": 0.0, "t2i@19": 0.0, "i2t@20": 1.0, "t2i@20": 1.0}


def test_linear_probe_separable_and_random():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(16, 4))

    centres = 6 * w.T / np.linalg.norm(w, axis=0)[:, None]  # 4 classes, pairwise >= ~6 apart in 16-D

    def separable(n):
        y = rng.integers(0, 4, size=n)
        x = centres[y] + rng.normal(size=(n, 16))
        return x * np.arange(1, 17) + 10, y  # unstandardized features: the probe standardizes

    xtr, ytr = separable(400)
    xte, yte = separable(200)
    result = linear_probe_result(xtr, ytr, xte, yte, c_values=(0.01, 1.0, 100.0))
    assert result.accuracy >= 0.99 and set(result.val_accuracy) == {0.01, 1.0, 100.0}
    best = max(result.val_accuracy.values())
    assert result.C == min(c for c, acc in result.val_accuracy.items() if acc == best)  # ties: strongest regulariser
    assert linear_probe(xtr, ytr, xte, yte, c_values=(0.01, 1.0, 100.0)) == result.accuracy  # deterministic
    random_labels = rng.integers(0, 4, size=200)
    chance = linear_probe(xtr, rng.integers(0, 4, size=400), xte, random_labels, c_values=(0.01, 1.0))
    assert 0.1 < chance < 0.4


def test_clip_score_against_naive_and_torchmetrics_formula():
    rng = np.random.default_rng(4)
    img, txt = rng.normal(size=(50, 12)), rng.normal(size=(50, 12))
    naive = [100 * max(float(np.dot(a, b)) / (np.linalg.norm(a) * np.linalg.norm(b)), 0.0) for a, b in zip(img, txt)]
    np.testing.assert_allclose(clip_score(img, txt), naive, rtol=1e-5, atol=1e-4)
    assert (clip_score(img, txt) == 0).sum() > 10  # random pairs: many negative cosines clamped
    assert mean_clip_score(img, txt) == pytest.approx(np.mean(naive), rel=1e-5)

    def torchmetrics_clip_score(image_features, text_features):
        # torchmetrics.functional.multimodal.clip_score: normalise, 100 * cosine, mean, then clamp the mean.
        image_features = image_features / np.linalg.norm(image_features, axis=-1, keepdims=True)
        text_features = text_features / np.linalg.norm(text_features, axis=-1, keepdims=True)
        score = 100 * (image_features * text_features).sum(axis=-1)
        return max(score.mean(0), 0.0)

    aligned = img + 0.5 * rng.normal(size=img.shape)  # all cosines positive: the two definitions agree
    assert (clip_score(img, aligned) > 0).all()
    assert mean_clip_score(img, aligned) == pytest.approx(torchmetrics_clip_score(img, aligned), rel=1e-5)
    assert mean_clip_score(img, txt) > torchmetrics_clip_score(img, txt)  # per-pair clamp vs clamp of the mean


def test_embed_in_batches_pads_last_batch():
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(5)
    proj = jnp.asarray(rng.normal(size=(3 * 4 * 1, 6)), jnp.float32)  # stand-in image encoder: a linear map
    shapes = []

    @jax.jit
    def encode(images):
        return images.reshape(images.shape[0], -1) @ proj

    def fn(images):
        shapes.append(images.shape)
        return encode(images)

    images = rng.normal(size=(23, 3, 4, 1)).astype(np.float32)
    out = embed_in_batches(fn, images, batch_size=8, desc="stand-in", progress=False)
    assert out.shape == (23, 6) and set(shapes) == {(8, 3, 4, 1)} and len(shapes) == 3
    np.testing.assert_allclose(out, images.reshape(23, -1) @ np.asarray(proj), rtol=1e-5, atol=1e-5)
    assert embed_in_batches(fn, images[:3], batch_size=8, progress=False).shape == (3, 6)
