"""Text-to-image from a Stable Diffusion folder (research/generate.py, research/pretrained/convert_sd.py) against
diffusers' StableDiffusionPipeline on one tiny random pipeline written with save_pretrained: images (DDIM and
DPM-Solver++ 2M, guidance 7.5, a negative prompt), text conditioning, tokenisation (SD 1.x and OpenCLIP pad ids,
truncation warning), scheduler steps for other settings (v-prediction, trailing / linspace spacing, clipping, eta,
heun, sigma_min), loader errors and the command line."""

import json
import os
import shutil

import numpy as np
import pytest

from research.generate import (
    GenerateError,
    StableDiffusion,
    main,
    plan_rows,
    sampler_update,
    sampling_plan,
    to_uint8,
)
from research.pretrained.convert_clip import ConversionError
from research.pretrained.convert_sd import read_diffusers_pipeline

CLIP_VOCAB = os.path.join(os.environ.get("RESEARCH_DATA_DIR", "/work/shared/data"), "clip")
PROMPTS = ["a cat", "an oil painting of a lighthouse at dusk, dramatic stormy sky, highly detailed, trending"]
NEGATIVE = "blurry, low quality"
SIZE = 16  # pixels; the tiny VAE downsamples by 2, so latents are 8x8
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SD_SCHEDULER = dict(SD_BETAS, clip_sample=False, set_alpha_to_one=False)  # DDIM's settings in SD's configs


def _diffusers():
    import diffusers.utils.import_utils as diffusers_imports

    # diffusers imports torchvision for unrelated models when it is installed (see tests/test_vae.py).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(diffusers_imports, "_torchvision_available", False)
        import diffusers
    return diffusers


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """torch's tiny matmuls spin on both shared cores against XLA's threads; one thread is enough."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, _one_torch_thread):
    """(folder, diffusers pipeline, our StableDiffusion) of one tiny random SD 1.x-shaped pipeline."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    d = _diffusers()
    torch.manual_seed(0)
    unet = d.UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=SIZE // 2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    with torch.no_grad():  # norms start at one and biases at zero: randomise every tensor
        for prm in unet.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    vae = d.AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
    )
    # SD 1.x's text_encoder/config.json still has the pre-2023 ids bos 0, eos 2, pad 1; kept here as released.
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=49408,  # the real CLIP BPE vocabulary, so the real tokenizer's ids are valid
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        )
    ).eval()
    tokenizer = CLIPTokenizer.from_pretrained(CLIP_VOCAB, model_max_length=77)
    scheduler = d.DDIMScheduler(steps_offset=1, **SD_SCHEDULER)
    pipe = d.StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    folder = str(tmp_path_factory.mktemp("sd") / "tiny-sd")
    pipe.save_pretrained(folder, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):  # the released folders' layout (transformers 5 writes tokenizer.json)
        shutil.copy(os.path.join(CLIP_VOCAB, name), os.path.join(folder, "tokenizer", name))
    return folder, pipe, StableDiffusion(read_diffusers_pipeline(folder))


