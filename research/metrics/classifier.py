"""Domain classifiers: small CNNs trained on a dataset itself, whose features and class probabilities judge samples.

FID's Inception-v3 wants 299x299 RGB input, which makes it slow on a CPU and a poor judge of 8x8 or 28x28
grayscale digits. For such small data sets a classifier trained on the data set gives three cheaper numbers:

* domain FID: the Frechet distance between Gaussians fitted to the classifier's penultimate features
  (``frechet_distance(*feature_statistics(clf.features(a)), *feature_statistics(clf.features(b)))``, which
  ``domain_fid`` wraps). Like FID it is only comparable between numbers computed with the same classifier, so a
  result should name ``clf.name`` and ``clf.checksum``;
* classifier score: the Inception Score computed with the classifier's softmax, ``exp(E_x KL(p(y|x) || p(y)))``,
  between 1 and the number of classes;
* classifier accuracy: for class-conditional samples, how often the classifier recognises the requested class.

Each data set has a ``ClassifierRecipe`` (architecture and training hyper-parameters) in ``RECIPES``; another
small data set is added with ``register_recipe``. ``get_domain_classifier`` trains the recipe once on the train
split -- deterministically: fixed seed and data order, plain jit on the first CPU device -- measures the test
accuracy, and caches the parameters under ``cache_dir('classifiers')`` next to a JSON file with their sha256
checksum and how they were made. Later calls load the file and verify the checksum. Training is bitwise
reproducible on one machine, whatever the number of (simulated) JAX devices; but XLA:CPU splits some fused
reductions (the convolution bias gradients) by the number of CPU threads, so a machine with another core count,
CPU or XLA version trains slightly different weights, with another checksum -- which is why the checksum travels
with every number. Inference does not depend on the thread count, so a copied cache file gives the same features.

The features are the penultimate layer *before* its ReLU: dead ReLU units would give constant-zero coordinates,
that is singular covariances, which the Gaussian fit of FID handles badly.

Images go in as what samplers and data sources produce, uint8 [N, H, W, C]; ``_network_input`` is the one place
where they become network input.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Any, Iterable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from research.metrics.cache import cache_dir, file_digest

__all__ = [
    "ClassifierError",
    "ClassifierRecipe",
    "RECIPES",
    "register_recipe",
    "SmallCNN",
    "DomainClassifier",
    "get_domain_classifier",
    "build_classifier",
    "train_classifier",
    "init_params",
    "classifier_from_params",
    "params_checksum",
    "classifier_score",
    "classifier_accuracy",
    "domain_fid",
]

_INFERENCE_BATCH = 500


class ClassifierError(ValueError):
    """A domain classifier cannot be built or loaded as asked; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class ClassifierRecipe:
    """Everything that determines a domain classifier's weights (besides the data and the machine).

    The network is ``len(widths)`` stages of ``convs_per_stage`` 3x3 convolutions + ReLU followed by a 2x2 max
    pool, then a dense feature layer of ``feature_dim`` units and a linear softmax head. Training is AdamW with a
    warmup-cosine learning rate over ``epochs`` passes in a seeded order, with dropout before the head and random
    translations of up to ``max_shift`` pixels.
    """

    dataset: str
    image_size: int
    channels: int
    num_classes: int
    widths: tuple[int, ...]
    convs_per_stage: int
    feature_dim: int
    dropout: float
    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    max_shift: int
    seed: int = 0
    version: int = 1  # bump with any change to the recipe or to the training code: it names the cache file

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))  # hashable after a JSON round trip

    @property
    def name(self) -> str:
        return f"{self.dataset}-cnn-v{self.version}"

    def digest(self) -> str:
        """sha256 of the recipe's fields: a cached file made by another recipe under the same name is caught."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


RECIPES: dict[str, ClassifierRecipe] = {}


def register_recipe(recipe: ClassifierRecipe) -> None:
    """Makes ``get_domain_classifier(recipe.dataset)`` use ``recipe``; the data set must be one the data layer
    reads (``research.data.get_source``) with 'train' and 'test' splits."""
    if recipe.image_size % (2 ** len(recipe.widths)):
        raise ClassifierError(
            f"{recipe.name}: image_size {recipe.image_size} is not divisible by "
            f"2^{len(recipe.widths)} (one 2x2 pool per stage)"
        )
    RECIPES[recipe.dataset] = recipe


# Measured on a shared 2-core CPU (tests/test_classifier.py; CPU-seconds, wall time was up to twice that under
# load): digits 97.3% test accuracy (~15 s, a third of it compiling); MNIST 99.2% (~60 s); Fashion-MNIST 91.7%
# (~95 s). One convolution per stage and max pooling keep the 28x28 networks cheap; one-pixel shifts help on 8x8
# digits, whose test writers differ from the train writers.
register_recipe(
    ClassifierRecipe(
        dataset="digits",
        image_size=8,
        channels=1,
        num_classes=10,
        widths=(32, 64),
        convs_per_stage=1,
        feature_dim=128,
        dropout=0.2,
        epochs=120,
        batch_size=50,
        learning_rate=3e-3,
        weight_decay=1e-4,
        max_shift=1,
    )
)
register_recipe(
    ClassifierRecipe(
        dataset="mnist",
        image_size=28,
        channels=1,
        num_classes=10,
        widths=(16, 32),
        convs_per_stage=1,
        feature_dim=128,
        dropout=0.3,
        epochs=4,
        batch_size=128,
        learning_rate=3e-3,
        weight_decay=1e-4,
        max_shift=0,
    )
)
register_recipe(
    ClassifierRecipe(
        dataset="fashion_mnist",
        image_size=28,
        channels=1,
        num_classes=10,
        widths=(16, 32),
        convs_per_stage=1,
        feature_dim=128,
        dropout=0.3,
        epochs=6,
        batch_size=128,
        learning_rate=3e-3,
        weight_decay=1e-4,
        max_shift=0,
    )
)


def get_recipe(dataset_name: str) -> ClassifierRecipe:
    try:
        return RECIPES[dataset_name]
    except KeyError:
        raise ClassifierError(
            f"no domain classifier for data set {dataset_name!r}; available: {sorted(RECIPES)} "
            "(add one with research.metrics.classifier.register_recipe)"
        ) from None


# ----------------------------------------------------------------------------------------------- network


def _max_pool_2x2(x):
    """[B, H, W, C] -> [B, H/2, W/2, C]. A reshape and a max rather than nn.max_pool, whose gradient
    (select_and_scatter) is many times slower on XLA:CPU than everything else in the network."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class SmallCNN(nn.Module):
    """Conv stages -> dense features [B, feature_dim] (pre-ReLU) -> logits [B, num_classes]; see ClassifierRecipe."""

    widths: tuple
    convs_per_stage: int
    feature_dim: int
    num_classes: int
    dropout: float

    @classmethod
    def from_recipe(cls, recipe: ClassifierRecipe) -> "SmallCNN":
        return cls(
            widths=tuple(recipe.widths),
            convs_per_stage=recipe.convs_per_stage,
            feature_dim=recipe.feature_dim,
            num_classes=recipe.num_classes,
            dropout=recipe.dropout,
        )

    @nn.compact
    def __call__(self, x, train: bool = False):
        """x: float32 [B, H, W, C] -> (features [B, feature_dim], logits [B, num_classes])."""
        for width in self.widths:
            for _ in range(self.convs_per_stage):
                x = nn.relu(nn.Conv(width, (3, 3))(x))
            x = _max_pool_2x2(x)
        features = nn.Dense(self.feature_dim, name="features")(x.reshape(x.shape[0], -1))
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(features))
        return features, nn.Dense(self.num_classes, name="head")(h)


