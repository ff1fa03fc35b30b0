"""Tests for research.data: sources, error messages and the grain training pipeline."""

import gzip
import hashlib
import json
import os
import pickle

import ml_collections
import numpy as np
import pytest

from research.data import (
    IMAGE_FIELDS,
    Cifar10Source,
    DataError,
    DigitsSource,
    IDXSource,
    SyntheticSource,
    TfdsSource,
    from_model_range,
    get_source,
    make_eval_arrays,
    make_train_iterator,
    peek_shape,
    read_examples,
    read_fields,
    to_model_range,
)


def data_config(**overrides):
    cfg = dict(
        name="digits",
        data_dir="",
        tfds_name="",
        image_size=8,
        channels=1,
        num_classes=10,
        random_flip=False,
        centered=True,
    )
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for name in x:
            assert x[name].dtype == y[name].dtype, name
            np.testing.assert_array_equal(x[name], y[name])


# ----------------------------------------------------------------------------- IDX helpers


def idx_bytes(array, magic):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx_split(directory, prefix, images, labels, compress):
    os.makedirs(directory, exist_ok=True)
    for kind, array, magic in (("images-idx3", images, 2051), ("labels-idx1", labels, 2049)):
        name = os.path.join(directory, f"{prefix}-{kind}-ubyte")
        payload = idx_bytes(array, magic)
        if compress:
            with gzip.open(name + ".gz", "wb") as f:
                f.write(payload)
        else:
            with open(name, "wb") as f:
                f.write(payload)


def index_coded_images(n, size=4):
    """Images whose first two pixels spell their own index, so batches can be decoded."""
    images = np.zeros((n, size, size), np.uint8)
    images[:, 0, 0] = np.arange(n) % 256
    images[:, 0, 1] = np.arange(n) // 256
    return images


def decode_indices(batch):
    pixels = from_model_range(batch["image"])
    return pixels[:, 0, 0, 0].astype(np.int64) + 256 * pixels[:, 0, 1, 0].astype(np.int64)


# ----------------------------------------------------------------------------- digits


def test_digits_matches_sklearn_scaled():
    from sklearn.datasets import load_digits

    ref = load_digits()
    images, labels = DigitsSource("all").as_array()
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.uint8
    assert labels.shape == (1797,) and labels.dtype == np.int32
    np.testing.assert_array_equal(images[..., 0], np.round(ref.images * 255 / 16).astype(np.uint8))
    np.testing.assert_array_equal(labels, ref.target)
    assert images.min() == 0 and images.max() == 255

    train, test = DigitsSource("train"), DigitsSource("test")
    assert (len(train), len(test)) == (1500, 297)
    # The two splits partition the data set: together they are 'all', in order.
    np.testing.assert_array_equal(np.concatenate([train.as_array()[0], test.as_array()[0]]), images)
    record = test[0]
    assert record["image"].shape == (8, 8, 1) and record["label"].dtype == np.int32
    np.testing.assert_array_equal(record["image"], images[1500])
    with pytest.raises(DataError, match="valid splits"):
        DigitsSource("validation")


# ----------------------------------------------------------------------------- IDX


def test_idx_roundtrip_gz_and_raw(tmp_path):
    rng = np.random.default_rng(0)
    # Non-square so a rows/cols mix-up would show.
    train_images = rng.integers(0, 256, (7, 6, 5), dtype=np.uint8)
    train_labels = rng.integers(0, 10, 7, dtype=np.uint8)
    test_images = rng.integers(0, 256, (3, 6, 5), dtype=np.uint8)
    test_labels = np.array([9, 0, 3], np.uint8)
    write_idx_split(tmp_path, "train", train_images, train_labels, compress=True)
    write_idx_split(tmp_path, "t10k", test_images, test_labels, compress=False)

    train = IDXSource(tmp_path, "train")
    assert train.image_shape == (6, 5, 1)
    assert train._images is None  # shape came from the header alone
    images, labels = train.as_array()
    np.testing.assert_array_equal(images[..., 0], train_images)
    np.testing.assert_array_equal(labels, train_labels.astype(np.int32))
    assert len(train) == 7 and train[-1]["label"] == train_labels[-1]

    test = IDXSource(tmp_path, "test")
    assert test.images_path.endswith("t10k-images-idx3-ubyte")
    np.testing.assert_array_equal(test.as_array()[0][..., 0], test_images)
    np.testing.assert_array_equal(test.as_array()[1], [9, 0, 3])


