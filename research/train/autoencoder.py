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

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.models import build_model
from research.models.vae import PatchDiscriminator
from research.train import mesh as mesh_lib
from research.train.checkpoint import param_signature
from research.train.state import ema_update, learning_rate_schedule, make_optimizer
from research.train.step import ema_decay_at


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


def adaptive_gan_weight(rec_grad: jax.Array, gan_grad: jax.Array, eps: float = 1e-4,
                        max_weight: float = 1e4) -> jax.Array:
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


# --------------------------------------------------------------------------- state and step

@flax.struct.dataclass
class AutoencoderTrainState:
    step: jax.Array          # int32 scalar: optimizer steps taken
    params: Any              # autoencoder
    ema_params: Any
    opt_state: Any
    rng: jax.Array           # step k uses fold_in(rng, k), as in the diffusion state
    disc_params: Any = None  # None when autoencoder.disc_weight == 0
    disc_opt_state: Any = None


def make_discriminator(ac) -> Optional[PatchDiscriminator]:
    if ac.disc_weight <= 0:
        return None
    return PatchDiscriminator(ch=ac.disc_ch, num_layers=ac.disc_layers, norm_groups=ac.disc_norm_groups)


def make_autoencoder_step(model, disc, ac, tx, disc_tx, lr_schedule, ema_decay: float, ema_warmup: bool,
                          centered: bool = True):
    """(state, {'image': [B, H, W, C]}) -> (state, metrics). ac is config.autoencoder."""
    kind, kl_weight, disc_weight = ac.recon_loss, float(ac.kl_weight), float(ac.disc_weight)
    adaptive, disc_start = bool(ac.adaptive_disc_weight), int(ac.disc_start)

    def train_step(state: AutoencoderTrainState, batch):
        x = batch["image"]
        sample_key, dropout_key = jax.random.split(jax.random.fold_in(state.rng, state.step))

        def rec_and_kl(params):
            x_hat, posterior = model.apply({"params": params}, x, sample_key, train=True,
                                           rngs={"dropout": dropout_key})
            return reconstruction_loss(x, x_hat, kind).mean(), posterior.kl().mean(), x_hat

        def without_gan(_):
            def objective(params):
                rec, kl, x_hat = rec_and_kl(params)
                return rec + kl_weight * kl, (rec, kl, x_hat)
            (loss, (rec, kl, x_hat)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
            zero = jnp.zeros((), jnp.float32)
            gan = {"g_loss": zero, "d_loss": zero, "d_weight": zero, "logits_real": zero, "logits_fake": zero}
            return grads, state.disc_params, state.disc_opt_state, loss, rec, kl, x_hat, gan

        def with_gan(_):
            def terms(params):
                rec, kl, x_hat = rec_and_kl(params)
                g_loss = hinge_generator_loss(disc.apply({"params": state.disc_params}, x_hat))
                return (rec, kl, g_loss), x_hat
            (rec, kl, g_loss), backward, x_hat = jax.vjp(terms, state.params, has_aux=True)
            one, zero = jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32)
            if adaptive:
                grads_rec = backward((one, kl_weight * one, zero))[0]
                grads_gan = backward((zero, zero, one))[0]
                last = lambda g: g["decoder"]["conv_out"]["kernel"]
                d_weight = disc_weight * adaptive_gan_weight(last(grads_rec), last(grads_gan))
                grads = jax.tree.map(lambda a, b: a + d_weight * b, grads_rec, grads_gan)
            else:
                d_weight = jnp.asarray(disc_weight, jnp.float32)
                grads = backward((one, kl_weight * one, d_weight))[0]

            # One discriminator pass over [real; fake]: its GroupNorm keeps examples independent.
            both = jnp.concatenate([x, jax.lax.stop_gradient(x_hat)], axis=0)
            def d_objective(disc_params):
                logits = disc.apply({"params": disc_params}, both)
                real, fake = jnp.split(logits, 2, axis=0)
                return hinge_discriminator_loss(real, fake), (real.mean(), fake.mean())
            (d_loss, (real_mean, fake_mean)), d_grads = jax.value_and_grad(d_objective, has_aux=True)(
                state.disc_params)
            d_updates, disc_opt_state = disc_tx.update(d_grads, state.disc_opt_state, state.disc_params)
            disc_params = optax.apply_updates(state.disc_params, d_updates)
            loss = rec + kl_weight * kl + d_weight * g_loss
            gan = {"g_loss": g_loss, "d_loss": d_loss, "d_weight": d_weight, "logits_real": real_mean,
                   "logits_fake": fake_mean}
            return grads, disc_params, disc_opt_state, loss, rec, kl, x_hat, gan

        if disc is None:
            grads, disc_params, disc_opt_state, loss, rec, kl, x_hat, gan = without_gan(None)
            gan = {}
        else:
            grads, disc_params, disc_opt_state, loss, rec, kl, x_hat, gan = jax.lax.cond(
                state.step >= disc_start, with_gan, without_gan, None)

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, disc_params=disc_params,
            disc_opt_state=disc_opt_state,
            ema_params=ema_update(state.ema_params, params, ema_decay_at(state.step, ema_decay, ema_warmup)))
        metrics = {"loss": loss, "rec_loss": rec, "kl": kl,
                   "mse": jnp.mean(jnp.square(x_hat - x)), "psnr": jnp.mean(psnr(x, x_hat, centered)),
                   "grad_norm": optax.global_norm(grads), "lr": lr_schedule(state.step), **gan}
        return new_state, metrics

    return train_step