def _network_input(images_uint8):
    """uint8 [B, H, W, C] -> float32 in [-1, 1], inside the compiled programs."""
    return images_uint8.astype(jnp.float32) / 127.5 - 1.0


def _cpu():
    # Always the first CPU device, whatever the default backend and however many host devices are simulated:
    # training and inference then run the same single-device program everywhere.
    return jax.devices("cpu")[0]


@functools.cache
def _apply_fn(recipe: ClassifierRecipe):
    """jit(params, uint8 [B, H, W, C]) -> (features float32 [B, F], logits float32 [B, K]), one per recipe."""
    model = SmallCNN.from_recipe(recipe)

    def apply(params, images):
        return model.apply({"params": params}, _network_input(images), train=False)

    return jax.jit(apply)


# ----------------------------------------------------------------------------------------------- training


def _random_shift(images, key, max_shift: int):
    """Translates each image [B, H, W, C] by a random offset in [-max_shift, max_shift]^2, zero-filled."""
    b, h, w, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
    offsets = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, image.shape[-1]))

    return jax.vmap(crop)(padded, offsets)


def _epoch_orders(num_examples: int, batch_size: int, epochs: int, seed: int) -> np.ndarray:
    """[epochs, steps, batch] example indices: a fresh seeded permutation per epoch, remainder dropped."""
    rng = np.random.default_rng(seed)
    steps = num_examples // batch_size
    return np.stack(
        [rng.permutation(num_examples)[: steps * batch_size].reshape(steps, batch_size) for _ in range(epochs)]
    )


