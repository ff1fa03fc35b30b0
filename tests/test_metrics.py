"""FID, KID and precision/recall against pytorch-fid, closed forms and brute-force references."""

import warnings

import numpy as np
import pytest
from scipy import linalg

try:
    from reference import import_pytorch_fid
except ImportError:  # tests/ collected as a package, without tests/ on sys.path
    from tests.reference import import_pytorch_fid
from research.metrics import fid


@pytest.fixture(scope="module")
def fid_score():
    return import_pytorch_fid()[1]


def _reference_fid(fid_score, *stats):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pytorch-fid passes scipy's deprecated disp=False
        return fid_score.calculate_frechet_distance(*stats)


def _random_statistics(rng, n, d, shift=0.0):
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    x = rng.normal(size=(n, d)) @ mixing + shift
    return fid.feature_statistics(x)


# ----------------------------------------------------------------------------------------------- FID


def test_feature_statistics_match_numpy():
    x = np.random.default_rng(0).normal(size=(50, 7)).astype(np.float32)
    mu, sigma = fid.feature_statistics(x)
    assert mu.dtype == sigma.dtype == np.float64 and mu.shape == (7,) and sigma.shape == (7, 7)
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        fid.feature_statistics(x[:1])
    with pytest.raises(ValueError, match="2-D"):
        fid.feature_statistics(x[0])


def test_frechet_distance_equals_pytorch_fid_well_conditioned(fid_score):
    rng = np.random.default_rng(1)
    s1 = _random_statistics(rng, 400, 32)
    s2 = _random_statistics(rng, 300, 32, shift=0.3)
    ref = _reference_fid(fid_score, *s1, *s2)
    assert ref > 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no eps fallback on well-conditioned statistics
        ours = fid.frechet_distance(*s1, *s2)
    assert ours == pytest.approx(ref, rel=1e-6)
    assert fid.frechet_distance(*s1, *s2, method="eigh") == pytest.approx(ref, rel=1e-9)


def test_frechet_distance_equals_pytorch_fid_fewer_samples_than_dimensions(fid_score):
    # 20 samples in 64 dimensions: both covariances have rank 19, so S1 S2 has 45 zero eigenvalues and sqrtm
    # comes back complex with a rounding-sized imaginary part, which both implementations drop.
    rng = np.random.default_rng(2)
    s1 = fid.feature_statistics(rng.normal(size=(20, 64)))
    s2 = fid.feature_statistics(rng.normal(size=(20, 64)) + 0.1)
    assert np.iscomplexobj(linalg.sqrtm(s1[1] @ s2[1]))
    ref = _reference_fid(fid_score, *s1, *s2)
    assert fid.frechet_distance(*s1, *s2) == pytest.approx(ref, rel=1e-6)
    assert fid.frechet_distance(*s1, *s2, method="eigh") == pytest.approx(ref, rel=1e-6)


def _rank_one_statistics():
    """Covariances of two samples each: rank 1, S_i = u_i u_i^T with integer u_i. scipy's sqrtm of their product
    (one non-zero eigenvalue, a double zero) is all NaN, so the eps fallback runs."""
    a = np.array([[-1.0, 1.0, 3.0], [-1.0, 0.0, -1.0]])
    b = np.array([[1.0, 1.0, 0.0], [-1.0, 0.0, -1.0]])
    s1, s2 = fid.feature_statistics(a), fid.feature_statistics(b)
    u, v = (a[0] - a[1]) / np.sqrt(2), (b[0] - b[1]) / np.sqrt(2)
    np.testing.assert_allclose(s1[1], np.outer(u, u), atol=1e-15)
    np.testing.assert_allclose(s2[1], np.outer(v, v), atol=1e-15)
    diff = s1[0] - s2[0]
    # (u u^T v v^T)^(1/2) has trace |u.v|, so the exact distance is closed form.
    exact = diff @ diff + u @ u + v @ v - 2 * abs(u @ v)
    return s1, s2, exact


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # scipy notes the singular product too
def test_frechet_distance_eps_fallback_equals_pytorch_fid(fid_score, capsys):
    s1, s2, exact = _rank_one_statistics()
    assert not np.isfinite(linalg.sqrtm(s1[1] @ s2[1])).all()
    ref = _reference_fid(fid_score, *s1, *s2)
    assert "singular product" in capsys.readouterr().out  # pytorch-fid took its fallback too
    with pytest.warns(RuntimeWarning, match="not finite"):
        ours = fid.frechet_distance(*s1, *s2)
    assert ours == pytest.approx(ref, rel=1e-6)
    # eps = 1e-6 biases the sqrtm result by about sqrt(eps) * |u||v| / |u.v|; eigh needs no eps and is exact.
    assert ours == pytest.approx(exact, abs=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert fid.frechet_distance(*s1, *s2, method="eigh") == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("method", fid.FRECHET_METHODS)
def test_frechet_distance_closed_form_commuting_covariances(method):
    rng = np.random.default_rng(3)
    d = 16
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    exact = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method) == pytest.approx(exact, rel=1e-10)
    # Commuting but not diagonal: a shared eigenbasis.
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    assert fid.frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(exact, rel=1e-8)


