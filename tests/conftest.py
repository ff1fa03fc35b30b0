"""Test session setup: 8 simulated CPU devices, so sharded code paths run on any machine."""

import os

# Must happen before jax is imported anywhere; tests that want one device build a one-device mesh.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Several tests build the same tiny trainer (a resumed run recompiles the programs of the first half);
# a session-wide persistent compilation cache lets them reuse the compiled executables.
import tempfile  # noqa: E402

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import sys  # noqa: E402
import types  # noqa: E402

# The reference packages (diffusers, pytorch-fid) import torchvision, whose PyPI wheel is a CUDA build: with the
# CPU torch its compiled operators do not load and the module registering their meta kernels fails at import.
# None of the references use those operators; see tests/reference.py.
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


from tests.factories import make_tiny_config  # noqa: E402


@pytest.fixture
def tiny_config():
    return make_tiny_config()


@pytest.fixture(scope="session")
def mnist_autoencoder(tmp_path_factory):
    """Workdir of configs/vae_mnist.py trained for 500 of its 2000 steps (slow: the autoencoder's PSNR test)."""
    from research.tasks import get_config
    from research.train.loop import train

    config = get_config(
        os.path.join(REPO_ROOT, "configs", "vae_mnist.py"),
        [("train.num_steps", "500"), ("train.sample_every", "0"), ("train.progress", "false")],
    )
    workdir = str(tmp_path_factory.mktemp("mnist_autoencoder") / "vae_mnist")
    train(config, workdir)
    return workdir


# The suite runs on two pytest-xdist workers, whole files per worker (pytest.ini): a file's module- and session-scoped
# fixtures are then built once. The longest files go first so that neither worker is left with one at the end.
_LONGEST_FIRST = (  # by the files' measured totals (pytest --durations=0, 2 workers), longest first
    "test_tasks.py",
    "test_vae.py",
    "test_quality.py",
    "test_inception.py",
    "test_generate.py",
    "test_sweep.py",
    "test_grads.py",
    "test_classifier.py",
    "test_fewstep_train.py",
    "test_controlnet.py",
    "test_train.py",
    "test_clip_task.py",
    "test_dit.py",
    "test_add.py",
    "test_cli_errors.py",
    "test_latent.py",
    "test_cli.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))