def init_params(recipe: ClassifierRecipe) -> dict:
    """Initial parameters drawn with numpy from the recipe's seed: LeCun-normal kernels (std sqrt(1 / fan_in)),
    zero biases.

    numpy rather than the Flax initialisers because compiling those (threefry per parameter) costs XLA:CPU more
    seconds than training the digits network; the shapes still come from the module, traced abstractly.
    """
    dummy = jax.ShapeDtypeStruct((1, recipe.image_size, recipe.image_size, recipe.channels), jnp.float32)
    shapes = jax.eval_shape(SmallCNN.from_recipe(recipe).init, jax.random.PRNGKey(0), dummy)["params"]
    rng = np.random.default_rng(recipe.seed)

    def draw(path, leaf):
        if path[-1].key == "bias":
            return np.zeros(leaf.shape, np.float32)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

    # JAX flattens dicts in sorted key order, so the draws come in a fixed order.
    return jax.tree_util.tree_map_with_path(draw, shapes)


def _optimizer(recipe: ClassifierRecipe, steps_per_epoch: int):
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        recipe.learning_rate,
        warmup_steps=max(1, steps_per_epoch // 2),
        decay_steps=recipe.epochs * steps_per_epoch,
    )
    return optax.adamw(schedule, weight_decay=recipe.weight_decay)


@functools.cache
def _train_step(recipe: ClassifierRecipe, steps_per_epoch: int):
    """jit(state, x uint8 [B, H, W, C], y [B], train_key, step_index) -> (state, loss); cached so that training
    the same recipe again (another seed, or a retrain) reuses the compiled step."""
    model = SmallCNN.from_recipe(recipe)
    tx = _optimizer(recipe, steps_per_epoch)

    def loss_fn(params, x, y, key):
        shift_key, dropout_key = jax.random.split(key)
        if recipe.max_shift:
            x = _random_shift(x, shift_key, recipe.max_shift)
        _, logits = model.apply({"params": params}, _network_input(x), train=True, rngs={"dropout": dropout_key})
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(state, x, y, train_key, step_index):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y, jax.random.fold_in(train_key, step_index))
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return jax.jit(step, donate_argnums=0)