# --------------------------------------------------------------------------- trainer

def build_autoencoder_trainer(config, mesh=None):
    """The loop's Trainer for task='autoencoder': same init/step/shardings contract as the diffusion one."""
    from research.train.loop import Trainer  # loop dispatches here; importing it at the top would be circular

    tc, ac, d = config.train, config.autoencoder, config.data
    mesh = mesh if mesh is not None else mesh_lib.make_mesh(tc.mesh_model)
    model = build_model(config.model, out_channels=d.channels)
    disc = make_discriminator(ac)
    tx = make_optimizer(config.optim, tc.num_steps)
    disc_tx = optax.adam(ac.disc_lr, b1=ac.disc_b1, b2=ac.disc_b2)
    lr_schedule = learning_rate_schedule(config.optim, tc.num_steps)
    example = jnp.zeros((1, d.image_size, d.image_size, d.channels), jnp.float32)

    def init_state(key):
        ae_key, disc_key = jax.random.split(key)
        params = model.init(ae_key, example)["params"]
        disc_params = disc.init(disc_key, example)["params"] if disc is not None else None
        return AutoencoderTrainState(
            step=jnp.zeros((), jnp.int32), params=params, ema_params=params, opt_state=tx.init(params),
            rng=jax.random.PRNGKey(config.seed), disc_params=disc_params,
            disc_opt_state=disc_tx.init(disc_params) if disc is not None else None)

    abstract_state = jax.eval_shape(init_state, jax.random.PRNGKey(0))
    state_sh = mesh_lib.state_shardings(mesh, abstract_state)
    batch_sh = mesh_lib.batch_sharding(mesh)
    model_cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.model.to_dict().items()}
    signature = param_signature({"autoencoder": abstract_state.params, "discriminator": abstract_state.disc_params})
    meta = {"params": signature, "model": model_cfg, "task": "autoencoder"}
    step_fn = make_autoencoder_step(model, disc, ac, tx, disc_tx, lr_schedule, tc.ema_decay, tc.ema_warmup,
                                    d.centered)
    init = jax.jit(init_state, out_shardings=state_sh)
    step = jax.jit(step_fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=0)
    preview = ReconstructionGrid(model, config)
    return Trainer(model, None, mesh, abstract_state, state_sh, batch_sh, init, step, meta, False,
                   write_preview=preview)


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
        params = state.ema_params if self.config.sample.use_ema else state.params
        x = to_model_range(self._images, centered=self.config.data.centered)
        recon = to_uint8(jax.device_get(self._reconstruct(params, x)), self.config.data.centered)
        cols = min(8, len(x))
        rows = lambda a: a.reshape(-1, cols, *a.shape[1:])
        pairs = np.stack([rows(self._images), rows(recon)], axis=1)  # [rows, 2, cols, H, W, C]
        return save_grid(pairs.reshape(-1, *pairs.shape[3:]), path, ncols=cols)
