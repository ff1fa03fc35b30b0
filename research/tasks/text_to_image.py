"""task='text_to_image': a text-conditional diffusion model (Rombach et al. 2022's latent diffusion with a text
encoder; Stable Diffusion is this task at scale), in pixel or latent space.

Network: model.name='cond_unet' (research/models/cond_unet.py), conditioned on Cond(text=[B, L, D], text_mask) from
a CLIP text transformer (research/models/clip.py) through cross-attention:
  text.encoder=''      the encoder is trained with the U-Net from scratch (LDM's choice for its text-to-image
                       models): a second trainable part 'text', width text.width, text.layers blocks;
  text.encoder=RUN     the text tower of a CLIP run of this codebase (task='clip'), frozen: referenced by its
                       workdir and checked by a digest of its weights at every resume, as the autoencoder is.
text.output_layer picks the block whose (final-LN) hidden states condition (-2: SD 2's penultimate layer);
text.mask=True lets cross-attention ignore the padding after the end token (Stable Diffusion attends all 77).

Captions: for MNIST, Fashion-MNIST and the 8x8 digits a caption is one of the data set's training templates filled
with the class name ("a photo of a coat.", "the digit 7."), drawn anew per example and step inside the compiled
step (research/data/text.py); an imagefolder with metadata.jsonl or TFDS with data.caption_key bring their own,
tokenized by the batch preparer. Prompt dropout (classifier-free guidance): with probability
diffusion.cond_drop_prob an example's caption becomes the empty prompt, which is the null condition at sampling.

Loss: L_simple on the configured target (eps, x0 or v). Latent diffusion (latent.autoencoder): as in task
'diffusion' (frozen autoencoder, optional latent cache for template-captioned data).

Sampling (`research.sample`, previews): one prompt per class, the class name in the data set's first training
template, cycling through the classes; `--guidance` is classifier-free guidance against the empty prompt.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.cond import Cond
from research.config import ConfigError
from research.diffusion import gaussian
from research.sampling import schedule_from_config
from research.shapes import abstract_net_params, build_network, init_net_params, latent_enabled
from research.tasks import SampleOptions, Samples, Task, Trainer, register_task
from research.tasks.common import (
    compile_trainer,
    model_meta,
    source_captions,
    tokenizer_or_config_error,
    validate_network,
)
from research.tasks.diffusion import (
    DiffusionTask,
    _validate_latent,
    check_sample_options,
    frozen_autoencoder,
    options_generator,
    samples_name,
)
from research.train import grads as grads_lib
from research.train import mesh as mesh_lib
from research.train.state import apply_gradients, ema_decay_at, init_train_state, learning_rate_schedule, make_optimizer

TEMPLATE_CAPTIONED = ("mnist", "fashion_mnist", "mnist_fashion", "digits")


def token_mask(tokens: jax.Array, eos_token_id: int) -> jax.Array:
    """[B, L] bool: True up to and including each row's first end token (the caption), False on the padding."""
    is_eos = tokens == eos_token_id
    before = jnp.cumsum(is_eos, axis=1) - is_eos  # end tokens strictly before each position
    return before == 0


class TextEncoder:
    """The run's text encoder: a CLIPTextTransformer, its frozen parameters (None when it trains with the U-Net),
    and `cond(params, tokens [B, L]) -> Cond(text [B, L, width], text_mask)`."""

    def __init__(self, module, frozen_params, reference, output_layer: int, mask: bool):
        self.module, self.frozen_params, self.reference = module, frozen_params, reference
        self.output_layer, self.mask = int(output_layer), bool(mask)

    @property
    def trainable(self) -> bool:
        return self.frozen_params is None

    @property
    def context_length(self) -> int:
        return int(self.module.context_length)

    def cond(self, params, tokens: jax.Array) -> Cond:
        hidden, _ = self.module.apply({"params": params}, tokens, output_layer=self.output_layer)
        mask = token_mask(tokens, self.module.eos_token_id) if self.mask else None
        return Cond(text=hidden, text_mask=mask)


