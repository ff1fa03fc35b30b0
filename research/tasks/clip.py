"""task='clip': contrastive image-caption pre-training (CLIP, Radford et al. 2021; SigLIP, Zhai et al. 2023).

Data: a captioned dataset. For MNIST, Fashion-MNIST and the 8x8 digits the caption of an example is one of the
dataset's training templates filled with its class name ("a photo of a coat.", "the digit 7."), drawn anew at
every step inside the compiled step from a token table [classes, templates, context] (research/data/text.py); the
held-out templates never appear in training and give the zero-shot headline number. Image-caption data
(data.name='imagefolder' with a metadata.jsonl, or 'tfds' with data.caption_key) brings its own captions: the
batch preparer tokenizes them on the host (padding and truncation as research.data.text.tokenize) and the step
encodes them as they are; the periodic check is then image<->text retrieval on the test split's pairs.

Objective, per global batch of B (image, caption) pairs: clip.loss='clip' is CLIP's symmetric cross-entropy over
exp(logit_scale) * cos(image_i, text_j) [B, B]; 'siglip' the pairwise sigmoid loss with a learned bias. Under jit
with the batch sharded over the data axis, the [B, B] similarities are computed on the global batch (XLA gathers
the embeddings and the gradient flows back through the gather), so the negatives are the whole global batch and a
step on 8 devices equals the step on one. logit_scale is clipped to [0, log 100] after every step (CLIP's clamp).
Images are randomly translated by up to clip.shift pixels (background padding) before the image tower.

One part, 'net' (model.name='clip'); EMA only when train.ema_decay > 0 (CLIP trains without one). Metrics: loss,
batch_accuracy (image -> caption top-1 within the batch, where captions of the same class tie), logit_scale
(exp of the parameter, the inverse temperature), grad_norm, lr. Every train.sample_every steps the zero-shot
accuracy on the first clip.eval_num test images with the held-out templates is appended to RUN/zeroshot.jsonl and
the learning curve drawn to samples/step_N.png.

Evaluation: `python -m research.evaluate zeroshot|retrieval|probe --workdir RUN`.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.config import ConfigError
from research.shapes import abstract_net_params, build_network, init_net_params
from research.tasks import Task, Trainer, register_task
from research.tasks.common import compile_trainer, model_meta, source_captions, tokenizer_or_config_error
from research.train.state import apply_gradients, ema_decay_at, init_train_state, learning_rate_schedule, make_optimizer

CAPTIONED = ("mnist", "fashion_mnist", "mnist_fashion", "digits")  # captions from class names and templates


def caption_tokens(config, split: str = "train") -> np.ndarray:
    """[classes, templates, model.context_length] int32 token table of the run's dataset captions."""
    from research.data import DataError
    from research.data.text import caption_table

    try:
        return caption_table(_tokenizer(config), config.data.name, split, int(config.model.context_length))
    except DataError as e:
        raise ConfigError(str(e).splitlines()[0]) from None


def random_shift(images: jax.Array, key: jax.Array, shift: int, background: float) -> jax.Array:
    """Translate every image [B, H, W, C] by its own random offset in [-shift, shift]^2, filling with background."""
    if shift <= 0:
        return images
    b, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (shift, shift), (shift, shift), (0, 0)), constant_values=background)
    offsets = jax.random.randint(key, (b, 2), 0, 2 * shift + 1)
    crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))
    return jax.vmap(crop)(padded, offsets)


def make_clip_loss_fn(model, config, table: np.ndarray):
    """loss(params, batch, rng) -> (loss, (batch accuracy, logit scale)) with a fresh caption per example."""
    from research.models.clip import LOG_100, clip_loss, siglip_loss

    table = jnp.asarray(table)
    num_templates = table.shape[1]
    background = -1.0 if config.data.centered else 0.0
    shift, siglip = int(config.clip.shift), config.clip.loss == "siglip"

    flat = table.reshape(-1, table.shape[-1])

    def loss_fn(params, batch, rng):
        labels = batch["label"].astype(jnp.int32)
        template_key, shift_key = jax.random.split(rng)
        images = random_shift(batch["image"], shift_key, shift, background)
        variables = {"params": params}
        image_emb = model.apply(variables, images, method=model.encode_image)
        if "tokens" in batch:  # the data's own captions: caption i describes image i alone
            text_emb = model.apply(variables, batch["tokens"], method=model.encode_text)
            labels = jnp.arange(labels.shape[0])
        elif flat.shape[0] < labels.shape[0]:
            index = labels * num_templates + jax.random.randint(template_key, labels.shape, 0, num_templates)
            # Fewer distinct captions than examples: encode each once and gather (the same embeddings and
            # gradients as encoding the batch's captions one by one, at a fraction of the text tower's cost).
            text_emb = model.apply(variables, flat, method=model.encode_text)[index]
        else:
            index = labels * num_templates + jax.random.randint(template_key, labels.shape, 0, num_templates)
            text_emb = model.apply(variables, flat[index], method=model.encode_text)
        if siglip:
            loss = siglip_loss(image_emb, text_emb, params["logit_scale"], params["logit_bias"])
        else:
            loss = clip_loss(image_emb, text_emb, params["logit_scale"])
        sims = image_emb @ text_emb.T  # argmax is unaffected by the normalisation of the images' rows
        sims = sims / jnp.linalg.norm(text_emb, axis=-1)[None, :]
        accuracy = jnp.mean((labels[jnp.argmax(sims, axis=1)] == labels).astype(jnp.float32))
        # the inverse temperature the loss used (CLIP's loss reads the parameter through the clamp)
        scale = jnp.exp(params["logit_scale"] if siglip else jnp.minimum(params["logit_scale"], LOG_100))
        return loss, (accuracy, scale)

    return loss_fn


