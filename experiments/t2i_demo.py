"""The text-to-image demo's table: per-prompt accuracy, FID and CLIP score of a text_to_image run on mnist_fashion.

    python -m experiments.t2i_demo --workdir runs/t2i_mnist_fashion [--guidance 2] [--per-prompt 100]
        [--sampler ddim] [--steps 50] [--seed 0] [--clip mnist=runs/clip_mnist,fashion_mnist=runs/clip_fashion_mnist]
        [--inception] [--step N] [--curve-per-prompt 25] [--out DIR]

The run's sampler (the one `research.sample` uses) draws --per-prompt samples for each of the 20 prompts (each class
name in its data set's first training template: "a handwritten seven.", "a photo of a sneaker."), seeds
fold_in(seed, batch). Each sample is classified by the domain classifier of the data set its prompt names
(research/metrics/classifier.py: MNIST 99.2%, Fashion-MNIST 91.7% test accuracy); a prompt's accuracy is the
fraction of its samples classified as its class (a Fashion-MNIST prompt answered with a digit counts as wrong:
the classifier sees a digit it cannot place). Per data set: FID against the test split in the domain classifier's
features (and with --inception in Inception-v3's, the pytorch-fid protocol), with improved precision and recall.
With --clip, the CLIP score (100 max(cos, 0), research/metrics/clip.py) of each sample with its prompt under the
CLIP run trained here on that data set, beside the same score of real test images with their class's prompt.
Writes OUT/demo.md (protocol first), OUT/demo.json, OUT/samples.npz and OUT/prompts.png (a row of samples per
prompt); OUT defaults to RUN/t2i_demo. --step picks the checkpoint (default the newest). With --curve-per-prompt N
(0 skips it) the mean per-prompt accuracy of N samples per prompt is also measured at every checkpoint the run kept
(same sampler, guidance and seeds), the learning curve that shows whether the model has converged: OUT/curve.json
and OUT/curve.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

PARTS = (("mnist", 0), ("fashion_mnist", 10))


def _clip_runs(text: str) -> dict:
    runs = {}
    for item in filter(None, (text or "").split(",")):
        name, _, path = item.partition("=")
        if name not in dict(PARTS) or not path:
            raise ValueError(f"--clip {item!r}: give DATASET=RUN with DATASET one of {[p for p, _ in PARTS]}")
        runs[name] = path
    return runs


def clip_scores(clip_run: str, images: np.ndarray, prompts: list, centered: bool) -> np.ndarray:
    """CLIP score [N] of uint8 images [N, H, W, C] with their prompts [N] under a CLIP run of this codebase."""
    from research.data import to_model_range
    from research.data.text import load_tokenizer, tokenize
    from research.loader import load_run
    from research.metrics.clip import clip_score
    from research.tasks.clip import encoders

    config, model, params, _ = load_run(clip_run)
    encode_images, encode_tokens = encoders(model)
    tokens = tokenize(load_tokenizer(config.clip.tokenizer or None), prompts, int(config.model.context_length))
    return clip_score(
        encode_images(params, to_model_range(images, centered=config.data.centered)), encode_tokens(params, tokens)
    )


def prompt_accuracy(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[20] the fraction of each prompt's samples its data set's domain classifier puts in the prompt's class."""
    from research.metrics import classifier

    accuracy = np.full(10 * len(PARTS), np.nan)
    for part, offset in PARTS:
        mask = (labels >= offset) & (labels < offset + 10)
        predicted = classifier.get_domain_classifier(part, progress=False).probs(images[mask], progress=False)
        for c in range(10):
            sel = labels[mask] - offset == c
            accuracy[offset + c] = float(np.mean(predicted[sel].argmax(axis=1) == c))
    return accuracy


