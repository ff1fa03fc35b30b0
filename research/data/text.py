"""Captions for CLIP training on class-labelled data sets, and the CLIP tokenizer.

MNIST and Fashion-MNIST have labels, not captions: a caption is a template ("a photo of a {}.") filled with a class
name. Each data set has a list of *training* templates, used to make the text side of CLIP's contrastive pairs, and
a disjoint list of *held-out* templates used only for the zero-shot headline number, so that number measures
transfer to phrasings the text encoder never saw rather than recall of the training strings.

Templates are ``str.format`` strings: ``{}`` is the class name; MNIST templates may also use ``{digit}`` (the
label as a numeral, "7"), so the text encoder learns both "seven" and "7".

``caption_table`` tokenizes every (class, template) caption once, [num_classes, num_templates, L] int32; a training
step picks one caption per example by indexing, ``table[labels, template_ids]``, which is cheap inside jit.

Tokens follow CLIP / Stable Diffusion: ``<|startoftext|> ... <|endoftext|>`` then padding to ``context_length``;
an over-long caption is cut so that ``<|endoftext|>`` stays at the last position (CLIP's text encoder pools the
features at the end token). The pad id is the tokenizer's own: SD 1.x folders pad with ``<|endoftext|>`` (49407),
OpenCLIP-style folders (SD 2.x) with ``!`` (0).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from research.data.sources import DATA_DIR_ENV, DataError

__all__ = [
    "DATASET_CLASS_NAMES",
    "load_tokenizer",
    "tokenize",
    "class_names",
    "caption_templates",
    "captions",
    "caption_table",
]

_TOKENIZER_FILES = ("vocab.json", "merges.txt")

_DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_FASHION_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")

DATASET_CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "mnist": _DIGIT_NAMES,
    "digits": _DIGIT_NAMES,  # scikit-learn's 8x8 digits: same classes as MNIST
    "fashion_mnist": _FASHION_NAMES,
    "mnist_fashion": _DIGIT_NAMES + _FASHION_NAMES,  # labels 0-9 MNIST, 10-19 Fashion-MNIST
}

_DIGIT_TEMPLATES = {
    "train": (
        "a handwritten {}.",
        "the digit {}.",
        "the number {}.",
        "a photo of the digit {}.",
        "a drawing of the number {}.",
        "a blurry picture of the digit {}.",
        "a low resolution image of the number {}.",
        "a black and white picture of a handwritten {}.",
        "a sketch of the numeral {}.",
        "{}",
        "a scan of a handwritten {digit}.",
        "the digit {digit}.",
        "a photo of the number {digit}.",
        "an image of the digit {digit}.",
        "{digit}",
    ),
    "heldout": (
        "a pencil drawing of the digit {}.",
        "a scribbled {}.",
        "an ink sketch of the numeral {}.",
        "a centered image of the number {digit}.",
        "a grayscale photo of a handwritten {digit}.",
        "this is the digit {digit}.",
    ),
}

_FASHION_TEMPLATES = {
    "train": (
        "a photo of a {}.",
        "a drawing of a {}.",
        "a blurry picture of a {}.",
        "a low resolution photo of a {}.",
        "a black and white photo of a {}.",
        "a grayscale image of a {}.",
        "a product photo of a {}.",
        "a picture of the {}.",
        "a close-up photo of a {}.",
        "a small photo of a {}.",
        "a photo of a {}, a type of clothing.",
        "a catalog image of a {}.",
        "a {}.",
        "{}",
    ),
    "heldout": (
        "a cropped photo of the {}.",
        "a bright photo of a {}.",
        "a pixelated photo of the {}.",
        "an online shop photo of a {}.",
        "a dark photo of a {}.",
        "a photo of one {}, a fashion item.",
    ),
}

_TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    "mnist": _DIGIT_TEMPLATES,
    "digits": _DIGIT_TEMPLATES,
    "fashion_mnist": _FASHION_TEMPLATES,
}
# Data sets whose classes come from several others: (first label, data set) per part, each captioned with its own
# templates.
_COMPOSITE = {"mnist_fashion": ((0, "mnist"), (10, "fashion_mnist"))}

TEMPLATE_SPLITS = ("train", "heldout")


def _check_dataset(dataset: str) -> str:
    if dataset not in DATASET_CLASS_NAMES:
        raise DataError(
            f"no class names or caption templates for data set {dataset!r}; "
            f"captions exist for {sorted(DATASET_CLASS_NAMES)}"
        )
    return dataset


def class_names(dataset: str) -> tuple[str, ...]:
    """The class names of ``dataset`` in label order (label i is ``class_names(dataset)[i]``)."""
    return DATASET_CLASS_NAMES[_check_dataset(dataset)]


def caption_templates(dataset: str, split: str = "train") -> tuple[str, ...]:
    """The caption templates of ``dataset``: ``split='train'`` for training, ``'heldout'`` for zero-shot evaluation.

    The two lists are disjoint. A composite data set (mnist_fashion) has templates per part: see ``captions``."""
    if _check_dataset(dataset) in _COMPOSITE:
        raise DataError(f"{dataset!r} captions each part with its own templates; use captions({dataset!r}, split)")
    templates = _TEMPLATES[dataset]
    if split not in templates:
        raise DataError(f"caption template split must be one of {TEMPLATE_SPLITS}, got {split!r}")
    return templates[split]


def captions(dataset: str, split: str = "train") -> list[list[str]]:
    """Every caption as text, [num_classes][num_templates]: ``captions(d, s)[c][t]`` is template t with class c.

    A composite data set (mnist_fashion) captions each part's classes with that part's templates; a part with fewer
    templates repeats its list from the start, so every class has as many captions as the longest part."""
    if _check_dataset(dataset) in _COMPOSITE:
        rows = [row for _, part in _COMPOSITE[dataset] for row in captions(part, split)]
        width = max(len(row) for row in rows)
        return [[row[t % len(row)] for t in range(width)] for row in rows]
    templates = caption_templates(dataset, split)
    return [[t.format(name, digit=str(c)) for t in templates] for c, name in enumerate(class_names(dataset))]


def _resolve_folder(folder: str | None) -> str:
    if folder is None:
        root = os.environ.get(DATA_DIR_ENV)
        if not root:
            raise DataError(
                f"the CLIP tokenizer folder is not set: set ${DATA_DIR_ENV} to the data folder holding clip/ "
                f"({' and '.join(_TOKENIZER_FILES)}), or pass the tokenizer folder explicitly"
            )
        folder = os.path.join(root, "clip")
    missing = [f for f in _TOKENIZER_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing and not os.path.isfile(os.path.join(folder, "tokenizer.json")):  # transformers 5 saves only that
        raise DataError(
            f"CLIP tokenizer folder {folder!r} lacks {', '.join(missing)} (or tokenizer.json): point "
            f"${DATA_DIR_ENV} at the data folder whose clip/ holds vocab.json and merges.txt, or pass a folder that "
            "holds them"
        )
    return os.path.abspath(folder)


def load_tokenizer(folder: str | None = None) -> Any:
    """The CLIP tokenizer (transformers' ``CLIPTokenizer``) of ``folder``, default ``$RESEARCH_DATA_DIR/clip``.

    One instance per folder is cached. A folder with a ``tokenizer_config.json`` / ``special_tokens_map.json`` (e.g.
    an SD 2.x ``tokenizer/`` folder) brings its own pad token; one with only the vocabulary pads with
    ``<|endoftext|>``, as SD 1.x does."""
    return _load_tokenizer(_resolve_folder(folder))


@functools.lru_cache(maxsize=None)
def _load_tokenizer(folder: str) -> Any:
    # Only from_pretrained: transformers 5's CLIPTokenizer(vocab_file=..., merges_file=...) silently builds a
    # broken two-token vocabulary.
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder)


def tokenize(tokenizer: Any, texts: str | Sequence[str], context_length: int = 77) -> np.ndarray:
    """Token ids int32 [N, context_length] of ``texts`` (a string counts as N = 1).

    Each row is ``bos, t_1 .. t_k, eos, pad ...``; a caption of more than ``context_length - 2`` tokens keeps its
    first ``context_length - 2`` and the end token still comes last. Equal to the tokenizer's own
    ``tokenizer(texts, padding="max_length", truncation=True, max_length=context_length)``, written out so that the
    layout does not depend on a folder's padding side or model_max_length settings."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    context_length = int(context_length)
    if context_length < 2:
        raise DataError(f"context_length must be at least 2 (start and end tokens), got {context_length}")
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    if bos is None or eos is None:
        raise DataError("this tokenizer has no start or end token: load a CLIP tokenizer folder")
    if pad is None:
        pad = eos  # transformers' CLIP default; only a hand-built tokenizer lacks a pad token
    out = np.full((len(texts), context_length), pad, dtype=np.int32)
    out[:, 0] = bos
    if not texts:
        return out
    body = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=context_length - 2)["input_ids"]
    for row, ids in zip(out, body):
        row[1 : 1 + len(ids)] = ids
        row[1 + len(ids)] = eos
    return out


def caption_table(tokenizer: Any, dataset: str, split: str = "train", context_length: int = 77) -> np.ndarray:
    """Tokens of every caption of ``dataset``, int32 [num_classes, num_templates, context_length].

    ``table[c, t]`` is ``tokenize(tokenizer, captions(dataset, split)[c][t], context_length)[0]``. A caption that
    does not fit is an error rather than a silent cut: truncation could drop the class name itself."""
    text = captions(dataset, split)
    flat = [caption for row in text for caption in row]
    lengths = [len(ids) + 2 for ids in tokenizer(flat, add_special_tokens=False)["input_ids"]]
    if max(lengths) > context_length:
        longest = flat[int(np.argmax(lengths))]
        raise DataError(
            f"the {dataset} caption {longest!r} needs {max(lengths)} tokens but context_length is {context_length}: "
            f"raise the text context length to at least {max(lengths)}"
        )
    tokens = tokenize(tokenizer, flat, context_length)
    return tokens.reshape(len(text), len(text[0]), context_length)