def _latents(seed=0):
    return np.random.default_rng(seed).standard_normal((len(PROMPTS), 4, SIZE // 2, SIZE // 2)).astype(np.float32)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_images_match_diffusers_pipeline(tiny, sampler):
    import torch

    folder, pipe, sd = tiny
    d = _diffusers()
    cls = d.DDIMScheduler if sampler == "ddim" else d.DPMSolverMultistepScheduler
    # From the file's dict, as after StableDiffusionPipeline.from_pretrained: the in-memory config marks the keys
    # the constructor was not given as defaults, which from_config would then replace by the new class's defaults.
    pipe.scheduler = cls.from_config(sd.parts.scheduler_config)
    latents = _latents()
    kw = dict(num_inference_steps=4, guidance_scale=7.5, height=SIZE, width=SIZE, output_type="np")
    theirs = pipe(PROMPTS, negative_prompt=[NEGATIVE] * 2, latents=torch.from_numpy(latents), **kw).images
    ours = sd.generate(PROMPTS, NEGATIVE, steps=4, guidance=7.5, sampler=sampler, latents=latents)
    assert ours.shape == theirs.shape == (2, SIZE, SIZE, 3)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-3)
    # Not vacuous: the prompts move the images by far more than the tolerance, and NHWC latents give the same.
    swapped = sd.generate(PROMPTS[::-1], NEGATIVE, steps=4, guidance=7.5, sampler=sampler, latents=latents)
    assert np.abs(swapped - ours).max() > 2e-2
    nhwc = sd.generate(PROMPTS, NEGATIVE, steps=4, guidance=7.5, sampler=sampler, latents=latents.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(nhwc, ours)


def test_text_conditioning_matches_pipeline(tiny):
    import torch

    _, pipe, sd = tiny
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(PROMPTS, "cpu", 1, True, [NEGATIVE, ""])
    ours_cond, ours_uncond = sd.encode_prompts(PROMPTS, [NEGATIVE, ""])
    np.testing.assert_allclose(ours_cond, cond.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(ours_uncond, uncond.numpy(), rtol=0, atol=1e-4)
    assert sd.parts.text_output_layer == -1 and sd.parts.family == "custom"


def test_tokenisation_matches_pipeline_tokenizer(tiny, tmp_path):
    from transformers import CLIPTokenizer

    _, pipe, sd = tiny
    long = " ".join(f"word{i}, and" for i in range(40))
    texts = ["A café, naïve Zoë's crème brûlée!!", "東京の夜景 — neon; 50% off?", "", long]
    with pytest.warns(UserWarning) as record:
        ours = sd.tokenize(texts)
    theirs = pipe.tokenizer(texts, padding="max_length", max_length=77, truncation=True).input_ids
    np.testing.assert_array_equal(ours, np.asarray(theirs))
    dropped = len(pipe.tokenizer(long).input_ids) - 77
    assert dropped > 0 and [str(w.message) for w in record if f"{dropped} tokens dropped" in str(w.message)]
    assert ours[2, 0] == 49406 and (ours[2, 1:] == 49407).all()  # SD 1.x pads with <|endoftext|>

    # An OpenCLIP-style (SD 2.x) tokenizer folder pads with "!" = 0.
    openclip = tmp_path / "tokenizer"
    openclip.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(CLIP_VOCAB, name), openclip / name)
    special = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token="!")
    (openclip / "special_tokens_map.json").write_text(json.dumps(special))
    (openclip / "tokenizer_config.json").write_text(json.dumps(dict(special, model_max_length=77)))
    sd2 = StableDiffusion(sd.parts._replace(tokenizer_folder=str(openclip)))
    reference = CLIPTokenizer.from_pretrained(str(openclip))
    assert reference.pad_token_id == 0
    ours = sd2.tokenize(texts[:3])
    expected = reference(texts[:3], padding="max_length", max_length=77, truncation=True).input_ids
    np.testing.assert_array_equal(ours, expected)
    assert (ours[2, 2:] == 0).all() and ours[2, 1] == 49407


SCHEDULER_CASES = [
    ("ddim", dict(timestep_spacing="trailing", prediction_type="v_prediction"), 0.0, 5),
    ("ddim", dict(timestep_spacing="linspace", clip_sample=True, set_alpha_to_one=True), 0.0, 3),
    ("ddim", dict(steps_offset=1), 0.7, 4),
    ("dpmpp_2m", dict(timestep_spacing="trailing", prediction_type="v_prediction"), 0.0, 6),
    ("dpmpp_2m", dict(timestep_spacing="leading", steps_offset=1, solver_type="heun"), 0.0, 20),
    ("dpmpp_2m", dict(final_sigmas_type="sigma_min", lower_order_final=False), 0.0, 16),
]


@pytest.mark.parametrize("sampler,config,eta,steps", SCHEDULER_CASES)
def test_scheduler_steps_match_diffusers(sampler, config, eta, steps):
    """sampler_update over the plan equals diffusers' scheduler.step for a fixed sequence of model outputs."""
    import torch

    d = _diffusers()
    cls = d.DDIMScheduler if sampler == "ddim" else d.DPMSolverMultistepScheduler
    scheduler = cls(**{**(SD_SCHEDULER if sampler == "ddim" else SD_BETAS), **config})
    scheduler.set_timesteps(steps)
    plan = sampling_plan(dict(scheduler.config), sampler, steps, eta)
    np.testing.assert_array_equal(plan.timesteps, scheduler.timesteps.numpy())
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    theirs, ours, prev_x0 = torch.from_numpy(x), x, np.zeros_like(x)
    for t, row in zip(scheduler.timesteps, plan_rows(plan)):
        out = (0.8 * rng.standard_normal(x.shape) + 0.3 * ours).astype(np.float32)
        noise = rng.standard_normal(x.shape).astype(np.float32)
        extra = dict(eta=eta, variance_noise=torch.from_numpy(noise)) if sampler == "ddim" else {}
        theirs = scheduler.step(torch.from_numpy(out), t, theirs, **extra).prev_sample
        ours, prev_x0 = sampler_update(sampler, plan.clip_range, row, ours, out, prev_x0, noise if eta else None)
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-4, atol=1e-4)