def make_clip_step(loss_fn, txs, lr_schedule, ema_decay: float, ema_warmup: bool):
    from research.models.clip import clamp_logit_scale

    def train_step(state, batch):
        step = state.step
        rng = jax.random.fold_in(state.rng, step)
        (loss, (accuracy, scale)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params["net"], batch, rng)
        state = apply_gradients(state, {"net": grads}, txs, ema_decay_at(state.step, ema_decay, ema_warmup))
        state = state.replace(
            params={**state.params, "net": clamp_logit_scale(state.params["net"])},
            ema_params={k: clamp_logit_scale(v) for k, v in state.ema_params.items()},
        )
        metrics = {
            "loss": loss,
            "batch_accuracy": accuracy,
            "logit_scale": scale,
            "grad_norm": optax.global_norm(grads),
            "lr": lr_schedule(step),
        }
        return state, metrics

    return train_step


def encoders(model, batch_size: int = 500):
    """(encode_images(params, uint8 or float images) -> [N, D] numpy, encode_tokens(params, tokens) -> [N, D]),
    each one compiled program on fixed-size batches (research.metrics.clip.embed_in_batches)."""
    from research.metrics.clip import embed_in_batches

    image_fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_image))
    text_fn = jax.jit(lambda p, t: model.apply({"params": p}, t, method=model.encode_text))

    def encode_images(params, images, progress=False):
        fn = lambda x: image_fn(params, x)
        return embed_in_batches(fn, images, min(batch_size, len(images)), desc="images", progress=progress)

    def encode_tokens(params, tokens, progress=False):
        fn = lambda t: text_fn(params, t)
        return embed_in_batches(fn, tokens, min(batch_size, len(tokens)), desc="captions", progress=progress)

    return encode_images, encode_tokens


def zeroshot(encode, params, images, labels, heldout_tokens: np.ndarray) -> dict:
    """Zero-shot accuracy of images [N, H, W, C] (model range) with the prompt ensemble of heldout_tokens
    [classes, templates, L]; encode is the pair `encoders(model)` returns (compiled once, reused every call)."""
    from research.metrics.clip import zeroshot_accuracy, zeroshot_classifier

    encode_images, encode_tokens = encode
    c, t, length = heldout_tokens.shape
    text = encode_tokens(params, heldout_tokens.reshape(c * t, length)).reshape(c, t, -1)
    return zeroshot_accuracy(encode_images(params, images), labels, zeroshot_classifier(text))


