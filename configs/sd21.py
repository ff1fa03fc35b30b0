"""Stable Diffusion v2.1 (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models";
model cards: stabilityai/stable-diffusion-2-1 (768x768, v-prediction) and stabilityai/stable-diffusion-2-1-base
(512x512, eps-prediction)).

    --config configs/sd21.py          # 2.1: 768x768 images, v-prediction (Salimans & Ho 2022)
    --config configs/sd21.py:base     # 2.1-base: 512x512 images, eps-prediction

U-Net (both variants share it; the released unet/config.json): SD 1.x's layout with 64-dim heads (diffusers'
attention_head_dim=(5, 10, 20, 20), which counts heads: 320 / 5 = 64), linear (Dense) proj_in / proj_out, and
cross-attention to OpenCLIP ViT-H/14 text (penultimate layer, 1024 wide, 77 tokens): 865,910,724 parameters.
Latent space: the same f8, 4-channel KL autoencoder as SD 1.x (scale 0.18215); 768x768 -> 96x96x4.
Diffusion: T = 1000, scaled_linear betas 0.00085..0.012; v-prediction at 768, eps at 512 (base).
Training (model cards): AdamW, lr 1e-4 with 10,000 warmup steps, batch 2048; 2.1 was fine-tuned from 2.0-768-v
(55k steps with punsafe 0.1, then 155k with punsafe 0.98); 2.1-base from 2.0-base (220k steps, punsafe 0.98).
Released weights load with research.pretrained.convert_unet.load_diffusers_unet(PATH/unet).
"""

from ml_collections import ConfigDict

from configs.sd15 import stable_diffusion  # the SD VAE, schedule and recipe; workdir runs/autoencoder_sd

VARIANTS = {
    # name: (image size, prediction, training steps of the last fine-tuning stage(s))
    "768": (768, "v", 210_000),
    "base": (512, "eps", 220_000),
}


def get_config(variant: str = "768") -> ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"unknown SD 2.1 variant {variant!r}; choose one of {sorted(VARIANTS)} (configs/sd21.py:base)")
    size, prediction, steps = VARIANTS[variant]
    return stable_diffusion("2", image_size=size, prediction=prediction, num_steps=steps)
