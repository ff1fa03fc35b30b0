"""KL autoencoder for latent diffusion on MNIST (Rombach et al. 2022, "AutoencoderKL"), sized for two CPU cores.

f = 4 with 4 latent channels: 28x28x1 images <-> 7x7x4 latents (28 -> 14 -> 7, three levels). LDM's loss without
its LPIPS term: L1 summed over pixels + 1e-6 * KL (LDM's weight), no discriminator (LDM starts its GAN at step
50001, far beyond this budget; the ':gan' variant switches it on early). Set --config.data.name=fashion_mnist
for Fashion-MNIST.

    --config configs/vae_mnist.py        ch 16, mults (1, 2, 2) (16, 32, 32 channels at 28, 14, 7), one res block
                                         per level (two in the decoder), attention only in the middle (7x7), 0.2M
                                         parameters; Adam 1e-3, 100 warmup steps, cosine decay, batch 32, 2000 steps,
                                         EMA 0.999. Measured: 29.1 dB mean per-image PSNR on the 10,000 MNIST test
                                         images (28.2 dB after 1000 steps), 31 min wall on 2 CPU cores shared with
                                         other jobs (load average 8-12); latent scale 0.570.
    --config configs/vae_mnist.py:gan    the same with the hinge PatchGAN loss (adaptive weight 0.5) from step 1500.
    --config configs/vae_mnist.py:digits the same autoencoder on scikit-learn's 8x8 digits with f = 2 (4x4x4
                                         latents), 600 steps at batch 64: the first stage of the quick latent run.

After training, WORKDIR/latent_scale.json holds scale = 1 / std of the latents (see research/latents.py).
"""

import ml_collections

from research.config import base_config


def get_config(variant: str = "base"):
    if variant not in ("base", "gan", "digits"):
        raise ValueError(f"unknown variant {variant!r}: use 'base', 'gan' or 'digits'")
    c = base_config()
    c.task = "autoencoder"
    c.data.name = "mnist"
    c.data.image_size = 28
    c.data.channels = 1

    c.model = ml_collections.ConfigDict(
        dict(
            name="vae",
            ch=16,
            ch_mult=(1, 2, 2),
            num_res_blocks=1,
            z_channels=4,
            attn_resolutions=(),
            num_heads=1,
            dropout=0.0,
            resamp_with_conv=True,
            norm_groups=8,
            norm_eps=1e-6,
            dtype="float32",
        )
    )

    c.autoencoder.recon_loss = "l1"
    c.autoencoder.kl_weight = 1e-6
    c.autoencoder.disc_weight = 0.0
    c.autoencoder.scale_num_images = 2048

    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.optim.lr_schedule = "cosine"
    c.optim.grad_clip = 0.0  # the summed per-example loss has large gradients; LDM does not clip either

    c.train.batch_size = 32
    c.train.num_steps = 2000
    c.train.ema_decay = 0.999
    c.train.ema_warmup = True
    c.train.log_every = 50
    c.train.ckpt_every = 500
    c.train.sample_every = 500
    c.sample.num = 32

    if variant == "digits":  # scikit-learn's 8x8 digits, f = 2: 8x8x1 <-> 4x4x4, for quick runs and the tests
        c.data.name = "digits"
        c.data.image_size = 8
        c.model.ch_mult = (1, 2)
        c.autoencoder.scale_num_images = 1024
        c.train.batch_size = 64
        c.train.num_steps = 600
        c.optim.warmup_steps = 50
        c.train.ckpt_every = 300
        c.train.sample_every = 300
    if variant == "gan":
        c.autoencoder.disc_weight = 0.5
        c.autoencoder.disc_start = 1500
        c.autoencoder.adaptive_disc_weight = True
        c.autoencoder.disc_lr = 2e-4
        c.autoencoder.disc_ch = 32
        c.autoencoder.disc_layers = 2
        c.autoencoder.disc_norm_groups = 8
    return c