def build_text_encoder(config, *, load: bool = True) -> TextEncoder:
    """The text encoder config.text describes; a CLIP run's weights are read only with load=True."""
    from research.models.clip import CLIPTextTransformer, text_tower_fields

    tc = config.text
    if not tc.encoder:
        fields = dict(
            vocab_size=49408,
            context_length=int(tc.context_length),
            width=int(tc.width),
            layers=int(tc.layers),
            heads=int(tc.heads),
            mlp_dim=int(tc.get("mlp_dim", 0)),
            act=str(tc.act),
            eos_token_id=49407,
            layer_norm_eps=1e-5,
        )
        return TextEncoder(CLIPTextTransformer(**fields), None, None, tc.output_layer, tc.mask)
    from research.run import load_params, read_config

    try:
        clip_config = read_config(tc.encoder)
    except ConfigError:
        raise ConfigError(
            f"text.encoder={tc.encoder!r} has no config.json: train a CLIP first (python -m research.train --config "
            f"configs/clip_fashion.py --workdir RUN) or set text.encoder='' to train a text encoder with the U-Net"
        ) from None
    if clip_config.task != "clip":
        raise ConfigError(f"text.encoder={tc.encoder!r} is a {clip_config.task!r} run, not a CLIP run (task='clip')")
    module = CLIPTextTransformer(**text_tower_fields(clip_config.model.to_dict()))
    if not load:
        return TextEncoder(module, {}, None, tc.output_layer, tc.mask)
    from research.latents import params_digest

    _, params, step = load_params(tc.encoder, part="net")
    text_params = jax.device_get(params["text"])
    reference = {"workdir": tc.encoder, "step": int(step), "sha256": params_digest(text_params)}
    return TextEncoder(module, text_params, reference, tc.output_layer, tc.mask)


def _tokenizer(config):
    return tokenizer_or_config_error(config.text.tokenizer)


def class_prompts(config) -> list:
    """The sampler's prompts: each class name in the data set's first training template."""
    from research.data.text import captions

    return [row[0] for row in captions(config.data.name, "train")]


def prompt_tokens(config, context_length: int):
    """(caption table [classes, templates, L] or None for data with its own captions, empty prompt [L])."""
    from research.data import DataError
    from research.data.text import caption_table, tokenize

    tokenizer = _tokenizer(config)
    empty = tokenize(tokenizer, [""], context_length)[0]
    if source_captions(config):
        return None, empty
    try:
        return caption_table(tokenizer, config.data.name, "train", context_length), empty
    except DataError as e:
        raise ConfigError(str(e).splitlines()[0]) from None


def make_t2i_loss_fn(unet, encoder: TextEncoder, schedule, config, table, empty):
    """loss(params {'net'[, 'text']}, batch, rng, frozen text params) -> (loss, {})."""
    prediction, drop_prob = config.diffusion.prediction, float(config.diffusion.cond_drop_prob)
    num_steps = schedule.num_steps
    timesteps = jnp.asarray(schedule.timesteps, jnp.int32)
    table = None if table is None else jnp.asarray(table)
    empty = jnp.asarray(empty)

    def loss_fn(params, batch, rng, frozen_text):
        x0 = batch["image"]
        b, channels = x0.shape[0], x0.shape[-1]
        t_rng, noise_rng, dropout_rng, caption_rng, drop_rng = jax.random.split(rng, 5)
        if "tokens" in batch:
            tokens = batch["tokens"]
        else:
            labels = batch["label"].astype(jnp.int32)
            tokens = table[labels, jax.random.randint(caption_rng, labels.shape, 0, table.shape[1])]
        if drop_prob > 0:
            drop = jax.random.bernoulli(drop_rng, drop_prob, (b,))
            tokens = jnp.where(drop[:, None], empty[None], tokens)
        cond = encoder.cond(params["text"] if encoder.trainable else frozen_text, tokens)
        t = jax.random.randint(t_rng, (b,), 0, num_steps)
        noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
        x_t = gaussian.q_sample(schedule, x0, t, noise)
        output = unet.apply(
            {"params": params["net"]}, x_t, timesteps[t], cond, train=True, rngs={"dropout": dropout_rng}
        )
        return jnp.mean(gaussian.simple_loss(schedule, x0, t, noise, output[..., :channels], prediction)), {}

    return loss_fn


def make_t2i_step(loss_fn, txs, lr_schedule, ema_decay: float, ema_warmup: bool, microbatches: int = 1):
    def train_step(state, batch, frozen_text):
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, _), grads = grads_lib.value_and_grad(
            loss_fn, state.params, batch, rng, frozen_text, microbatches=microbatches, loss_scale=state.loss_scale
        )
        new_state = apply_gradients(state, grads, txs, ema_decay_at(state.step, ema_decay, ema_warmup))
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": lr_schedule(state.step)}
        metrics.update(grads_lib.scale_metrics(state))
        return new_state, metrics

    return train_step


def text_conditioner(encoder: TextEncoder, text_params, tokens, empty):
    from research.sampling import TextConditioner

    return TextConditioner(encoder.cond, text_params, np.asarray(tokens), np.asarray(empty))