@pytest.mark.parametrize("method", fid.FRECHET_METHODS)
def test_frechet_distance_of_identical_statistics_is_zero(method):
    mu, sigma = _random_statistics(np.random.default_rng(4), 200, 24)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma, method=method)) < 1e-9 * np.trace(sigma)


def test_frechet_distance_rejects_bad_inputs():
    mu, sigma = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match="different feature dimensions"):
        fid.frechet_distance(mu, sigma, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"sigma2 must be \[D, D\]"):
        fid.frechet_distance(mu, sigma, mu, np.eye(4))
    with pytest.raises(ValueError, match="mu1 must be a vector"):
        fid.frechet_distance(np.zeros((3, 1)), sigma, mu, sigma)
    with pytest.raises(ValueError, match="NaN"):
        fid.frechet_distance(mu, np.full((3, 3), np.nan), mu, sigma)
    with pytest.raises(ValueError, match="unknown method"):
        fid.frechet_distance(mu, sigma, mu, sigma, method="svd")
    # A "covariance" with a negative eigenvalue: sqrtm has a large imaginary part.
    with pytest.raises(ValueError, match="imaginary component"):
        fid.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))


# ----------------------------------------------------------------------------------------------- statistics files


def test_statistics_round_trip(tmp_path):
    mu, sigma = _random_statistics(np.random.default_rng(5), 50, 6)
    path = tmp_path / "stats.npz"
    fid.save_statistics(
        str(path), mu, sigma, num=50, protocol="pytorch-fid", extractor="inception", dataset="mnist", split="test"
    )
    mu2, sigma2, meta = fid.load_statistics(str(path))
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    assert meta == {"num": 50, "protocol": "pytorch-fid", "extractor": "inception", "dataset": "mnist", "split": "test"}
    # The exact name is kept (np.savez alone would append '.npz').
    fid.save_statistics(str(tmp_path / "stats.bin"), mu, sigma)
    assert (tmp_path / "stats.bin").is_file() and not (tmp_path / "stats.bin.npz").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.bin", "stats.npz"]  # no temporary left behind


def test_statistics_files_interoperate_with_pytorch_fid(tmp_path, fid_score):
    mu, sigma = _random_statistics(np.random.default_rng(6), 40, 5)
    theirs = tmp_path / "pytorch_fid.npz"
    np.savez_compressed(theirs, mu=mu, sigma=sigma)  # what pytorch-fid's --save-stats writes
    mu2, sigma2, meta = fid.load_statistics(str(theirs))
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    assert meta == {}
    ours = tmp_path / "ours.npz"
    fid.save_statistics(str(ours), mu, sigma, num=40)
    m, s = fid_score.compute_statistics_of_path(str(ours), None, 1, 2048, "cpu")
    np.testing.assert_array_equal(m, mu)
    np.testing.assert_array_equal(s, sigma)