def train_classifier(
    recipe: ClassifierRecipe, images: np.ndarray, labels: np.ndarray, *, progress: bool = False
) -> dict:
    """Trains the recipe's network on uint8 images [N, H, W, C] and int labels [N]; returns its params.

    Deterministic: the same inputs give bitwise-identical parameters (seeded init, order, dropout and shifts;
    one compiled step on the first CPU device).
    """
    images = np.asarray(images)
    labels = np.asarray(labels, np.int32)
    _check_images(images, recipe)
    if labels.shape != (len(images),) or labels.min() < 0 or labels.max() >= recipe.num_classes:
        raise ClassifierError(
            f"labels must be [N] = [{len(images)}] integers in [0, {recipe.num_classes}), got "
            f"shape {labels.shape} in [{labels.min()}, {labels.max()}]"
        )
    batch_size = min(recipe.batch_size, len(images))
    orders = _epoch_orders(len(images), batch_size, recipe.epochs, recipe.seed)
    steps = orders.shape[1]
    tx = _optimizer(recipe, steps)

    # One jitted step driven from Python: XLA:CPU runs the same step about ten times slower inside lax.scan.
    cpu = _cpu()
    with jax.default_device(cpu):
        params = init_params(recipe)
        # Committed to the device like the step's outputs, so the second step does not compile again.
        state = jax.device_put((params, tx.init(params)), cpu)
        train_key = jax.random.PRNGKey(recipe.seed)
        step_fn = _train_step(dataclasses.replace(recipe, seed=0), steps)
        bar = _progress_bar(orders.shape[0] * steps, progress, f"training {recipe.name}", "step")
        for e, order in enumerate(orders):
            losses = []
            for i, batch in enumerate(order):
                state, loss = step_fn(
                    state,
                    jax.device_put(images[batch], cpu),
                    jax.device_put(labels[batch], cpu),
                    train_key,
                    np.int32(e * steps + i),
                )
                losses.append(loss)
                bar.update(1)
            bar.set_postfix(epoch=e + 1, loss=f"{float(np.mean(jax.device_get(losses))):.4f}")
        bar.close()
    return jax.tree_util.tree_map(np.asarray, state[0])


def _progress_bar(total: int, enabled: bool, desc: str, unit: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit=unit, leave=False)


# ----------------------------------------------------------------------------------------------- inference


def _check_images(images: np.ndarray, recipe: ClassifierRecipe) -> None:
    want = (recipe.image_size, recipe.image_size, recipe.channels)
    if images.ndim != 4 or images.shape[1:] != want:
        raise ClassifierError(
            f"{recipe.name} takes uint8 images [N, {want[0]}, {want[1]}, {want[2]}], got shape {images.shape}"
        )
    if images.dtype != np.uint8:
        raise ClassifierError(
            f"{recipe.name} takes uint8 pixels 0..255, got {images.dtype}; convert model output "
            "with research.data.from_model_range first"
        )