def test_idx_corrupt_files_raise(tmp_path):
    images = np.zeros((4, 3, 3), np.uint8)
    write_idx_split(tmp_path, "train", images, np.zeros(4, np.uint8), compress=True)
    bad = bytearray(idx_bytes(images, 2051))
    bad[3] = 0x04  # magic 2052
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes(bad))
    with pytest.raises(DataError, match="magic number 2052, expected 2051"):
        IDXSource(tmp_path, "train").as_array()
    with pytest.raises(DataError, match="magic"):
        _ = IDXSource(tmp_path, "train").image_shape

    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(idx_bytes(images, 2051)[:-5])
    with pytest.raises(DataError, match="truncated"):
        IDXSource(tmp_path, "train").as_array()

    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not a gzip file at all")
    with pytest.raises(DataError, match="cannot read IDX"):
        IDXSource(tmp_path, "train").as_array()

    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
        IDXSource(tmp_path, "test")


def test_real_mnist_from_env():
    # Needs $RESEARCH_DATA_DIR/mnist/ (.ci/run sets it); without it the source raises DataError naming the fix.
    cfg = data_config(name="mnist", image_size=28)
    assert peek_shape(cfg) == (28, 28, 1)
    source = get_source(cfg, "train")
    images, labels = source.as_array()
    assert images.shape == (60000, 28, 28, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels[:10], [5, 0, 4, 1, 9, 2, 1, 3, 1, 4])
    np.testing.assert_array_equal(np.bincount(labels[:10], minlength=10), [1, 3, 1, 1, 2, 1, 0, 0, 0, 1])
    assert len(get_source(cfg, "test")) == 10000
    with pytest.raises(DataError, match="image_size=28"):
        get_source(data_config(name="mnist", image_size=32), "train")


# ----------------------------------------------------------------------------- CIFAR-10


def write_cifar(folder, sizes, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    written = {}
    for name, n in zip(names, sizes):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"{name}_{i}.png".encode() for i in range(n)],
        }
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f, protocol=2)
        written[name] = (data, labels)
    return written


def test_cifar10_reads_pickled_batches_in_hwc(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    written = write_cifar(folder, sizes=[2, 3, 1, 2, 2, 4])
    data, labels = written["data_batch_1"]
    # A pixel whose three channels differ, to pin the CHW -> HWC conversion.
    data[0, [0 * 1024 + 5 * 32 + 7, 1 * 1024 + 5 * 32 + 7, 2 * 1024 + 5 * 32 + 7]] = [10, 20, 30]
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"labels": labels, b"data": data}, f, protocol=2)

    for directory in (tmp_path, folder):  # parent folder or the batches folder itself
        train = Cifar10Source(directory, "train")
        assert len(train) == 10 and train.image_shape == (32, 32, 3)
        assert train[0]["image"].shape == (32, 32, 3)
        np.testing.assert_array_equal(train[0]["image"][5, 7], [10, 20, 30])

    images, all_labels = Cifar10Source(tmp_path, "train").as_array()
    expected = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    expected[:2] = data
    for n in range(10):
        for c in range(3):
            np.testing.assert_array_equal(images[n, :, :, c], expected[n, c * 1024 : (c + 1) * 1024].reshape(32, 32))
    assert list(all_labels) == sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])

    test = Cifar10Source(tmp_path, "test")
    assert len(test) == 4 and test[3]["label"] == written["test_batch"][1][3]
    cfg = data_config(name="cifar10", data_dir=str(tmp_path), image_size=32, channels=3)
    assert make_eval_arrays(cfg, "test")[0].shape == (4, 32, 32, 3)
    with pytest.raises(DataError, match="channels=3"):
        get_source(data_config(name="cifar10", data_dir=str(tmp_path), image_size=32, channels=1))