def test_load_statistics_errors(tmp_path):
    np.savez(tmp_path / "images.npz", images=np.zeros((2, 8, 8, 1), np.uint8))
    with pytest.raises(ValueError, match="needs arrays 'mu' and 'sigma'"):
        fid.load_statistics(str(tmp_path / "images.npz"))
    with pytest.raises(FileNotFoundError):
        fid.load_statistics(str(tmp_path / "missing.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="cannot read"):
        fid.load_statistics(str(tmp_path / "junk.npz"))


# ----------------------------------------------------------------------------------------------- KID


def _reference_kid(a, b, num_subsets, subset_size, seed):
    """Binkowski et al.'s estimator written out element by element, with the documented subset draws."""
    rng = np.random.default_rng(seed)
    m = min(subset_size, len(a), len(b))
    d = a.shape[1]

    def kernel(x, y):
        return (sum(float(x[t]) * float(y[t]) for t in range(d)) / d + 1) ** 3

    values = []
    for _ in range(num_subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        k_xx = sum(kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
        k_yy = sum(kernel(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
        k_xy = sum(kernel(x[i], y[j]) for i in range(m) for j in range(m))
        values.append(k_xx / (m * (m - 1)) + k_yy / (m * (m - 1)) - 2 * k_xy / m**2)
    return np.mean(values), np.std(values)


@pytest.mark.parametrize("subset_size", [6, 1000])  # 1000 is clipped to the smaller set (12)
def test_kid_matches_double_loop(subset_size):
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(15, 4)), rng.normal(size=(12, 4)) + 0.5
    mean, std = fid.kid(a, b, num_subsets=4, subset_size=subset_size, seed=3)
    ref_mean, ref_std = _reference_kid(a, b, 4, subset_size, seed=3)
    assert mean == pytest.approx(ref_mean, rel=1e-10)
    assert std == pytest.approx(ref_std, rel=1e-8, abs=1e-14)
    assert fid.kid(a, b, num_subsets=4, subset_size=subset_size, seed=3) == (mean, std)  # fixed seed


def test_kid_same_versus_different_distribution():
    rng = np.random.default_rng(8)
    a, b = rng.normal(size=(1000, 16)), rng.normal(size=(1000, 16))
    same, same_std = fid.kid(a, b, num_subsets=20, subset_size=500)
    different, _ = fid.kid(a, b + 0.5, num_subsets=20, subset_size=500)
    assert abs(same) < 3 * same_std + 1e-3
    assert different > 0.05 and different > 20 * abs(same)


def test_kid_rejects_bad_inputs():
    with pytest.raises(ValueError, match="feature dimensions differ"):
        fid.kid(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        fid.kid(np.zeros((1, 2)), np.zeros((5, 2)))


# ----------------------------------------------------------------------------------------------- precision/recall


def _reference_precision_recall(real, fake, k):
    def sq_dist(x, y):
        return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)

    def radii(x):
        d = sq_dist(x, x)
        return np.array([np.sort(np.delete(d[i], i))[k - 1] for i in range(len(x))])

    def coverage(ref, ref_radii, queries):
        d = sq_dist(queries, ref)
        return np.mean([any(d[j, i] <= ref_radii[i] for i in range(len(ref))) for j in range(len(queries))])

    return coverage(real, radii(real), fake), coverage(fake, radii(fake), real)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_precision_recall_matches_brute_force_with_ties(k):
    # Small integer features: many exact ties and duplicate points, all distances exact in float64.
    rng = np.random.default_rng(10 + k)
    real = rng.integers(0, 4, size=(30, 2)).astype(float)
    fake = rng.integers(2, 7, size=(25, 2)).astype(float)
    expected = _reference_precision_recall(real, fake, k)
    assert fid.precision_recall(real, fake, k=k, batch_size=7) == pytest.approx(expected, abs=0)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # a case that discriminates


def test_precision_recall_matches_brute_force_continuous():
    rng = np.random.default_rng(20)
    real, fake = rng.normal(size=(60, 5)), rng.normal(size=(50, 5)) * 1.5 + 0.3
    expected = _reference_precision_recall(real, fake, 3)
    assert fid.precision_recall(real, fake, k=3, batch_size=16) == pytest.approx(expected, abs=0)


def test_precision_recall_sanity():
    rng = np.random.default_rng(21)
    x = rng.normal(size=(200, 8))
    assert fid.precision_recall(x, x.copy()) == (1.0, 1.0)
    assert fid.precision_recall(x, rng.normal(size=(150, 8)) + 100.0) == (0.0, 0.0)
    # Fakes = the real samples of one of two far-apart clusters: all inside the real manifold, covering half of it.
    two_clusters = np.concatenate([x[:100], x[100:] + 50.0])
    assert fid.precision_recall(two_clusters, two_clusters[:100]) == (1.0, 0.5)


def test_knn_radii_exclude_self_and_validate_k():
    x = np.array([[0.0], [1.0], [3.0], [3.0]])
    np.testing.assert_array_equal(fid.knn_radii(x, k=1), [1.0, 1.0, 0.0, 0.0])
    np.testing.assert_array_equal(fid.knn_radii(x, k=2, batch_size=3), [9.0, 4.0, 4.0, 4.0])
    with pytest.raises(ValueError, match="k must be"):
        fid.knn_radii(x, k=4)