def accuracy_curve(workdir: str, config, options, per_prompt: int, seed: int, out: str) -> list:
    """Mean per-prompt accuracy (and per data set) at every checkpoint of the run -> rows; draws OUT/curve.png."""
    import dataclasses

    from research.run import checkpoint_steps
    from research.tasks import get_task

    rows = []
    for step in checkpoint_steps(workdir):
        run = get_task(config.task).sampler(workdir, config, dataclasses.replace(options, step=int(step)))
        samples = run(10 * len(PARTS) * per_prompt, seed=seed)
        accuracy = prompt_accuracy(samples.images, np.asarray(samples.labels))
        rows.append(
            {
                "step": int(step),
                "accuracy": float(accuracy.mean()),
                "mnist": float(accuracy[:10].mean()),
                "fashion_mnist": float(accuracy[10:].mean()),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    steps = [r["step"] for r in rows]
    for key, label in (("accuracy", "all 20 prompts"), ("mnist", "MNIST prompts"), ("fashion_mnist", "Fashion-MNIST")):
        ax.plot(steps, [r[key] for r in rows], marker="o", label=label)
    ax.axhline(0.8, color="gray", linestyle=":", label="target 0.8")
    ax.set_xlabel("training step")
    ax.set_ylabel("mean per-prompt accuracy")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curve.png"), dpi=120)
    plt.close(fig)
    json.dump(rows, open(os.path.join(out, "curve.json"), "w"), indent=1)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--per-prompt", type=int, default=100)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", default="50")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clip", default="")
    p.add_argument("--inception", action="store_true")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--curve-per-prompt", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from research.data import make_eval_arrays
    from research.images import save_grid
    from research.metrics.evaluation import DatasetSpec, evaluate_images, feature_space
    from research.run import read_config
    from research.tasks import SampleOptions, get_task
    from research.tasks.text_to_image import class_prompts

    config = read_config(args.workdir)
    if config.task != "text_to_image" or config.data.name != "mnist_fashion":
        print(f"error: {args.workdir} is not a text_to_image run on mnist_fashion", file=sys.stderr)
        return 2
    clip_runs = _clip_runs(args.clip)
    out = args.out or os.path.join(args.workdir, "t2i_demo")
    os.makedirs(out, exist_ok=True)
    prompts = class_prompts(config)
    options = SampleOptions(
        step=args.step, sampler=args.sampler, steps=args.steps, guidance=args.guidance, batch_size=500
    )
    curve = []
    if args.curve_per_prompt:  # every checkpoint (accuracy_curve sets the step)
        curve = accuracy_curve(args.workdir, config, options, args.curve_per_prompt, args.seed, out)
    run = get_task(config.task).sampler(args.workdir, config, options)
    t0 = time.time()
    samples = run(len(prompts) * args.per_prompt, seed=args.seed)
    seconds = time.time() - t0
    images, labels = samples.images, np.asarray(samples.labels)
    np.savez(os.path.join(out, "samples.npz"), images=images, labels=labels, prompts=np.array(prompts)[labels])
    order = np.argsort(labels, kind="stable")  # prompt-major rows of 10 for the picture
    rows = np.concatenate([images[order][labels[order] == c][:10] for c in range(len(prompts))])
    save_grid(rows, os.path.join(out, "prompts.png"), ncols=10)

    accuracy = prompt_accuracy(images, labels)
    per_prompt, per_part = [], []
    for part, offset in PARTS:
        mask = (labels >= offset) & (labels < offset + 10)
        part_images, part_labels = images[mask], labels[mask] - offset
        scores = None
        if part in clip_runs:
            scores = clip_scores(clip_runs[part], part_images, list(np.array(prompts)[labels[mask]]), True)
            real, real_labels = make_eval_arrays(dict(config.data.to_dict(), name=part), "test", 2000)
            real_scores = clip_scores(clip_runs[part], real, [prompts[offset + int(y)] for y in real_labels], True)
        for c in range(10):
            sel = part_labels == c
            row = {"prompt": prompts[offset + c], "accuracy": float(accuracy[offset + c]), "n": int(sel.sum())}
            if scores is not None:
                row["clip_score"] = float(np.mean(scores[sel]))
                row["clip_score_real"] = float(np.mean(real_scores[real_labels == c]))
            per_prompt.append(row)
        summary = {"data": part, "accuracy": float(np.mean(accuracy[offset : offset + 10]))}
        spaces = ("domain", "inception") if args.inception else ("domain",)
        for kind in spaces:
            result = evaluate_images(
                part_images, feature_space(kind, part), DatasetSpec(part, "test"), kid=False, progress=False
            )
            summary.update(
                {
                    f"fid_{kind}": result["fid"],
                    f"precision_{kind}": result.get("precision"),
                    f"recall_{kind}": result.get("recall"),
                }
            )
        if scores is not None:
            summary["clip_score"], summary["clip_score_real"] = float(np.mean(scores)), float(np.mean(real_scores))
        per_part.append(summary)
        print(json.dumps(summary), flush=True)

    protocol = (
        f"Run {os.path.abspath(args.workdir)}, step {run.step} (EMA weights); {args.per_prompt} samples per prompt, "
        f"{args.sampler} {args.steps} steps, classifier-free guidance s = {args.guidance:g} against the empty prompt, "
        f"seeds fold_in({args.seed}, batch); sampling took {seconds:.0f} s for {len(images)} samples "
        f"(NFE {samples.nfe}). Accuracy: the domain classifier of the prompt's data set; FID against its test split."
    )
    lines = [protocol, "", "| prompt | accuracy | CLIP score (samples) | CLIP score (real) |", "|---|---|---|---|"]
    for row in per_prompt:
        clip = (f"{row['clip_score']:.2f}", f"{row['clip_score_real']:.2f}") if "clip_score" in row else ("-", "-")
        lines.append(f"| {row['prompt']} | {row['accuracy']:.2f} | {clip[0]} | {clip[1]} |")
    mean = np.mean([r["accuracy"] for r in per_prompt])
    lines += [
        "",
        f"Mean per-prompt accuracy {mean:.3f}.",
        "",
        "| data | accuracy | FID (domain) |"
        + (" FID (Inception) |" if args.inception else "")
        + " CLIP score | CLIP score (real) |",
        "|---|---|---|" + ("---|" if args.inception else "") + "---|---|",
    ]
    for s in per_part:
        inc = f" {s['fid_inception']:.2f} |" if args.inception else ""
        clip = (f"{s['clip_score']:.2f}", f"{s['clip_score_real']:.2f}") if "clip_score" in s else ("-", "-")
        lines.append(f"| {s['data']} | {s['accuracy']:.3f} | {s['fid_domain']:.2f} |{inc} {clip[0]} | {clip[1]} |")
    if curve:
        points = ", ".join(f"{r['step']}: {r['accuracy']:.3f}" for r in curve)
        lines += ["", f"Mean per-prompt accuracy at each checkpoint ({args.curve_per_prompt} per prompt): {points}."]
    text = "\n".join(lines) + "\n"
    open(os.path.join(out, "demo.md"), "w").write(text)
    json.dump(
        {"protocol": protocol, "prompts": per_prompt, "data": per_part, "sample_seconds": seconds, "curve": curve},
        open(os.path.join(out, "demo.json"), "w"),
        indent=1,
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