def test_cifar10_missing_and_malicious_files(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, sizes=[1] * 6)
    os.remove(folder / "data_batch_3")
    with pytest.raises(DataError, match="missing data_batch_3"):
        Cifar10Source(tmp_path, "train")
    # A pickle that would call a function on load must be refused, not executed.
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": os.getcwd, b"labels": []}, f, protocol=2)
    with pytest.raises(DataError, match="refusing to load"):
        Cifar10Source(tmp_path, "test").as_array()


# ----------------------------------------------------------------------------- TFDS


def test_tfds_source_with_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):
        source = TfdsSource("mnist", "train")
        assert len(source) == 12 and source.image_shape == (28, 28, 1)
        assert source.num_classes == 10
        record = source[11]
        assert record["image"].shape == (28, 28, 1) and record["image"].dtype == np.uint8
        assert record["label"].dtype == np.int32 and 0 <= int(record["label"]) < 10
        # Record sources are read one source[i] per index and stacked field by field.
        idx = np.array([11, 0, 5, 5])
        fields = read_fields(source, idx)
        assert sorted(fields) == ["image", "label"] and fields["label"].dtype == np.int32
        np.testing.assert_array_equal(fields["image"], np.stack([source[int(i)]["image"] for i in idx]))
        np.testing.assert_array_equal(fields["label"], [source[int(i)]["label"] for i in idx])
        images, labels = read_examples(source, idx)
        np.testing.assert_array_equal(images, fields["image"])
        np.testing.assert_array_equal(labels, fields["label"])

        cfg = data_config(name="tfds", tfds_name="mnist", image_size=28)
        batches = take(make_train_iterator(cfg, global_batch_size=4, seed=0), 3)
        for b in batches:
            assert b["image"].shape == (4, 28, 28, 1) and b["image"].dtype == np.float32
            assert b["label"].dtype == np.int32
        # One epoch of 12 examples in batches of 4 visits every label once.
        seen = np.sort(np.concatenate([b["label"] for b in batches]))
        np.testing.assert_array_equal(seen, np.sort([source[i]["label"] for i in range(12)]))
        with pytest.raises(DataError, match="image_size=28"):
            get_source(data_config(name="tfds", tfds_name="mnist", image_size=32))


def test_tfds_not_prepared_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="array_record"):
        TfdsSource("mnist", "train", data_dir=str(tmp_path))


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_per_index():
    source = SyntheticSource(num_examples=100, image_size=5, channels=3, num_classes=7, seed=3)
    fields = source.read_fields(np.arange(100))
    assert sorted(fields) == ["image", "label"]
    images, labels = fields["image"], fields["label"]
    assert images.shape == (100, 5, 5, 3) and images.dtype == np.uint8
    for i in (0, 41, 99):
        np.testing.assert_array_equal(source[i]["image"], images[i])
        assert source[i]["label"] == labels[i]
    assert set(np.unique(labels)) == set(range(7))
    assert 100 < images.mean() < 155 and images.std() > 60
    other = SyntheticSource(100, 5, 3, 7, seed=4)[41]["image"]
    assert (other != images[41]).mean() > 0.9
    cfg = data_config(name="synthetic", image_size=5, channels=3, num_examples=64)
    train, test = get_source(cfg, "train"), get_source(cfg, "test")
    assert len(train) == 64 and (train[0]["image"] != test[0]["image"]).any()


# ----------------------------------------------------------------------------- config errors