@register_task("clip")
class ClipTask(Task):
    def validate(self, config) -> None:
        if config.model.name != "clip":
            raise ConfigError(
                f"task='clip' trains model 'clip' (see configs/clip_fashion.py), not {config.model.name!r}"
            )
        if config.latent.autoencoder:
            raise ConfigError("task='clip' sees pixels; set latent.autoencoder=''")
        if int(config.model.image_size) != int(config.data.image_size):
            raise ConfigError(
                f"model.image_size={config.model.image_size} but data.image_size={config.data.image_size}; set equal"
            )
        if config.model.image_size % config.model.patch_size:
            raise ConfigError(
                f"model.image_size={config.model.image_size} is not divisible by model.patch_size="
                f"{config.model.patch_size}"
            )
        if config.clip.loss == "siglip" and config.model.get("logit_bias_init") is None:
            raise ConfigError("clip.loss='siglip' learns a bias: set model.logit_bias_init (SigLIP: -10)")
        if config.clip.loss == "clip" and config.model.get("logit_bias_init") is not None:
            raise ConfigError("clip.loss='clip' has no logit bias: set model.logit_bias_init=None")
        if int(config.clip.shift) < 0:
            raise ConfigError(f"clip.shift must be >= 0, got {config.clip.shift}")

    def build_trainer(self, config, mesh) -> Trainer:
        # Captions are checked here, not in validate, so that `research.summary` describes a config (such as
        # configs/clip_vitb32.py) whose data this codebase cannot caption yet.
        if config.data.name not in CAPTIONED and not source_captions(config):
            raise ConfigError(
                f"task='clip' trains on captioned data; data.name={config.data.name!r} has no captions here: use "
                f"{list(CAPTIONED)} (template captions), data.name='imagefolder' (metadata.jsonl) or 'tfds' with "
                "data.caption_key"
            )
        if source_captions(config):
            _tokenizer(config)  # fails now, not at the first batch, when the tokenizer folder is missing
            train_tokens = np.zeros((1, 1, int(config.model.context_length)), np.int32)  # unused
        else:
            # The tokenizer loads and every caption fits model.context_length (the held-out ones are the preview's).
            train_tokens, _ = caption_tokens(config, "train"), caption_tokens(config, "heldout")
        tc = config.train
        model = build_network(config)
        txs = {"net": make_optimizer(config.optim, tc.num_steps)}
        lr_schedule = learning_rate_schedule(config.optim, tc.num_steps)
        loss_fn = make_clip_loss_fn(model, config, train_tokens)
        step_fn = make_clip_step(loss_fn, txs, lr_schedule, tc.ema_decay, tc.ema_warmup)
        ema_parts = ("net",) if tc.ema_decay > 0 else ()

        def init(key):
            return init_train_state({"net": init_net_params(model, config, key)}, txs, config.seed, ema_parts=ema_parts)

        abstract = jax.eval_shape(
            lambda p: init_train_state({"net": p}, txs, config.seed, ema_parts=ema_parts),
            abstract_net_params(model, config),
        )
        return compile_trainer(config, mesh, model, abstract, init, step_fn, model_meta(config, abstract))

    def batch_preparer(self, config, trainer: Trainer):
        if not source_captions(config):
            return None
        from research.data.text import tokenize

        tokenizer, length = _tokenizer(config), int(config.model.context_length)

        def prepare(batch, step):
            arrays = {k: v for k, v in batch.items() if isinstance(v, jax.Array)}
            tokens = tokenize(tokenizer, list(batch["caption"]), length)
            return dict(arrays, tokens=jax.make_array_from_process_local_data(trainer.batch_sharding, tokens))

        return prepare

    def preview(self, config, trainer: Trainer):
        if source_captions(config):
            return self._retrieval_preview(config, trainer)
        from research.data import get_source, make_eval_arrays, to_model_range

        num = min(int(config.clip.eval_num), len(get_source(config.data, "test")))
        pixels, labels = make_eval_arrays(config.data, "test", num)
        images = to_model_range(pixels, centered=config.data.centered)
        heldout = caption_tokens(config, "heldout")
        encode = encoders(trainer.model)

        def write(state, path):
            workdir = os.path.dirname(os.path.dirname(path))
            step = int(jax.device_get(state.step))
            params = jax.device_get(state.sampling_params("net"))
            result = zeroshot(encode, params, images, labels, heldout)
            log_path = os.path.join(workdir, "zeroshot.jsonl")
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, "num": num, **result}) + "\n")
            return plot_curve(log_path, path)

        return write

    def _retrieval_preview(self, config, trainer: Trainer):
        """Image<->caption recall@1/5 of the first clip.eval_num test pairs, appended to RUN/retrieval.jsonl."""
        from research.data import DataError, get_source, read_fields, to_model_range
        from research.data.text import tokenize
        from research.metrics.clip import retrieval_recall

        try:
            source = get_source(config.data, "test")
        except DataError:  # a folder without a test split: the first pairs of the training data
            source = get_source(config.data, "train")
        fields = read_fields(source, np.arange(min(int(config.clip.eval_num), len(source))))
        images = to_model_range(fields["image"], centered=config.data.centered)
        tokens = tokenize(_tokenizer(config), list(fields["caption"]), int(config.model.context_length))
        encode_images, encode_tokens = encoders(trainer.model)

        def write(state, path):
            workdir = os.path.dirname(os.path.dirname(path))
            params = jax.device_get(state.sampling_params("net"))
            result = retrieval_recall(encode_images(params, images), encode_tokens(params, tokens))
            log_path = os.path.join(workdir, "retrieval.jsonl")
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": int(jax.device_get(state.step)), "num": len(images), **result}) + "\n")
            return plot_curve(log_path, path, key="i2t@1", ylabel="image->text recall@1 (test pairs)")

        return write


def _tokenizer(config):
    return tokenizer_or_config_error(config.clip.tokenizer)


def plot_curve(log_path: str, png_path: str, key: str = "top1", ylabel: str = "zero-shot top-1 (held-out templates)"):
    """The zero-shot learning curve of RUN/zeroshot.jsonl drawn to png_path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {}
    for line in open(log_path):
        row = json.loads(line)
        rows[row["step"]] = row  # a resumed run rewrites a step: keep the last
    steps = sorted(rows)
    os.makedirs(os.path.dirname(png_path) or ".", exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(steps, [rows[s][key] for s in steps], "o-")
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
