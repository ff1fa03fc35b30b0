"""Text-to-image demo sized for 2 CPU cores: MNIST and Fashion-MNIST together (data.name='mnist_fashion', 20
classes), each image captioned anew at every step with one of its data set's templates ("a handwritten seven.",
"the digit 7.", "a product photo of a sneaker.", ...; research/data/text.py), so a prompt has to pick both the data
set and the class.

Two variants, the same captions, text encoder and recipe:

    --config configs/t2i_mnist_fashion.py:pixel    the demo: the text-conditional U-Net of Stable Diffusion
                                                   (model.name='cond_unet') on the 28x28 pixels, levels of 16, 32,
                                                   32 channels (28, 14, 7), one ResBlock per encoder level,
                                                   cross-attention transformers (2 heads) at 7x7 and in the middle
                                                   block; 364k U-Net parameters, 0.05 GMACs per image, about 2
                                                   steps/s on 2 cores; 6000 steps
    --config configs/t2i_mnist_fashion.py          (default 'latent') latent diffusion as LDM does it: a KL
                                                   autoencoder (configs/vae_mnist.py, f4, 4 channels) trained on
                                                   both data sets turns the images into 7x7x4 latents (standardised
                                                   per channel), and a one-level cond_unet of 64 channels (two
                                                   ResBlocks each followed by a cross-attention transformer, 2 heads
                                                   of 32, and the middle block) denoises them; 3000 steps

Text encoder: LDM's choice for its text-to-image models, a CLIP text transformer trained jointly with the U-Net
(text.encoder=''; width 64, 2 blocks of 2 heads, 24 tokens of the CLIP vocabulary), read through cross-attention
with the padding masked. Prompt dropout 0.1 to the empty prompt (classifier-free guidance). Cosine schedule, eps
prediction, AdamW 1e-3 with cosine decay, batch 64, EMA 0.995.

    python -m research.train --config configs/t2i_mnist_fashion.py:pixel --workdir runs/t2i_pixel
    python -m research.sample --workdir runs/t2i_pixel --guidance 2 --num 100         # 5 samples per prompt
    python -m experiments.t2i_demo --workdir runs/t2i_pixel --curve-per-prompt 25      # the README's table + curve

    python -m research.train --config configs/vae_mnist.py --workdir runs/vae_mnist_fashion \
        --config.data.name=mnist_fashion --config.data.num_classes=20                  # the latent variant's
    python -m research.train --config configs/t2i_mnist_fashion.py --workdir runs/t2i_mnist_fashion

Why the pixel variant is the demo: on 2 cores the latent one (1.41M parameters, 3000 steps) stopped at a mean
per-prompt accuracy of 0.32 with blurred blobs for samples, the limit being this small autoencoder's latents, which
also slowed the latent DiT (configs/dit_mnist_latent.py); the pixel U-Net at the ControlNet base's size learns the
images directly at the same step cost. (A wider pixel U-Net -- 32, 64, 64 channels, 1.74M parameters, 0.27 GMACs
-- ran at 0.1-0.3 steps/s on the shared cores, too slow to converge here.)
"""

import ml_collections

from research.config import base_config

AUTOENCODER = "runs/vae_mnist_fashion"


def get_config(variant: str = "latent"):
    if variant not in ("latent", "pixel"):
        raise ValueError(f"unknown variant {variant!r}: use 'latent' (the LDM recipe) or 'pixel'")
    c = base_config()
    c.task = "text_to_image"
    c.data.name, c.data.image_size, c.data.channels, c.data.num_classes = "mnist_fashion", 28, 1, 20
    c.latent.autoencoder = AUTOENCODER
    c.latent.downsample_factor, c.latent.channels = 4, 4  # declared so the config is inspectable without the run
    # Per-channel standardisation, as configs/dit_mnist_latent.py found for this autoencoder: its channels sit at
    # offsets far larger than their spread, and the global 1/std of SD's recipe gave noise-like samples here
    # (per-prompt accuracy 0.23 at step 1000 of a first run).
    c.latent.normalization = "channel"
    c.model = ml_collections.ConfigDict(
        dict(
            name="cond_unet",
            block_out_channels=(64,),
            layers_per_block=2,
            cross_attention_levels=(True,),
            attention_head_dim=2,  # diffusers' name: the number of heads per level
            cross_attention_dim=64,
            norm_num_groups=32,
            dropout=0.0,
            context_length=24,
        )
    )
    c.text.width, c.text.layers, c.text.heads, c.text.context_length = 64, 2, 2, 24
    c.text.mask = True
    c.diffusion.schedule = "cosine"
    c.diffusion.timesteps = 1000
    c.diffusion.cond_drop_prob = 0.1
    c.optim.optimizer = "adamw"
    c.optim.weight_decay = 0.0
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 200
    c.optim.lr_schedule = "cosine"
    c.optim.grad_clip = 1.0
    c.train.batch_size = 64
    c.train.num_steps = 3000
    c.train.ema_decay = 0.995
    c.train.ema_warmup = True
    c.train.log_every = 50
    c.train.ckpt_every = 500
    c.train.sample_every = 1000
    c.sample.num = 40
    c.sample.batch_size = 40
    c.sample.steps = "50"
    c.sample.clip_x0 = False  # latents are not bounded to [-1, 1]
    if variant == "pixel":
        pixel(c)
    return c


def pixel(c):
    """The same captions, text encoder and training recipe on the 28x28 pixels, at the size of the ControlNet demo's
    class-conditional base (configs/controlnet_mnist.py): levels of 16, 32, 32 channels (28, 14, 7), one ResBlock
    per encoder level, cross-attention only at 7x7 and in the middle block."""
    c.latent.autoencoder = ""
    c.latent.downsample_factor, c.latent.channels, c.latent.normalization = 0, 0, "scale"
    c.model.block_out_channels = (16, 32, 32)
    c.model.layers_per_block = 1
    c.model.cross_attention_levels = (False, False, True)
    c.model.attention_head_dim = 2
    c.model.norm_num_groups = 8
    c.sample.clip_x0 = True
    # Every checkpoint is kept so experiments/t2i_demo.py can draw the accuracy curve over training.
    c.train.num_steps, c.train.ckpt_every, c.train.keep_checkpoints = 6000, 1000, 10