def test_config_errors_are_actionable(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="valid names: digits, mnist"):
        get_source(data_config(name="imagenet"))

    monkeypatch.delenv("RESEARCH_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="RESEARCH_DATA_DIR is not set") as e:
        make_train_iterator(data_config(name="mnist", image_size=28), global_batch_size=8, seed=0)
    assert "tfds_name='mnist'" in str(e.value)

    monkeypatch.setenv("RESEARCH_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError) as e:
        peek_shape(data_config(name="fashion_mnist", image_size=28))
    message = str(e.value)
    assert str(tmp_path / "fashion_mnist") in message and "RESEARCH_DATA_DIR" in message
    os.makedirs(tmp_path / "mnist")
    with pytest.raises(DataError, match="MNIST files not found in .*train-images-idx3-ubyte.gz.*RESEARCH_DATA_DIR"):
        peek_shape(data_config(name="mnist", image_size=28))

    with pytest.raises(DataError, match=r"set --config.data.image_size=8"):
        peek_shape(data_config(image_size=28))
    with pytest.raises(DataError, match=r"set --config.data.num_classes=10"):
        peek_shape(data_config(num_classes=5))
    with pytest.raises(DataError, match="tfds_name"):
        get_source(data_config(name="tfds"))
    assert peek_shape(data_config()) == (8, 8, 1)


# ----------------------------------------------------------------------------- pipeline


def test_model_range_roundtrip():
    pixels = np.arange(256, dtype=np.uint8)
    x = to_model_range(pixels)
    assert x.dtype == np.float32 and x[0] == -1.0 and x[-1] == 1.0
    np.testing.assert_array_equal(from_model_range(x), pixels)
    np.testing.assert_array_equal(from_model_range(to_model_range(pixels, centered=False), centered=False), pixels)
    np.testing.assert_array_equal(from_model_range(np.array([-3.0, 0.0, 3.0])), [0, 128, 255])


def test_batches_shape_range_and_determinism():
    cfg = data_config()
    a = take(make_train_iterator(cfg, global_batch_size=32, seed=7), 5)
    b = take(make_train_iterator(cfg, global_batch_size=32, seed=7), 5)
    c = take(make_train_iterator(cfg, global_batch_size=32, seed=8), 5)
    assert a[0]["image"].shape == (32, 8, 8, 1) and a[0]["image"].dtype == np.float32
    assert a[0]["label"].shape == (32,) and a[0]["label"].dtype == np.int32
    images = np.concatenate([x["image"] for x in a])
    assert images.min() == -1.0 and images.max() == 1.0
    assert_batches_equal(a, b)
    assert not np.array_equal(a[0]["image"], c[0]["image"])
    unit = next(make_train_iterator(data_config(centered=False), global_batch_size=32, seed=7))
    np.testing.assert_allclose(unit["image"], (a[0]["image"] + 1) / 2, atol=1e-6)


def test_epochs_cover_every_example_once_and_reshuffle(tmp_path):
    n, batch = 250, 32  # 7 batches per epoch; 26 examples dropped each epoch
    write_idx_split(tmp_path, "train", index_coded_images(n), np.arange(n) % 10, compress=True)
    cfg = data_config(name="mnist", data_dir=str(tmp_path), image_size=4)
    it = make_train_iterator(cfg, global_batch_size=batch, seed=0)
    epochs = [np.concatenate([decode_indices(b) for b in take(it, n // batch)]) for _ in range(3)]
    for seen in epochs:
        assert len(seen) == 224 and len(np.unique(seen)) == 224 and seen.max() < n
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(np.sort(epochs[0]), np.sort(epochs[1]))  # different remainders dropped
    # Labels travel with their images.
    b = next(make_train_iterator(cfg, global_batch_size=batch, seed=0))
    np.testing.assert_array_equal(b["label"], decode_indices(b) % 10)


def test_checkpoint_state_restores_exactly():
    cfg = data_config(random_flip=True)
    it = make_train_iterator(cfg, global_batch_size=256, seed=3)  # 5 batches per epoch
    take(it, 3)
    state = it.get_state()
    expected = take(it, 5)  # crosses the epoch boundary
    text = json.dumps(state)

    restored = make_train_iterator(cfg, global_batch_size=256, seed=3)
    restored.set_state(state)
    assert_batches_equal(take(restored, 5), expected)

    from_json = make_train_iterator(cfg, global_batch_size=256, seed=3)
    take(from_json, 7)  # a used iterator must be rewound too
    from_json.set_state(json.loads(text))
    assert_batches_equal(take(from_json, 5), expected)


def test_process_shards_union_equals_single_process():
    cfg = data_config(random_flip=True)
    single = take(make_train_iterator(cfg, global_batch_size=64, seed=11), 30)
    shards = [
        take(make_train_iterator(cfg, global_batch_size=64, seed=11, process_index=p, process_count=2), 30)
        for p in range(2)
    ]
    for step in range(30):
        p0, p1 = shards[0][step], shards[1][step]
        assert p0["image"].shape == (32, 8, 8, 1)
        np.testing.assert_array_equal(np.concatenate([p0["image"], p1["image"]]), single[step]["image"])
        np.testing.assert_array_equal(np.concatenate([p0["label"], p1["label"]]), single[step]["label"])
    with pytest.raises(ValueError, match="multiple of process_count=3"):
        make_train_iterator(cfg, global_batch_size=64, seed=0, process_index=0, process_count=3)
    with pytest.raises(DataError, match="fewer than global_batch_size"):
        make_train_iterator(cfg, global_batch_size=2048, seed=0)


def test_random_flip_is_about_half_and_deterministic():
    plain = take(make_train_iterator(data_config(), global_batch_size=250, seed=5), 6)
    flipped = take(make_train_iterator(data_config(random_flip=True), global_batch_size=250, seed=5), 6)
    again = take(make_train_iterator(data_config(random_flip=True), global_batch_size=250, seed=5), 6)
    assert_batches_equal(flipped, again)
    x = np.concatenate([b["image"] for b in plain])
    y = np.concatenate([b["image"] for b in flipped])
    np.testing.assert_array_equal(
        np.concatenate([b["label"] for b in plain]), np.concatenate([b["label"] for b in flipped])
    )
    same = (x == y).all(axis=(1, 2, 3))
    mirrored = (x[:, :, ::-1] == y).all(axis=(1, 2, 3))
    assert (same | mirrored).all()  # every image is either untouched or mirrored
    asymmetric = ~(x == x[:, :, ::-1]).all(axis=(1, 2, 3))
    fraction = mirrored[asymmetric].mean()
    assert asymmetric.sum() > 1400 and 0.45 < fraction < 0.55, fraction


def test_eval_arrays():
    images, labels = make_eval_arrays(data_config(), "test")
    ref_images, ref_labels = DigitsSource("test").as_array()
    np.testing.assert_array_equal(images, ref_images)
    np.testing.assert_array_equal(labels, ref_labels)
    assert images.flags.writeable and images.dtype == np.uint8 and labels.dtype == np.int32
    images[:] = 0
    assert DigitsSource("test").as_array()[0].max() == 255
    first, _ = make_eval_arrays(data_config(name="synthetic", image_size=4, channels=3), "test", num=5)
    assert first.shape == (5, 4, 4, 3)
    with pytest.raises(DataError, match="has 297"):
        make_eval_arrays(data_config(), "test", num=1000)


# ----------------------------------------------------------------------------- fields beyond image and label


def test_digits_batches_unchanged_by_field_pipeline():
    # sha256 of the first 3 batches as the image/label-only pipeline (commit dc0e5e8) produced them: passing every
    # field through must not change a single bit of existing runs' data (resumed runs and digest tests rely on it).
    expected = {
        True: "d3e8e9f066ed1f3e7cf6ed637b6509a2c425e52c5fc5bb5e367c26f044da2463",
        False: "33eed942464087fe7dce164f635fedf0a813fea219315fc4391f5dd16b4b4558",
    }
    for flip, digest in expected.items():
        batches = take(make_train_iterator(data_config(random_flip=flip), global_batch_size=64, seed=0), 3)
        h = hashlib.sha256()
        for b in batches:
            assert sorted(b) == ["image", "label"]
            assert b["image"].dtype == np.float32 and b["label"].dtype == np.int32
            h.update(b["image"].tobytes())
            h.update(b["label"].tobytes())
        assert h.hexdigest() == digest, flip


class CaptionedDigits:
    """A record source with extra fields: a caption naming its label and index, a 3-channel hint (the image has
    one channel) of asymmetric noise, and a float64 score."""

    image_shape = (8, 8, 1)
    num_classes = 10

    def __init__(self, n=96):
        images, labels = DigitsSource("train").as_array()
        self.images, self.labels = images[:n], labels[:n]
        self.hints = np.random.default_rng(0).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
        self.scores = np.arange(n, dtype=np.float64) / 8

    def caption(self, i):
        return f"digit {self.labels[i]} #{i}"

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {
            "image": self.images[i],
            "label": self.labels[i],
            "caption": self.caption(i),
            "hint": self.hints[i],
            "score": self.scores[i],
        }


class CaptionedDigitsBatched(CaptionedDigits):
    """The same data through the read_fields fast path, captions handed back as an object array."""

    def read_fields(self, indices):
        return {
            "image": self.images[indices],
            "label": self.labels[indices],
            "hint": self.hints[indices],
            "score": self.scores[indices],
            "caption": np.array([self.caption(i) for i in indices], dtype=object),
        }


def numpy_model_range(pixels, centered):
    x = pixels.astype(np.float32)
    return x / np.float32(127.5) - np.float32(1.0) if centered else x / np.float32(255.0)


@pytest.mark.parametrize("centered", [True, False])
def test_record_source_fields_pass_through_pipeline(centered):
    source = CaptionedDigits()
    cfg = data_config(random_flip=True, centered=centered)
    batches = take(make_train_iterator(cfg, global_batch_size=32, seed=4, source=source), 3)  # one epoch
    seen, flipped = [], []
    for b in batches:
        assert sorted(b) == ["caption", "hint", "image", "label", "score"]
        assert b["image"].shape == (32, 8, 8, 1) and b["hint"].shape == (32, 8, 8, 3)
        assert b["image"].dtype == b["hint"].dtype == np.float32 and b["label"].dtype == np.int32
        assert b["caption"].dtype.kind == "U" and b["caption"].shape == (32,)
        for k in range(32):
            caption = str(b["caption"][k])
            i = int(caption.split("#")[1])
            assert caption == f"digit {source.labels[i]} #{i}"  # captions stay with their own example
            seen.append(i)
            plain = numpy_model_range(source.hints[i], centered)
            mirror = numpy_model_range(source.hints[i][:, ::-1], centered)
            flip = np.array_equal(b["hint"][k], mirror)
            assert flip or np.array_equal(b["hint"][k], plain)
            flipped.append(flip)
            # The image got the same flip as its hint, and the same scaling.
            image = source.images[i][:, ::-1] if flip else source.images[i]
            np.testing.assert_array_equal(b["image"][k], numpy_model_range(image, centered))
            assert b["label"][k] == source.labels[i]
            assert b["score"][k] == i / 8 and b["score"].dtype == np.float64
    assert sorted(seen) == list(range(96))
    assert 0.3 < np.mean(flipped) < 0.7
    # Without random_flip nothing is mirrored.
    plain = next(make_train_iterator(data_config(centered=centered), global_batch_size=32, seed=4, source=source))
    idx = [int(str(c).split("#")[1]) for c in plain["caption"]]
    np.testing.assert_array_equal(plain["hint"], numpy_model_range(source.hints[idx], centered))
    np.testing.assert_array_equal(plain["image"], numpy_model_range(source.images[idx], centered))

    # A source's own read_fields yields the same batches, its object-array captions as str arrays.
    fast = take(make_train_iterator(cfg, global_batch_size=32, seed=4, source=CaptionedDigitsBatched()), 3)
    assert_batches_equal(fast, batches)


def test_extra_fields_resume_exactly_from_checkpoint_state():
    cfg = data_config(random_flip=True)
    it = make_train_iterator(cfg, global_batch_size=40, seed=2, source=CaptionedDigits())  # 2 batches per epoch
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 4)  # crosses an epoch boundary
    restored = make_train_iterator(cfg, global_batch_size=40, seed=2, source=CaptionedDigitsBatched())
    take(restored, 5)
    restored.set_state(state)
    got = take(restored, 4)
    assert sorted(got[0]) == ["caption", "hint", "image", "label", "score"]
    assert_batches_equal(got, expected)
    # Two processes split every field the same way they split the image.
    shards = [
        take(
            make_train_iterator(
                cfg, global_batch_size=40, seed=2, process_index=p, process_count=2, source=CaptionedDigits()
            ),
            3,
        )
        for p in range(2)
    ]
    single = take(make_train_iterator(cfg, global_batch_size=40, seed=2, source=CaptionedDigits()), 3)
    for step in range(3):
        for name in single[step]:
            joined = np.concatenate([shards[0][step][name], shards[1][step][name]])
            np.testing.assert_array_equal(joined, single[step][name])


def test_read_fields_on_every_builtin_source_kind(tmp_path):
    from research.latents import CACHE_META, LatentCacheSource

    idx = np.array([3, 0, 6, 3, 1])

    def check(source, images, labels):
        fields = read_fields(source, idx)
        # Built-in sources give only the numeric image and label, so training batches stay all jax-convertible.
        assert sorted(fields) == ["image", "label"] and fields["label"].dtype == np.int32
        assert fields["image"].dtype == images.dtype
        np.testing.assert_array_equal(fields["image"], images[idx])
        np.testing.assert_array_equal(fields["label"], labels[idx])
        old_images, old_labels = read_examples(source, idx)
        np.testing.assert_array_equal(old_images, images[idx])
        np.testing.assert_array_equal(old_labels, labels[idx])
        assert old_labels.dtype == np.int32

    digits = DigitsSource("test")
    check(digits, *digits.as_array())
    np.testing.assert_array_equal(digits.read_fields(idx)["image"], digits.as_array()[0][idx])

    rng = np.random.default_rng(1)
    idx_images, idx_labels = rng.integers(0, 256, (7, 5, 4), dtype=np.uint8), rng.integers(0, 10, 7, dtype=np.uint8)
    write_idx_split(tmp_path / "idx", "train", idx_images, idx_labels, compress=True)
    check(IDXSource(tmp_path / "idx", "train"), idx_images[..., None], idx_labels.astype(np.int32))

    written = write_cifar(tmp_path / "cifar" / "cifar-10-batches-py", sizes=[1, 1, 1, 1, 1, 7])
    data, labels = written["test_batch"]
    check(
        Cifar10Source(tmp_path / "cifar", "test"), data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.array(labels)
    )

    synthetic = SyntheticSource(num_examples=9, image_size=3, channels=2, seed=5)
    records = [synthetic[i] for i in range(9)]
    check(synthetic, np.stack([r["image"] for r in records]), np.array([r["label"] for r in records]))

    # A tuple read_batch (the latent cache) maps to image and label; the moments stay float32.
    cache = tmp_path / "cache"
    os.makedirs(cache)
    mean, std = rng.normal(size=(8, 2, 2, 3)).astype(np.float32), rng.random((8, 2, 2, 3)).astype(np.float32)
    np.save(cache / "mean.npy", mean)
    np.save(cache / "std.npy", std)
    np.save(cache / "labels.npy", np.arange(8, dtype=np.int32) % 3)
    (cache / CACHE_META).write_text("{}")
    check(LatentCacheSource(str(cache)), np.concatenate([mean, std], axis=-1), np.arange(8, dtype=np.int32) % 3)


def test_read_fields_errors_name_the_problem():
    class NoLabel:
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"image": np.zeros((2, 2, 1), np.uint8)}

    class Ragged(NoLabel):
        def __getitem__(self, i):
            record = {"image": np.zeros((2, 2, 1), np.uint8), "label": 0}
            return dict(record, caption="x") if i else record

    class Tuple(NoLabel):
        def read_fields(self, indices):
            return np.zeros((len(indices), 2, 2, 1), np.uint8), np.zeros(len(indices), np.int32)

    class Short(NoLabel):
        def read_fields(self, indices):
            return {"image": np.zeros((1, 2, 2, 1), np.uint8), "label": np.zeros(len(indices), np.int32)}

    class FlatHint(NoLabel):
        def read_fields(self, indices):
            n = len(indices)
            return {"image": np.zeros((n, 2, 2, 1), np.uint8), "label": np.zeros(n), "hint": np.zeros((n, 4))}

    with pytest.raises(DataError, match=r"without \['label'\]"):
        read_fields(NoLabel(), [0, 1])
    with pytest.raises(DataError, match="must have the same fields"):
        read_fields(Ragged(), [0, 1])
    with pytest.raises(DataError, match="must return a dict"):
        read_fields(Tuple(), [0, 1])
    with pytest.raises(DataError, match="'image' has shape \\(1, 2, 2, 1\\) for a batch of 2"):
        read_fields(Short(), [0, 1])
    assert IMAGE_FIELDS == ("image", "hint")
    with pytest.raises(DataError, match="'hint' has shape \\(2, 4\\); image-like fields must be"):
        next(make_train_iterator(data_config(), global_batch_size=2, seed=0, source=FlatHint()))