def _run_batched(recipe: ClassifierRecipe, params, images: Any, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """(features float64 [N, F], logits float64 [N, K]) in fixed-size batches, the last one padded, so each
    recipe compiles one program."""
    images = np.asarray(images)
    _check_images(images, recipe)
    n = len(images)
    if n == 0:
        return np.zeros((0, recipe.feature_dim)), np.zeros((0, recipe.num_classes))
    apply = _apply_fn(dataclasses.replace(recipe, seed=0))  # the seed does not change the program
    cpu = _cpu()
    params = jax.device_put(params, cpu)
    features, logits = [], []
    num_batches = -(-n // _INFERENCE_BATCH)
    bar = _progress_bar(n, progress and num_batches > 4, recipe.name, "img")
    for start in range(0, n, _INFERENCE_BATCH):
        batch = images[start : start + _INFERENCE_BATCH]
        size = len(batch)
        if size < _INFERENCE_BATCH:
            batch = np.concatenate([batch, np.zeros((_INFERENCE_BATCH - size,) + batch.shape[1:], np.uint8)])
        f, lg = apply(params, jax.device_put(batch, cpu))
        features.append(np.asarray(f, np.float64)[:size])
        logits.append(np.asarray(lg, np.float64)[:size])
        bar.update(size)
    bar.close()
    return np.concatenate(features), np.concatenate(logits)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclasses.dataclass
class DomainClassifier:
    """A trained domain classifier: ``features`` / ``probs`` of uint8 images [N, H, W, C].

    Attributes: ``name`` (e.g. 'mnist-cnn-v1'), ``recipe``, ``params``, ``test_accuracy`` (on the data set's test
    split), ``checksum`` (sha256 of the parameter file), ``metadata`` (the JSON stored with the parameters),
    ``path`` (the parameter file, or None when not saved).
    """

    recipe: ClassifierRecipe
    params: Any
    test_accuracy: float
    checksum: str
    metadata: dict
    path: Optional[str] = None

    @property
    def name(self) -> str:
        return self.recipe.name

    def features(self, images_uint8: Any, *, progress: bool = True) -> np.ndarray:
        """Penultimate (pre-ReLU) features, float64 [N, feature_dim]."""
        return _run_batched(self.recipe, self.params, images_uint8, progress)[0]

    def logits(self, images_uint8: Any, *, progress: bool = True) -> np.ndarray:
        """float64 [N, num_classes]."""
        return _run_batched(self.recipe, self.params, images_uint8, progress)[1]

    def probs(self, images_uint8: Any, *, progress: bool = True) -> np.ndarray:
        """Softmax class probabilities, float64 [N, num_classes] (rows sum to 1)."""
        return _softmax(self.logits(images_uint8, progress=progress))

    def features_and_probs(self, images_uint8: Any, *, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Both in one pass over the images: ([N, feature_dim], [N, num_classes])."""
        features, logits = _run_batched(self.recipe, self.params, images_uint8, progress)
        return features, _softmax(logits)


# ----------------------------------------------------------------------------------------------- cache


def _data_config(recipe: ClassifierRecipe, data_dir: Optional[str]) -> dict:
    return {
        "name": recipe.dataset,
        "data_dir": data_dir or "",
        "image_size": recipe.image_size,
        "channels": recipe.channels,
        "num_classes": recipe.num_classes,
    }


def _paths(recipe: ClassifierRecipe) -> tuple[str, str]:
    directory = cache_dir("classifiers")
    return os.path.join(directory, f"{recipe.name}.msgpack"), os.path.join(directory, f"{recipe.name}.json")


def _rebuild_hint(recipe: ClassifierRecipe, paths: Iterable[str]) -> str:
    return (
        f"delete {' and '.join(paths)} or call get_domain_classifier({recipe.dataset!r}, retrain=True) to "
        "train it again"
    )


def _write_atomically(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def build_classifier(
    recipe: ClassifierRecipe, *, data_dir: Optional[str] = None, num_train: Optional[int] = None, progress: bool = True
) -> tuple[Any, dict]:
    """Trains ``recipe`` on its data set's train split (the first ``num_train`` examples, all if None) and
    measures the test accuracy. Returns (params, metadata)."""
    from research.data import make_eval_arrays

    config = _data_config(recipe, data_dir)
    images, labels = make_eval_arrays(config, "train", num_train)
    test_images, test_labels = make_eval_arrays(config, "test")
    start = time.perf_counter()
    params = train_classifier(recipe, images, labels, progress=progress)
    seconds = time.perf_counter() - start
    _, logits = _run_batched(recipe, params, test_images, progress=False)
    accuracy = float(np.mean(np.argmax(logits, axis=1) == test_labels))
    metadata = {
        "name": recipe.name,
        "dataset": recipe.dataset,
        "recipe": dataclasses.asdict(recipe),
        "recipe_sha256": recipe.digest(),
        "num_train": len(images),
        "num_test": len(test_images),
        "test_accuracy": accuracy,
        "train_seconds": round(seconds, 2),
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "numpy": np.__version__},
    }
    return params, metadata


def _save(recipe: ClassifierRecipe, params: Any, metadata: dict) -> str:
    params_path, meta_path = _paths(recipe)
    _write_atomically(params_path, serialization.to_bytes(params))
    metadata = dict(metadata, sha256=file_digest(params_path))
    _write_atomically(meta_path, json.dumps(metadata, indent=1, sort_keys=True).encode())
    return metadata["sha256"]


def _load(recipe: ClassifierRecipe) -> Optional[DomainClassifier]:
    """The cached classifier, None when there is none; ClassifierError when the cache is damaged or stale."""
    params_path, meta_path = _paths(recipe)
    if not os.path.exists(params_path) and not os.path.exists(meta_path):
        return None
    hint = _rebuild_hint(recipe, (params_path, meta_path))
    if not (os.path.isfile(params_path) and os.path.isfile(meta_path)):
        raise ClassifierError(
            f"the cached {recipe.name} classifier is incomplete (one of its two files is missing); {hint}"
        )
    try:
        with open(meta_path) as f:
            metadata = json.load(f)
        expected = metadata["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ClassifierError(f"cannot read {meta_path} ({e}); {hint}") from e
    checksum = file_digest(params_path)
    if checksum != expected:
        raise ClassifierError(
            f"checksum mismatch for {params_path}: sha256 {checksum}, but {meta_path} records "
            f"{expected} (a damaged or replaced file); {hint}"
        )
    if metadata.get("recipe_sha256") != recipe.digest():
        raise ClassifierError(
            f"{params_path} was trained with another {recipe.name} recipe than the current one "
            f"(bump ClassifierRecipe.version when changing a recipe); {hint}"
        )
    with open(params_path, "rb") as f:
        params = serialization.msgpack_restore(f.read())
    return DomainClassifier(recipe, params, float(metadata["test_accuracy"]), checksum, metadata, params_path)


def get_domain_classifier(
    dataset_name: str, *, data_dir: Optional[str] = None, retrain: bool = False, progress: bool = True
) -> DomainClassifier:
    """The domain classifier of a data set ('digits', 'mnist', 'fashion_mnist', or a registered one).

    Loads it from ``cache_dir('classifiers')`` (verifying its checksum), or trains it on the train split first
    (digits: seconds; MNIST / Fashion-MNIST: a minute or two on a CPU) and caches it; ``retrain=True`` trains and
    overwrites the cache. ``data_dir`` is where the data set's files are (default: $RESEARCH_DATA_DIR/<name>).
    Raises ClassifierError for an unknown data set or a damaged cache, DataError for missing data files.
    """
    recipe = get_recipe(dataset_name)
    if not retrain:
        loaded = _load(recipe)
        if loaded is not None:
            return loaded
    params, metadata = build_classifier(recipe, data_dir=data_dir, progress=progress)
    _save(recipe, params, metadata)
    return _load(recipe)


def classifier_from_params(recipe: ClassifierRecipe, params: Any, metadata: Optional[dict] = None) -> DomainClassifier:
    """A DomainClassifier around parameters in memory (e.g. from ``build_classifier`` on a subset), uncached."""
    metadata = dict(metadata or {})
    return DomainClassifier(
        recipe, params, float(metadata.get("test_accuracy", float("nan"))), params_checksum(params), metadata, None
    )


def params_checksum(params: Any) -> str:
    """sha256 of the parameters' serialised bytes: the same as the digest of the file ``_save`` writes."""
    return hashlib.sha256(serialization.to_bytes(params)).hexdigest()


# ----------------------------------------------------------------------------------------------- metrics


def _check_probs(probs: Any) -> np.ndarray:
    p = np.asarray(probs, np.float64)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"probs must be [N, K] with N >= 1, got shape {p.shape}")
    if (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-6):
        raise ValueError(
            "probs must be probability rows (non-negative, summing to 1): pass softmax outputs, not logits"
        )
    return p


def classifier_score(probs: Any) -> float:
    """Inception-Score analogue ``exp(E_x KL(p(y|x) || p(y)))`` of class probabilities [N, K], with p(y) the mean
    of the rows. 1 when every row is the same; K when the rows are confident and the classes equally frequent."""
    from scipy.special import rel_entr

    p = _check_probs(probs)
    marginal = p.mean(axis=0, keepdims=True)
    return float(np.exp(np.mean(np.sum(rel_entr(p, marginal), axis=1))))


def classifier_accuracy(probs: Any, labels: Any) -> float:
    """Fraction of rows of probs [N, K] whose most probable class equals labels [N] (the requested classes of
    class-conditional samples)."""
    p = _check_probs(probs)
    labels = np.asarray(labels)
    if labels.shape != (p.shape[0],):
        raise ValueError(f"labels must be [N] = [{p.shape[0]}], got shape {labels.shape}")
    return float(np.mean(np.argmax(p, axis=1) == labels))


def domain_fid(
    classifier: DomainClassifier, images_a: Any, images_b: Any, *, method: str = "sqrtm", progress: bool = True
) -> float:
    """Frechet distance between the classifier features of two uint8 image sets [N, H, W, C] and [M, H, W, C]."""
    from research.metrics.fid import feature_statistics, frechet_distance

    stats_a = feature_statistics(classifier.features(images_a, progress=progress))
    stats_b = feature_statistics(classifier.features(images_b, progress=progress))
    return frechet_distance(*stats_a, *stats_b, method=method)