@register_task("text_to_image")
class TextToImageTask(Task):
    gradient_options = True

    def validate(self, config) -> None:
        if config.model.name != "cond_unet":
            raise ConfigError(
                f"task='text_to_image' trains the text-conditional U-Net (model.name='cond_unet'), not "
                f"{config.model.name!r}"
            )
        validate_network(config)
        d, tc = config.diffusion, config.text
        if d.loss != "simple" or d.var_type == "learned_range":
            raise ConfigError("task='text_to_image' trains with diffusion.loss='simple' and a fixed variance")
        if not 0.0 <= d.cond_drop_prob < 1.0:
            raise ConfigError(f"diffusion.cond_drop_prob={d.cond_drop_prob} must be in [0, 1)")
        if config.data.name not in TEMPLATE_CAPTIONED and not source_captions(config):
            raise ConfigError(
                f"task='text_to_image' needs captions: data.name={config.data.name!r} has none; use "
                f"{list(TEMPLATE_CAPTIONED)} (class-name templates), 'imagefolder' (metadata.jsonl) or 'tfds' "
                "with data.caption_key"
            )
        if source_captions(config) and latent_enabled(config) and config.latent.cache:
            raise ConfigError(
                "the latent cache keeps images and labels, not captions: set latent.cache=False for data with "
                "its own captions"
            )
        if not tc.encoder:
            if tc.act not in ("quick_gelu", "gelu"):
                raise ConfigError(f"text.act={tc.act!r} is not valid; choose one of ['quick_gelu', 'gelu']")
            for key in ("width", "layers", "heads", "context_length"):
                if int(tc[key]) < 1:
                    raise ConfigError(f"text.{key} must be >= 1, got {tc[key]}")
            if tc.width % tc.heads:
                raise ConfigError(f"text.width={tc.width} does not split into text.heads={tc.heads} heads")
        encoder = build_text_encoder(config, load=False)
        width = int(encoder.module.width)
        if width != int(config.model.cross_attention_dim):
            where = f"the CLIP run {tc.encoder}'s text width" if tc.encoder else "text.width"
            raise ConfigError(f"model.cross_attention_dim={config.model.cross_attention_dim} but {where} is {width}")
        if not -int(encoder.module.layers) <= int(tc.output_layer) <= -1:
            raise ConfigError(f"text.output_layer={tc.output_layer}; give -1 .. -{encoder.module.layers}")
        _validate_latent(config)

    def resolve(self, config):
        import os

        if config.text.encoder:
            config = config.copy_and_resolve_references()
            config.text.encoder = os.path.abspath(config.text.encoder)
        if latent_enabled(config):
            from research.latents import resolve_latent_config

            config = resolve_latent_config(config)
        return config

    def build_trainer(self, config, mesh) -> Trainer:
        tc = config.train
        unet = build_network(config)
        encoder = build_text_encoder(config)
        table, empty = prompt_tokens(config, encoder.context_length)
        schedule = schedule_from_config(config.diffusion)
        parts = ("net", "text") if encoder.trainable else ("net",)
        txs = {part: make_optimizer(config.optim, tc.num_steps) for part in parts}
        lr_schedule = learning_rate_schedule(config.optim, tc.num_steps)
        loss_fn = make_t2i_loss_fn(unet, encoder, schedule, config, table, empty)
        step_fn = make_t2i_step(loss_fn, txs, lr_schedule, tc.ema_decay, tc.ema_warmup, tc.grad_accum)
        loss_scale = grads_lib.loss_scale_for(config)
        tokens = jnp.zeros((1, encoder.context_length), jnp.int32)

        def init_params(key):
            net_key, text_key = jax.random.split(key)
            params = {"net": init_net_params(unet, config, net_key)}
            if encoder.trainable:
                params["text"] = encoder.module.init(text_key, tokens)["params"]
            return params

        def init(key):
            return init_train_state(init_params(key), txs, config.seed, ema_parts=parts, loss_scale=loss_scale)

        abstract_params = {"net": abstract_net_params(unet, config)}
        if encoder.trainable:
            abstract_params["text"] = jax.eval_shape(lambda: encoder.module.init(jax.random.PRNGKey(0), tokens))[
                "params"
            ]
        abstract = jax.eval_shape(
            lambda p: init_train_state(p, txs, config.seed, ema_parts=parts, loss_scale=loss_scale), abstract_params
        )
        meta = model_meta(config, abstract)
        frozen = {}
        if not encoder.trainable:
            frozen["text_encoder"] = encoder.reference
        context = {"encoder": encoder, "empty": empty, "table": table}
        if latent_enabled(config):
            context["autoencoder"], frozen["autoencoder"] = frozen_autoencoder(config)
        if frozen:
            meta["frozen"] = frozen
        frozen_text = encoder.frozen_params if not encoder.trainable else {}
        frozen_sh = mesh_lib.frozen_shardings(mesh, "text", frozen_text, config.train)
        trainer = compile_trainer(config, mesh, unet, abstract, init, step_fn, meta, step_extra_args=(frozen_sh,))
        program, frozen_on_mesh = trainer.step, jax.device_put(frozen_text, frozen_sh)
        trainer.step = lambda state, batch: program(state, batch, frozen_on_mesh)
        trainer.schedule, trainer.context = schedule, context
        return trainer

    data_source = DiffusionTask.data_source  # the latent cache, for template-captioned data

    def batch_preparer(self, config, trainer):
        to_latents = None
        if latent_enabled(config):
            from research.latents import make_latent_fn

            to_latents = make_latent_fn(
                trainer.context["autoencoder"],
                cached=bool(config.latent.cache),
                seed=config.seed,
                out_sharding=trainer.batch_sharding,
                train_config=config.train,
            )
        tokenizer = _tokenizer(config) if source_captions(config) else None
        if to_latents is None and tokenizer is None:
            return None
        from research.data.text import tokenize

        length = trainer.context["encoder"].context_length

        def prepare(batch, step):
            out = {k: v for k, v in batch.items() if isinstance(v, jax.Array)}
            if to_latents is not None:
                out["image"] = to_latents(batch["image"], step)
            if tokenizer is not None:
                tokens = tokenize(tokenizer, list(batch["caption"]), length)
                out["tokens"] = jax.make_array_from_process_local_data(trainer.batch_sharding, tokens)
            return out

        return prepare

    def preview(self, config, trainer):
        from research.images import save_grid
        from research.sampling import Generator, to_uint8

        if source_captions(config):
            return None  # no class prompts to draw; research.generate takes prompts
        encoder, holder = trainer.context["encoder"], {}
        tokens = trainer.context["table"][:, 0]
        num = min(config.sample.num, config.sample.batch_size)

        def write(state, path):
            text_params = state.sampling_params("text", config.sample.use_ema) if encoder.trainable else None
            text_params = encoder.frozen_params if text_params is None else text_params
            if "generator" not in holder:
                holder["generator"] = Generator(
                    trainer.model,
                    config,
                    batch_size=num,
                    autoencoder=trainer.context.get("autoencoder"),
                    text=text_conditioner(encoder, text_params, tokens, trainer.context["empty"]),
                )
            gen = holder["generator"]
            gen.text.params = text_params
            samples, _, _ = gen.generate(
                state.sampling_params("net", config.sample.use_ema), num, seed=config.seed, progress=False
            )
            return save_grid(to_uint8(samples, config.data.centered), path)

        return write

    def sampler(self, workdir: str, config, options: SampleOptions):
        from research.loader import load_run
        from research.run import load_params
        from research.sampling import to_uint8

        if options.classifier is not None:
            raise ConfigError("classifier guidance of a text-to-image run is not supported: drop --classifier")
        if source_captions(config):
            raise ConfigError(
                f"{workdir} was trained on captions of its own data, so it has no class prompts to sample: "
                "give prompts to python -m research.generate --pretrained WORKDIR --prompt '...'"
            )
        check_sample_options(config, options)
        _, model, params, step = load_run(workdir, options.step, use_ema=options.use_ema)
        encoder = build_text_encoder(config)
        if encoder.trainable:
            _, text_params, _ = load_params(workdir, step, part="text", use_ema=options.use_ema)
        else:
            text_params = encoder.frozen_params
        table, empty = prompt_tokens(config, encoder.context_length)
        conditioner = text_conditioner(encoder, text_params, table[:, 0], empty)

        def run(num, seed=0, progress=True):
            gen = options_generator(model, config, options, num, text=conditioner)
            labels = np.arange(num) % conditioner.num_prompts
            samples, _, nfe = gen.generate(params, num, seed=seed, labels=labels, progress=progress)
            return Samples(
                to_uint8(samples, config.data.centered),
                labels,
                nfe,
                samples_name(gen, config, options, seed),
                f"step {step} with {gen.sampler} ({gen.num_steps} steps, eta={gen.eta:g}, NFE={nfe}); prompts: "
                + "; ".join(class_prompts(config)),
            )

        run.step = step
        return run