def _copy(folder, tmp_path, name, ignore=None):
    dest = tmp_path / name
    shutil.copytree(folder, dest, ignore=ignore)
    return dest


def test_loader_errors(tiny, tmp_path):
    folder = tiny[0]
    no_index = _copy(folder, tmp_path, "no_index")
    os.remove(no_index / "model_index.json")
    with pytest.raises(ConversionError, match="model_index.json is missing"):
        read_diffusers_pipeline(no_index)
    no_vae = _copy(folder, tmp_path, "no_vae", ignore=lambda d, names: ["vae"] if d == folder else [])
    with pytest.raises(ConversionError, match=r"^vae: .*vae is missing") as e:
        read_diffusers_pipeline(no_vae)
    assert "\n" not in str(e.value)
    other = _copy(folder, tmp_path, "other_unet")
    config = json.loads((other / "unet" / "config.json").read_text())
    (other / "unet" / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DModel"}))
    with pytest.raises(ConversionError, match="unet: .* has _class_name 'UNet2DModel', expected UNet2DConditionModel"):
        read_diffusers_pipeline(other)
    (other / "unet" / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 64}))
    with pytest.raises(ConversionError, match="cross_attention_dim is 64 but the text encoder's hidden_size is 32"):
        read_diffusers_pipeline(other)
    te_config = json.loads((other / "text_encoder" / "config.json").read_text())
    (other / "text_encoder" / "config.json").write_text(json.dumps({**te_config, "model_type": "t5"}))
    with pytest.raises(ConversionError, match="text_encoder: .*model_type='t5'"):
        read_diffusers_pipeline(other)

    sd = tiny[2]
    with pytest.raises(GenerateError, match="multiple of 4"):
        sd.generate(["x"], steps=2, height=15, width=16)
    with pytest.raises(GenerateError, match="expected \\[1, 4, 8, 8\\]"):
        sd.generate(["x"], steps=2, latents=np.zeros((1, 3, 8, 8)), height=16, width=16)
    with pytest.raises(GenerateError, match="2 negative prompts for 3 prompts"):
        sd.generate(["a", "b", "c"], ["n", "m"], steps=2)


