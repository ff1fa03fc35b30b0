"""Training latent diffusion's KL autoencoder (Rombach et al. 2022) with the generic loop (config.task='autoencoder').

Objective of the autoencoder, per batch of B images x [B, H, W, C]:

    L = mean_b sum_pixels rec(x, x_hat) + kl_weight * mean_b KL(q(z|x_b) || N(0, I)) + lambda * L_gan

with rec = |.| (l1) or (.)^2 (l2) and x_hat decoded from a reparameterised posterior sample. Both sums are over
all pixels / latent dimensions of one example, as in LDM, so its kl_weight (1e-6) carries over. LDM's learnable
output log-variance on the reconstruction term and its LPIPS term are left out (no pretrained network here).

Adversarial part (when autoencoder.disc_weight > 0), from step disc_start on, as in LDM:
  generator      L_gan = -mean(D(x_hat))
  discriminator  L_D = mean(relu(1 - D(x))) + mean(relu(1 + D(sg(x_hat))))  (hinge; LDM halves it, which Adam
                 makes immaterial)
  lambda = disc_weight * clip(|grad_W L_rec| / (|grad_W L_gan| + 1e-4), 0, 1e4), W the decoder's last conv,
  with adaptive_disc_weight (otherwise lambda = disc_weight). The two gradients come from one forward pass and
  two backward passes (jax.vjp), and the total gradient is their lambda-weighted sum: LDM's detached weight.
The discriminator is trained on the reconstructions of the same step (the autoencoder before its update) with
its own Adam; before disc_start neither it nor its optimizer state changes, and the step skips it entirely.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.config import ConfigError
from research.models.registry import check_input_shape
from research.models.vae import PatchDiscriminator
from research.shapes import build_network
from research.tasks import Task, Trainer, register_task
from research.tasks.common import compile_trainer, model_meta
from research.train.state import (
    TrainState,
    apply_gradients,
    ema_decay_at,
    init_train_state,
    learning_rate_schedule,
    make_optimizer,
)

# --------------------------------------------------------------------------- losses


def reconstruction_loss(x: jax.Array, x_hat: jax.Array, kind: str = "l1") -> jax.Array:
    """Per-example reconstruction error summed over pixels and channels: [B, H, W, C] x2 -> [B]."""
    diff = x_hat.astype(jnp.float32) - x.astype(jnp.float32)
    err = jnp.abs(diff) if kind == "l1" else jnp.square(diff)
    return jnp.sum(err, axis=tuple(range(1, err.ndim)))


def hinge_discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat))), each mean over all logits of the map."""
    return jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake))


def hinge_generator_loss(logits_fake: jax.Array) -> jax.Array:
    return -jnp.mean(logits_fake)


def adaptive_gan_weight(
    rec_grad: jax.Array, gan_grad: jax.Array, eps: float = 1e-4, max_weight: float = 1e4
) -> jax.Array:
    """LDM's balance |grad L_rec| / (|grad L_gan| + eps), clipped to [0, max_weight], from the two losses'
    gradients at one parameter (the decoder's last conv kernel)."""
    ratio = jnp.linalg.norm(rec_grad.ravel()) / (jnp.linalg.norm(gan_grad.ravel()) + eps)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, max_weight))


def psnr(x: jax.Array, x_hat: jax.Array, centered: bool = True) -> jax.Array:
    """Per-image PSNR in dB, [B], for pixels in [-1, 1] (centered) or [0, 1]; x_hat is clipped to that range
    first, as a saved image would be."""
    lo, hi = (-1.0, 1.0) if centered else (0.0, 1.0)
    mse = jnp.mean(jnp.square(jnp.clip(x_hat, lo, hi) - x), axis=tuple(range(1, x.ndim)))
    return 10.0 * jnp.log10((hi - lo) ** 2 / jnp.maximum(mse, 1e-12))


# --------------------------------------------------------------------------- step


def make_discriminator(ac) -> Optional[PatchDiscriminator]:
    if ac.disc_weight <= 0:
        return None
    return PatchDiscriminator(ch=ac.disc_ch, num_layers=ac.disc_layers, norm_groups=ac.disc_norm_groups)


