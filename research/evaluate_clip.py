"""CLIP evaluation commands (subcommands of `python -m research.evaluate`).

zeroshot  --workdir RUN [--split test] [--num N] [--templates heldout|train] [--json OUT]
    Zero-shot classification of the run's dataset split: each class is the normalised mean of its caption
    templates' text embeddings (CLIP's prompt ensemble); by default the held-out templates, which the run never
    trained on. Prints top-1 / top-5 and writes RUN/eval/zeroshot_<templates>_<split>.json.
retrieval --workdir RUN [--split test] [--num N]
    Class-level retrieval between the split's images and the held-out captions of every class
    (research.metrics.clip.class_retrieval): image->caption and caption->image recall@1/5.
probe     --workdir RUN [--train-num 10000] [--num N]
    Linear probe: logistic regression on the frozen image embeddings of train-num training images, C chosen on
    a held-out fifth of them, accuracy on the test split (CLIP's linear-probe protocol at small scale).
clipscore --samples X.npz --clip RUN|HF_DIR [--prompts FILE] [--dataset NAME] [--template T] [--json OUT]
    CLIPScore (Hessel et al. 2021): 100 * max(cos(image, caption), 0) per image, averaged. The captions are the
    npz's 'prompts' array (what a text-to-image command writes), else --prompts FILE (one per line, in order),
    else the npz's class labels written into --template with the class names of the CLIP run's dataset (or
    --dataset). --clip is a CLIP run trained here or a local Hugging Face CLIPModel folder (config.json +
    safetensors; its images are resized bicubically to the model's size, centre-cropped and normalised with the
    folder's preprocessor_config.json statistics, OpenAI's by default).
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

import numpy as np

from research.config import ConfigError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipEncoders:
    """encode_images(uint8 [N, H, W, C]) -> [N, D] and encode_texts(list of str) -> [N, D], numpy, not normalised."""

    def __init__(self, encode_images: Callable, encode_texts: Callable, description: str, dataset: Optional[str]):
        self.encode_images, self.encode_texts = encode_images, encode_texts
        self.description, self.dataset = description, dataset


def load_clip(path: str, *, batch_size: int = 256, progress: bool = True) -> ClipEncoders:
    """A CLIP run (task='clip') or a local Hugging Face CLIPModel folder, as encoders of uint8 images and strings."""
    from research.run import is_run, read_config

    if not os.path.isdir(path):
        raise ConfigError(f"--clip {path} does not exist")
    if is_run(path) and os.path.isdir(os.path.join(path, "checkpoints")):
        config = read_config(path)
        if config.task != "clip":
            raise ConfigError(f"{path} holds a {config.task!r} run, not a CLIP run (task='clip')")
        return _run_encoders(path, config, batch_size, progress)
    return _hf_encoders(path, batch_size, progress)


def _run_encoders(workdir, config, batch_size, progress) -> ClipEncoders:
    from research.data import to_model_range
    from research.data.text import load_tokenizer, tokenize
    from research.loader import load_run
    from research.tasks.clip import encoders

    _, model, params, step = load_run(workdir)
    encode_images, encode_tokens = encoders(model, batch_size)
    tokenizer = load_tokenizer(config.clip.tokenizer or None)
    size = int(config.model.image_size)

    def images(pixels):
        if pixels.shape[1:3] != (size, size) or pixels.shape[3] != config.data.channels:
            raise ConfigError(
                f"images of shape {pixels.shape[1:]} given to a CLIP trained on {size}x{size}x{config.data.channels}"
            )
        return encode_images(params, to_model_range(pixels, centered=config.data.centered), progress)

    def texts(strings):
        return encode_tokens(params, tokenize(tokenizer, list(strings), int(config.model.context_length)), progress)

    return ClipEncoders(images, texts, f"CLIP run {os.path.abspath(workdir)} at step {step}", config.data.name)


def _hf_encoders(folder, batch_size, progress) -> ClipEncoders:
    from research.data.text import load_tokenizer, tokenize
    from research.models.clip import CLIP
    from research.pretrained.convert_clip import load_hf_clip, read_hf_folder
    from research.tasks.clip import encoders

    hf = read_hf_folder(folder)
    fields, params = load_hf_clip(hf)
    encode_images, encode_tokens = encoders(CLIP(**fields), batch_size)
    tok_folder = folder if os.path.isfile(os.path.join(folder, "vocab.json")) else None
    tokenizer = load_tokenizer(tok_folder)
    size = int(fields["image_size"])
    mean, std = OPENAI_MEAN, OPENAI_STD
    pre = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(pre):
        p = json.load(open(pre))
        mean, std = tuple(p.get("image_mean", mean)), tuple(p.get("image_std", std))

    def images(pixels):
        return encode_images(params, preprocess_for_clip(pixels, size, mean, std), progress)

    def texts(strings):
        return encode_tokens(params, tokenize(tokenizer, list(strings), int(fields["context_length"])), progress)

    return ClipEncoders(images, texts, f"Hugging Face CLIP {os.path.abspath(folder)} (sha256 {hf.sha256[:12]})", None)


def preprocess_for_clip(pixels: np.ndarray, size: int, mean, std) -> np.ndarray:
    """uint8 [N, H, W, C] (C = 1 or 3) -> float32 [N, size, size, 3] as CLIP's image processor prepares images:
    bicubic resize of the short side to size, centre crop, [0, 1], per-channel normalisation."""
    from PIL import Image

    out = np.empty((len(pixels), size, size, 3), np.float32)
    for i, img in enumerate(pixels):
        im = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).convert("RGB")
        w, h = im.size
        scale = size / min(w, h)
        im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
        im = im.crop((left, top, left + size, top + size))
        out[i] = np.asarray(im, np.float32) / 255.0
    return (out - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def _run_and_split(args):
    from research.data import get_source, make_eval_arrays
    from research.run import read_config

    config = read_config(args.workdir)
    if config.task != "clip":
        raise ConfigError(f"{args.workdir} holds a {config.task!r} run; this command evaluates CLIP runs")
    clip = load_clip(args.workdir, batch_size=args.batch_size)
    total = len(get_source(config.data, args.split))
    pixels, labels = make_eval_arrays(config.data, args.split, min(args.num or total, total))
    return config, clip, pixels, labels


def _caption_strings(dataset: str, split: str):
    from research.data.text import captions

    table = captions(dataset, split)  # [C][T]
    strings = [c for per_class in table for c in per_class]
    labels = np.repeat(np.arange(len(table)), [len(per_class) for per_class in table])
    return strings, labels, len(table), len(table[0])


def _write(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def zeroshot_main(args) -> int:
    from research.metrics.clip import zeroshot_accuracy, zeroshot_classifier

    config, clip, pixels, labels = _run_and_split(args)
    strings, _, num_classes, num_templates = _caption_strings(config.data.name, args.templates)
    text = clip.encode_texts(strings).reshape(num_classes, num_templates, -1)
    result = zeroshot_accuracy(clip.encode_images(pixels), labels, zeroshot_classifier(text))
    result.update(
        protocol=f"{clip.description}; {len(pixels)} {config.data.name}:{args.split} images; prompt ensemble of the "
        f"{num_templates} {args.templates} templates",
        num=len(pixels),
    )
    print(f"zero-shot top-1 {result['top1']:.4f}  top-5 {result.get('top5', float('nan')):.4f}")
    print(result["protocol"])
    _write(result, args.json or os.path.join(args.workdir, "eval", f"zeroshot_{args.templates}_{args.split}.json"))
    return 0


def retrieval_main(args) -> int:
    from research.metrics.clip import class_retrieval

    config, clip, pixels, labels = _run_and_split(args)
    strings, text_labels, _, _ = _caption_strings(config.data.name, "heldout")
    result = class_retrieval(clip.encode_images(pixels), labels, clip.encode_texts(strings), text_labels)
    result.update(
        protocol=f"{clip.description}; {len(pixels)} {config.data.name}:{args.split} images against the "
        f"{len(strings)} held-out captions; a hit is an item of the query's class",
        num=len(pixels),
    )
    print("  ".join(f"{k} {v:.4f}" for k, v in result.items() if "@" in k))
    print(result["protocol"])
    _write(result, args.json or os.path.join(args.workdir, "eval", f"retrieval_{args.split}.json"))
    return 0


def probe_main(args) -> int:
    from research.data import get_source, make_eval_arrays
    from research.metrics.clip import linear_probe_result

    config, clip, pixels, labels = _run_and_split(args)
    train_num = min(args.train_num, len(get_source(config.data, "train")))
    train_pixels, train_labels = make_eval_arrays(config.data, "train", train_num)
    res = linear_probe_result(clip.encode_images(train_pixels), train_labels, clip.encode_images(pixels), labels)
    result = {
        "accuracy": res.accuracy,
        "C": res.C,
        "protocol": f"{clip.description}; logistic regression on frozen image embeddings of {len(train_pixels)} "
        f"training images (C from a held-out fifth), tested on {len(pixels)} {config.data.name}:{args.split} images",
    }
    print(f"linear probe accuracy {res.accuracy:.4f} (C = {res.C:g})")
    print(result["protocol"])
    _write(result, args.json or os.path.join(args.workdir, "eval", f"probe_{args.split}.json"))
    return 0


def clipscore_main(args) -> int:
    from research.data.text import class_names
    from research.metrics.clip import clip_score

    if not os.path.isfile(args.samples):
        raise ConfigError(f"--samples {args.samples} does not exist")
    with np.load(args.samples, allow_pickle=False) as f:
        images = f["images"] if "images" in f else None
        prompts = [str(p) for p in f["prompts"]] if "prompts" in f else None
        labels = f["labels"] if "labels" in f else None
    if images is None or images.dtype != np.uint8 or images.ndim != 4:
        raise ConfigError(f"--samples {args.samples} needs an 'images' array of uint8 [N, H, W, C]")
    clip = load_clip(args.clip, batch_size=args.batch_size)
    if prompts is None and args.prompts:
        prompts = [line.rstrip("\n") for line in open(args.prompts) if line.strip()]
    source = "the npz's prompts" if prompts is not None else None
    if prompts is None:
        dataset = args.dataset or clip.dataset
        if labels is None or dataset is None or (labels < 0).any():
            raise ConfigError(
                "no captions: the npz has no 'prompts'; give --prompts FILE, or class labels in the npz with "
                "--dataset NAME (a CLIP run supplies its own dataset)"
            )
        names = class_names(dataset)
        prompts = [args.template.format(names[int(y)]) for y in labels]
        source = f"labels as {args.template!r} with {dataset} class names"
    if len(prompts) != len(images):
        raise ConfigError(f"{len(prompts)} captions for {len(images)} images; give one caption per image")
    scores = clip_score(clip.encode_images(images), clip.encode_texts(prompts))
    result = {
        "clip_score": float(scores.mean()),
        "std": float(scores.std()),
        "num": len(images),
        "protocol": f"{clip.description}; captions from {source}; 100 * max(cos, 0) per image, averaged",
    }
    print(f"CLIP score {result['clip_score']:.2f} (std {result['std']:.2f}, {len(images)} images)")
    print(result["protocol"])
    if args.json:
        _write(result, args.json)
    return 0


def add_parsers(sub) -> dict:
    """The CLIP subcommands on research.evaluate's parser: {name: handler}."""
    from research.cli import positive_int

    handlers = {}
    for name, handler, help_text in (
        ("zeroshot", zeroshot_main, "zero-shot classification accuracy of a CLIP run"),
        ("retrieval", retrieval_main, "class-level image/caption retrieval recall of a CLIP run"),
        ("probe", probe_main, "linear-probe accuracy on a CLIP run's frozen image embeddings"),
    ):
        q = sub.add_parser(name, help=help_text)
        q.add_argument("--workdir", required=True)
        q.add_argument("--split", default="test")
        q.add_argument("--num", type=positive_int, default=None, help="images of the split (default: all)")
        q.add_argument("--batch-size", type=positive_int, default=500)
        q.add_argument("--json", default=None)
        if name == "zeroshot":
            q.add_argument("--templates", choices=("heldout", "train"), default="heldout")
        if name == "probe":
            q.add_argument("--train-num", type=positive_int, default=10_000)
        handlers[name] = handler
    c = sub.add_parser("clipscore", help="CLIPScore of generated images against their captions")
    c.add_argument("--samples", required=True, help="an .npz with uint8 'images' (+ 'prompts' or 'labels')")
    c.add_argument("--clip", required=True, help="a CLIP run or a local Hugging Face CLIPModel folder")
    c.add_argument("--prompts", default=None, help="a text file with one caption per image")
    c.add_argument("--dataset", default=None, help="class names for labelled samples (mnist, fashion_mnist)")
    c.add_argument("--template", default="a photo of a {}.", help="caption template for labelled samples")
    c.add_argument("--batch-size", type=positive_int, default=256)
    c.add_argument("--json", default=None)
    handlers["clipscore"] = clipscore_main
    return handlers