def test_cli(tiny, tmp_path, capsys):
    folder, _, sd = tiny
    out = tmp_path / "out"
    prompts = ["a red cube", "ünïcode façade"]
    argv = ["--pretrained", folder, "--prompt", prompts[0], "--prompt", prompts[1], "--negative-prompt", NEGATIVE]
    argv += ["--num", "2", "--steps", "4", "--sampler", "ddim", "--seed", "3", "--height", "16", "--width", "16"]
    assert main(argv + ["--batch-size", "4", "--out", str(out)]) == 0
    pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
    assert pngs == [f"{i:05d}.png" for i in range(4)]
    with np.load(out / "samples.npz", allow_pickle=False) as f:  # as research.evaluate clipscore reads it
        images, saved = f["images"], [str(p) for p in f["prompts"]]
        assert [str(p) for p in f["negative_prompts"]] == [NEGATIVE] * 4
        assert (int(f["steps"]), str(f["sampler"]), float(f["guidance"]), int(f["seed"])) == (4, "ddim", 7.5, 3)
        assert json.loads(str(f["sha256"]))["unet"] == sd.parts.sha256["unet"]
    assert saved == [prompts[0]] * 2 + [prompts[1]] * 2
    assert images.dtype == np.uint8 and images.shape == (4, 16, 16, 3)
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(out / "00003.png")), images[3])
    # The seeded noise does not depend on the batch size: the API at another batch size gives the same images.
    again = sd.generate(saved, NEGATIVE, steps=4, sampler="ddim", seed=3, height=16, width=16, batch_size=2)
    assert np.abs(to_uint8(again).astype(int) - images).max() <= 1

    capsys.readouterr()
    missing = tmp_path / "not_a_pipeline"
    missing.mkdir()
    assert main(["--pretrained", str(missing), "--prompt", "x", "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "model_index.json" in err
    assert main(["--pretrained", folder, "--out", str(tmp_path / "o3")]) == 2
    assert capsys.readouterr().err.startswith("error: give the prompts")


@pytest.fixture(scope="module")
def tiny_controlnet(tiny, tmp_path_factory):
    """A random diffusers ControlNetModel for the tiny U-Net (hint encoder 8 -> 16 channels, one stride-2 step: the
    tiny VAE's factor 2), saved with save_pretrained: (folder, torch model)."""
    import torch

    d = _diffusers()
    torch.manual_seed(1)
    controlnet = d.ControlNetModel.from_unet(tiny[1].unet, conditioning_embedding_out_channels=(8, 16))
    with torch.no_grad():  # the zero convs start at zero: randomise every tensor so the control acts
        for prm in controlnet.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    folder = str(tmp_path_factory.mktemp("controlnet") / "tiny-controlnet")
    controlnet.eval().save_pretrained(folder, safe_serialization=True)
    return folder, controlnet


@pytest.mark.parametrize("guess_mode", [False, True])
def test_controlnet_images_match_diffusers_pipeline(tiny, tiny_controlnet, guess_mode):
    """StableDiffusionControlNetPipeline (DDIM, guidance 7.5, conditioning scale 0.6) against ours with the same
    latents and hint: the images agree to 1e-3, and the control moves them by far more."""
    import torch

    from research.pretrained.convert_controlnet import load_diffusers_controlnet

    folder, pipe, sd = tiny
    d = _diffusers()
    control = d.StableDiffusionControlNetPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
        controlnet=tiny_controlnet[1], scheduler=d.DDIMScheduler.from_config(sd.parts.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    control.set_progress_bar_config(disable=True)
    hint = np.random.default_rng(4).uniform(0, 1, (len(PROMPTS), SIZE, SIZE, 3)).astype(np.float32)
    latents = _latents(2)
    theirs = control(
        PROMPTS, image=torch.from_numpy(hint).permute(0, 3, 1, 2), negative_prompt=[NEGATIVE] * 2,
        latents=torch.from_numpy(latents), num_inference_steps=4, guidance_scale=7.5, height=SIZE, width=SIZE,
        controlnet_conditioning_scale=0.6, guess_mode=guess_mode, output_type="np",
    ).images  # fmt: skip
    net = load_diffusers_controlnet(tiny_controlnet[0])
    kw = dict(steps=4, guidance=7.5, sampler="ddim", latents=latents)
    ours = sd.generate(
        PROMPTS, NEGATIVE, controlnets=[net], hints=[hint], control_scales=[0.6], guess_mode=guess_mode, **kw
    )
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-3)
    plain = sd.generate(PROMPTS, NEGATIVE, **kw)
    assert np.abs(plain - ours).max() > 2e-2
    with pytest.raises(GenerateError, match=r"hint 0 has shape \(2, 8, 8, 3\)"):
        sd.generate(PROMPTS, NEGATIVE, controlnets=[net], hints=[hint[:, :8, :8]], **kw)
    with pytest.raises(GenerateError, match="1 ControlNets, 2 hints"):
        sd.generate(PROMPTS, NEGATIVE, controlnets=[net], hints=[hint, hint], **kw)


def test_cli_with_controlnet(tiny, tiny_controlnet, tmp_path, capsys):
    """--controlnet / --hint / --control-scale: a PNG hint of another size is resized (Lanczos) to the output size
    and gives the API's images; scale 0 gives the uncontrolled images; a training run as --controlnet is refused."""
    from PIL import Image

    from research.generate import read_hint
    from research.pretrained.convert_controlnet import load_diffusers_controlnet

    folder, _, sd = tiny
    hint_path = tmp_path / "edges.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(hint_path)
    base = ["--pretrained", folder, "--prompt", "a red cube", "--steps", "3", "--sampler", "ddim", "--num", "1"]
    base += ["--height", "16", "--width", "16", "--controlnet", tiny_controlnet[0], "--hint", str(hint_path)]
    assert main(base + ["--control-scale", "0.8", "--out", str(tmp_path / "c")]) == 0
    with np.load(tmp_path / "c" / "samples.npz", allow_pickle=False) as f:
        images, scales = f["images"], json.loads(str(f["control_scales"]))
    assert scales == [0.8]
    hint = read_hint(str(hint_path), 16, 16)
    assert hint.shape == (16, 16, 3) and 0.0 <= hint.min() and hint.max() <= 1.0
    net = load_diffusers_controlnet(tiny_controlnet[0])
    api = sd.generate(["a red cube"], steps=3, sampler="ddim", height=16, width=16, controlnets=[net], hints=[hint],
                      control_scales=[0.8])  # fmt: skip
    assert np.abs(to_uint8(api).astype(int) - images).max() <= 1
    zero = sd.generate(["a red cube"], steps=3, sampler="ddim", height=16, width=16, controlnets=[net], hints=[hint],
                       control_scales=[0.0])  # fmt: skip
    np.testing.assert_allclose(
        zero, sd.generate(["a red cube"], steps=3, sampler="ddim", height=16, width=16), atol=1e-5
    )
    capsys.readouterr()
    run = tmp_path / "a_run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"task": "controlnet"}))
    argv = base[: base.index("--controlnet")] + ["--controlnet", str(run), "--hint", str(hint_path)]
    assert main(argv + ["--out", str(tmp_path / "r")]) == 2
    assert "research.sample --workdir" in capsys.readouterr().err
    assert main(base + ["--hint", str(hint_path), "--out", str(tmp_path / "h")]) == 2
    assert "give one --hint" in capsys.readouterr().err


def test_converted_workdir_gives_the_same_images(tiny, tmp_path, capsys):
    """python -m research.pretrained.sd_workdir writes a text_to_image workdir (U-Net + text encoder checkpoint,
    autoencoder workdir, tokenizer, scheduler); research.generate --pretrained WORKDIR gives the folder's images
    bit for bit; the run's config builds the same networks (parameter signature), and a second conversion into it
    is refused."""
    import jax

    from research.pretrained.sd_workdir import main as convert_main
    from research.pretrained.sd_workdir import read_sd_workdir
    from research.run import read_config
    from research.shapes import abstract_net_params, build_network

    folder, _, sd = tiny
    workdir = tmp_path / "sd_run"
    assert convert_main(["--diffusers", folder, "--workdir", str(workdir)]) == 0
    parts = read_sd_workdir(str(workdir))
    assert parts.sha256["unet"] == sd.parts.sha256["unet"] and parts.scaling_factor == sd.parts.scaling_factor
    config = read_config(str(workdir))
    assert config.task == "text_to_image" and config.diffusion.schedule == "scaled_linear"
    shapes = jax.tree.map(lambda a: a.shape, abstract_net_params(build_network(config), config))
    assert shapes == jax.tree.map(lambda a: a.shape, sd.parts.unet_params)
    latents = _latents(3)
    kw = dict(steps=3, guidance=7.5, sampler="dpmpp_2m", latents=latents)
    ours = StableDiffusion.from_pretrained(str(workdir)).generate(PROMPTS, NEGATIVE, **kw)
    np.testing.assert_array_equal(ours, sd.generate(PROMPTS, NEGATIVE, **kw))
    out = tmp_path / "out"
    argv = ["--pretrained", str(workdir), "--prompt", PROMPTS[0], "--steps", "2", "--num", "1", "--out", str(out)]
    assert main(argv) == 0 and os.path.isfile(out / "00000.png")
    capsys.readouterr()
    assert convert_main(["--diffusers", folder, "--workdir", str(workdir)]) == 2
    assert "already holds a run" in capsys.readouterr().err

    # Fine-tuning: a text_to_image run on captioned images with train.init_from=WORKDIR starts from its weights and
    # trains. One training (each learning rate is a compile of its own): Adam's first update moves a weight by at most
    # lr (|m_hat| / (sqrt(v_hat) + eps) < 1; AdamW adds lr * wd * |w|), so every weight lies within that of the
    # converted one, where a fresh initialisation would be off by far more, and the input convolution has moved.
    from PIL import Image

    from research.train.loop import train

    data = tmp_path / "captioned"
    data.mkdir()
    rng = np.random.default_rng(0)
    with open(data / "metadata.jsonl", "w") as f:
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(data / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"picture {i}"}) + "\n")
    tune = config.copy_and_resolve_references()
    tune.data.data_dir, tune.train.init_from, tune.train.batch_size = str(data), str(workdir), 2
    tune.train.num_steps, tune.train.ckpt_every, tune.train.sample_every, tune.train.progress = 1, 1, 0, False
    tune.train.num_devices, tune.optim.lr, tune.optim.warmup_steps, tune.train.ema_decay = 1, 1e-3, 0, 0.0
    train(tune, str(tmp_path / "tuned"))
    tuned = read_sd_workdir(str(tmp_path / "tuned"))  # the run's weights, the converted workdir's record
    lr, wd = tune.optim.lr, (tune.optim.weight_decay if tune.optim.optimizer == "adamw" else 0.0)
    for a, b in zip(jax.tree.leaves(tuned.unet_params), jax.tree.leaves(parts.unet_params)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.all(np.abs(a - b) <= lr * (1.0 + wd * np.abs(b)) * (1 + 1e-4) + 1e-7)
    assert (
        float(np.abs(np.asarray(tuned.unet_params["conv_in"]["kernel"]) - parts.unet_params["conv_in"]["kernel"]).max())
        > 0
    )
    # The run is a pipeline. Its images are not compared with the converted ones: on this tiny random network
    # weights moved by 1e-3 change pixels by up to 0.2; the converted workdir's images were compared bit for bit above.
    assert StableDiffusion(tuned).generate(PROMPTS, NEGATIVE, **kw).shape == ours.shape
    tune.train.init_from = str(tmp_path / "captioned")
    with pytest.raises(Exception, match="config.json|checkpoint"):
        train(tune, str(tmp_path / "tuned_bad"))