def make_autoencoder_step(model, disc, ac, txs, lr_schedule, ema_decay: float, ema_warmup: bool, centered: bool = True):
    """(state, {'image': [B, H, W, C]}) -> (state, metrics). ac is config.autoencoder; the state's parts are
    'net' (the autoencoder, with an EMA) and, with a discriminator, 'disc'."""
    kind, kl_weight, disc_weight = ac.recon_loss, float(ac.kl_weight), float(ac.disc_weight)
    adaptive, disc_start = bool(ac.adaptive_disc_weight), int(ac.disc_start)

    def train_step(state: TrainState, batch):
        x = batch["image"]
        net = state.params["net"]
        disc_params = state.params.get("disc")
        sample_key, dropout_key = jax.random.split(jax.random.fold_in(state.rng, state.step))

        def rec_and_kl(params):
            x_hat, posterior = model.apply({"params": params}, x, sample_key, train=True, rngs={"dropout": dropout_key})
            return reconstruction_loss(x, x_hat, kind).mean(), posterior.kl().mean(), x_hat

        def without_gan(_):
            def objective(params):
                rec, kl, x_hat = rec_and_kl(params)
                return rec + kl_weight * kl, (rec, kl, x_hat)

            (loss, (rec, kl, x_hat)), grads = jax.value_and_grad(objective, has_aux=True)(net)
            zero = jnp.zeros((), jnp.float32)
            gan = {"g_loss": zero, "d_loss": zero, "d_weight": zero, "logits_real": zero, "logits_fake": zero}
            d_grads = None if disc_params is None else jax.tree.map(jnp.zeros_like, disc_params)
            return grads, d_grads, loss, rec, kl, x_hat, gan

        def with_gan(_):
            def terms(params):
                rec, kl, x_hat = rec_and_kl(params)
                g_loss = hinge_generator_loss(disc.apply({"params": disc_params}, x_hat))
                return (rec, kl, g_loss), x_hat

            (rec, kl, g_loss), backward, x_hat = jax.vjp(terms, net, has_aux=True)
            one, zero = jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32)
            if adaptive:
                grads_rec = backward((one, kl_weight * one, zero))[0]
                grads_gan = backward((zero, zero, one))[0]
                last = lambda g: g["decoder"]["conv_out"]["kernel"]  # noqa: E731
                d_weight = disc_weight * adaptive_gan_weight(last(grads_rec), last(grads_gan))
                grads = jax.tree.map(lambda a, b: a + d_weight * b, grads_rec, grads_gan)
            else:
                d_weight = jnp.asarray(disc_weight, jnp.float32)
                grads = backward((one, kl_weight * one, d_weight))[0]

            # One discriminator pass over [real; fake]: its GroupNorm keeps examples independent.
            both = jnp.concatenate([x, jax.lax.stop_gradient(x_hat)], axis=0)

            def d_objective(params):
                logits = disc.apply({"params": params}, both)
                real, fake = jnp.split(logits, 2, axis=0)
                return hinge_discriminator_loss(real, fake), (real.mean(), fake.mean())

            (d_loss, (real_mean, fake_mean)), d_grads = jax.value_and_grad(d_objective, has_aux=True)(disc_params)
            loss = rec + kl_weight * kl + d_weight * g_loss
            gan = {
                "g_loss": g_loss,
                "d_loss": d_loss,
                "d_weight": d_weight,
                "logits_real": real_mean,
                "logits_fake": fake_mean,
            }
            return grads, d_grads, loss, rec, kl, x_hat, gan

        ema = ema_decay_at(state.step, ema_decay, ema_warmup)
        if disc is None:
            grads, _, loss, rec, kl, x_hat, gan = without_gan(None)
            new_state, gan = apply_gradients(state, {"net": grads}, txs, ema), {}
        else:
            active = state.step >= disc_start
            grads, d_grads, loss, rec, kl, x_hat, gan = jax.lax.cond(active, with_gan, without_gan, None)
            new_state = apply_gradients(state, {"net": grads, "disc": d_grads}, txs, ema)
            # Before disc_start neither the discriminator nor its optimizer state may change (Adam would move
            # the moments' counters even on zero gradients).
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(active, a, b), new, old)  # noqa: E731
            new_state = new_state.replace(
                params={**new_state.params, "disc": keep(new_state.params["disc"], disc_params)},
                opt_state={**new_state.opt_state, "disc": keep(new_state.opt_state["disc"], state.opt_state["disc"])},
            )
        metrics = {
            "loss": loss,
            "rec_loss": rec,
            "kl": kl,
            "mse": jnp.mean(jnp.square(x_hat - x)),
            "psnr": jnp.mean(psnr(x, x_hat, centered)),
            "grad_norm": optax.global_norm(grads),
            "lr": lr_schedule(state.step),
            **gan,
        }
        return new_state, metrics

    return train_step


# --------------------------------------------------------------------------- the task


@register_task("autoencoder")
class AutoencoderTask(Task):
    """The KL autoencoder of latent diffusion; `research.latents.load_autoencoder` reads its runs."""

    def validate(self, config) -> None:
        if config.model.name != "vae":
            raise ConfigError(
                f"task='autoencoder' trains model 'vae' (see configs/vae_mnist.py), not "
                f"model.name={config.model.name!r}"
            )
        if config.latent.autoencoder:
            raise ConfigError(
                "latent.autoencoder is for diffusion runs; task='autoencoder' trains on pixels "
                "(set latent.autoencoder='')"
            )
        a = config.autoencoder
        for key in ("kl_weight", "disc_weight", "disc_start"):
            if a[key] < 0:
                raise ConfigError(f"autoencoder.{key} must be >= 0, got {a[key]}")
        for key in ("disc_lr", "disc_ch", "disc_layers", "scale_num_images"):
            if a[key] <= 0:
                raise ConfigError(f"autoencoder.{key} must be positive, got {a[key]}")
        if config.autoencoder.recon_loss not in ("l1", "l2"):
            raise ConfigError(f"autoencoder.recon_loss={a.recon_loss!r} is not valid; choose one of ['l1', 'l2']")
        size = config.data.image_size
        try:
            build_network(config)
            check_input_shape(config.model, (size, size, config.data.channels))
        except ValueError as e:
            raise ConfigError(f"data.image_size={size} with model.ch_mult={tuple(config.model.ch_mult)}: {e}") from None
        if a.disc_weight > 0:
            for i in range(1, a.disc_layers + 1):
                c = a.disc_ch * min(2**i, 8)
                if c % min(a.disc_norm_groups, c):
                    raise ConfigError(
                        f"the discriminator's {c} channels (autoencoder.disc_ch * {min(2**i, 8)}) "
                        f"are not divisible by autoencoder.disc_norm_groups={a.disc_norm_groups}"
                    )

    def build_trainer(self, config, mesh) -> Trainer:
        tc, ac, d = config.train, config.autoencoder, config.data
        model = build_network(config)
        disc = make_discriminator(ac)
        txs = {"net": make_optimizer(config.optim, tc.num_steps)}
        if disc is not None:
            txs["disc"] = optax.adam(ac.disc_lr, b1=ac.disc_b1, b2=ac.disc_b2)
        lr_schedule = learning_rate_schedule(config.optim, tc.num_steps)
        example = jnp.zeros((1, d.image_size, d.image_size, d.channels), jnp.float32)

        def init(key):
            ae_key, disc_key = jax.random.split(key)
            params = {"net": model.init(ae_key, example)["params"]}
            if disc is not None:
                params["disc"] = disc.init(disc_key, example)["params"]
            return init_train_state(params, txs, config.seed)

        abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
        step_fn = make_autoencoder_step(model, disc, ac, txs, lr_schedule, tc.ema_decay, tc.ema_warmup, d.centered)
        return compile_trainer(config, mesh, model, abstract, init, step_fn, model_meta(config, abstract))

    def preview(self, config, trainer):
        return ReconstructionGrid(trainer.model, config)

    def on_finish(self, config, trainer, state, workdir) -> None:
        # Computed from the finished run's checkpointed parameters and stored per step beside the checkpoints,
        # so a resumed run that finishes writes it too, and research.latents can recompute it for any step.
        from research.latents import ensure_latent_scale

        use_ema = config.sample.use_ema
        ensure_latent_scale(
            config,
            trainer.model,
            state.sampling_params("net", use_ema),
            workdir,
            int(jax.device_get(state.step)),
            use_ema=use_ema,
        )

    has_sampler = False  # the override below only explains why

    def sampler(self, workdir, config, options=None):
        raise ConfigError(
            f"{workdir} holds an autoencoder, which has no sampler; its reconstructions are in "
            f"{os.path.join(workdir, 'samples')} and research.latents.load_autoencoder loads it"
        )


class ReconstructionGrid:
    """Writes the first sample.num test images (rows of 8) each above its reconstruction (posterior mean,
    EMA parameters when sample.use_ema) to a PNG."""

    def __init__(self, model, config):
        self.model, self.config = model, config
        self._images = None
        self._reconstruct = jax.jit(lambda params, x: model.apply({"params": params}, x)[0])

    def __call__(self, state, path: str) -> str:
        from research.data import make_eval_arrays, to_model_range
        from research.images import save_grid
        from research.sampling import to_uint8

        if self._images is None:
            num = self.config.sample.num
            cols = min(8, num)
            self._images, _ = make_eval_arrays(self.config.data, "test", num - num % cols)
        params = state.sampling_params("net", self.config.sample.use_ema)
        x = to_model_range(self._images, centered=self.config.data.centered)
        recon = to_uint8(jax.device_get(self._reconstruct(params, x)), self.config.data.centered)
        cols = min(8, len(x))
        rows = lambda a: a.reshape(-1, cols, *a.shape[1:])
        pairs = np.stack([rows(self._images), rows(recon)], axis=1)  # [rows, 2, cols, H, W, C]
        return save_grid(pairs.reshape(-1, *pairs.shape[3:]), path, ncols=cols)
