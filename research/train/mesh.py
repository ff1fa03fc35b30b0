"""One Mesh over all devices, axes ('data', 'model'), and the shardings derived from it.

Batches are split along 'data'. The same code runs on one CPU, on simulated CPU devices, on a GPU and across TPU
hosts: the compiler inserts the collectives, so every sharding below computes the same step as one device.

Where each state leaf (parameters, EMA parameters, optimizer moments, step, rng) lives is decided by
`train.sharding_rules`, a tuple of (regex, rule) pairs. Each regex is matched with re.search against the leaf's key
path written as '/'-joined names, e.g.

    params/net/down0_res0/conv1/kernel          (state field, part, then the module path)
    ema_params/net/block3/attn/qkv/kernel
    opt_state/net/1/0/mu/block3/attn/qkv/kernel  (part, optax chain index, adam's state, moment, module path)

Any pytree works the same way (a state without parts reads params/down0_res0/conv1/kernel).

The first matching pair wins. Name modules rather than state fields ('/attn/qkv/kernel$', not
'^params/net/attn/...') so that one rule covers the parameters, their EMA and their Adam moments alike; otherwise a
moment falls through to a later rule. Rules:

    'replicate'      every device holds the whole leaf.
    'fsdp'           fully sharded data parallel: the largest axis whose size the 'data' axis divides (ties: the last
                     such axis) is split over 'data'; leaves with fewer than train.fsdp_min_size elements, or with no
                     divisible axis, are replicated. The compiler all-gathers a weight where the forward pass needs it
                     and reduce-scatters its gradient, so per-device memory for params/EMA/Adam falls by the data size.
    'model:K'        tensor parallel: axis K (negative counts from the end) is split over 'model'; an error if
                     the 'model' size does not divide it.
    'fsdp+model:K'   both: axis K over 'model', then the largest other divisible axis over 'data' (as 'fsdp', with
                     its size threshold).

Frozen parts held outside the state (a teacher, the ControlNet's base, a frozen text encoder) are matched as
'frozen/<part>/<module path>' (frozen_shardings); a frozen leaf no rule names is replicated.

Rank-0 leaves (step, Adam's count) are always replicated. A leaf that matches no rule keeps the default: its last axis
is split over 'model' when train.mesh_model > 1 and divides it, otherwise it is replicated. With the default
sharding_rules=() runs behave exactly as before these rules existed.

Examples.
  DiT-XL/2 (675M parameters; params + EMA + Adam mu/nu in float32 are 10.8 GB) with FSDP over 8 devices:
  1.36 GB of state per device (the default fsdp_min_size replicates only biases, norms and a few small kernels):
      --config.train.sharding_rules="(('.*', 'fsdp'),)"
  Megatron-style tensor parallelism for the DiT blocks on a (data x model) = 4 x 2 mesh, FSDP for everything else:
  qkv and mlp_fc1 split their output features (kernels [D, 3D] / [D, 4D] and biases), attn/proj and mlp_fc2 their
  input features (kernel rows of [D, D] / [4D, D]), so each pair needs one all-reduce in the forward pass:
      --config.train.mesh_model=2 --config.train.sharding_rules="(
          (r'block\\d+/(attn/qkv|mlp_fc1)/', 'fsdp+model:-1'),
          (r'block\\d+/(attn/proj|mlp_fc2)/kernel', 'fsdp+model:0'),
          ('.*', 'fsdp'))"
  which holds 1.81 GB of DiT-XL/2 state per device.
  describe_shardings(abstract_state, shardings) prints the resulting table and the per-device state bytes.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

RULE_NAMES = ("replicate", "fsdp", "model:K", "fsdp+model:K")
DEFAULT_FSDP_MIN_SIZE = 2**18
_MODEL_RULE = re.compile(r"(fsdp\+)?model:(-?\d+)")


class Rule(NamedTuple):
    pattern: re.Pattern
    text: str  # the rule as written, for messages
    fsdp: bool  # split one axis over 'data'
    model_axis: Optional[int]  # the axis split over 'model', or None


def make_mesh(model_axis: int = 1, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) % model_axis:
        raise ValueError(f"train.mesh_model={model_axis} does not divide the {len(devices)} devices")
    grid = np.asarray(devices, dtype=object).reshape(len(devices) // model_axis, model_axis)
    return Mesh(grid, ("data", "model"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_rules(rules) -> tuple:
    """Parse train.sharding_rules into Rules; ValueError naming the bad entry for a bad regex or rule.

    Accepts a tuple of (regex, rule) pairs; a single pair or a bare rule name ('fsdp' = (('.*', 'fsdp'),)) is
    taken as one rule for every leaf.
    """
    if isinstance(rules, str):
        rules = ((".*", rules),)
    rules = tuple(rules)
    if len(rules) == 2 and all(isinstance(r, str) for r in rules):
        rules = (rules,)
    parsed = []
    for i, entry in enumerate(rules):
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
            raise ValueError(
                f"train.sharding_rules[{i}]={entry!r} is not a (regex, rule) pair of strings; "
                f"write e.g. (('.*', 'fsdp'),)"
            )
        regex, text = entry
        try:
            pattern = re.compile(regex)
        except re.error as e:
            raise ValueError(f"train.sharding_rules[{i}]: invalid regex {regex!r} ({e})") from None
        rule = text.strip().replace(" ", "")
        m = _MODEL_RULE.fullmatch(rule)
        if rule in ("replicate", "fsdp"):
            parsed.append(Rule(pattern, text, rule == "fsdp", None))
        elif m:
            parsed.append(Rule(pattern, text, bool(m.group(1)), int(m.group(2))))
        else:
            raise ValueError(
                f"train.sharding_rules[{i}]: unknown rule {text!r} for {regex!r}; use one of "
                f"{', '.join(RULE_NAMES)} (K an axis index, negative from the end)"
            )
    return tuple(parsed)


def path_name(path) -> str:
    """A jax key path as '/'-joined names: dict keys, attribute names, sequence indices."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return "/".join(parts)


def _fsdp_axis(shape, data: int, exclude: Optional[int] = None) -> Optional[int]:
    best = None
    for ax, n in enumerate(shape):
        if ax != exclude and n % data == 0 and (best is None or n >= shape[best]):
            best = ax
    return best


def leaf_spec(
    shape: Sequence[int],
    rule: Optional[Rule],
    data: int,
    model: int,
    fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE,
    name: str = "",
) -> P:
    """PartitionSpec of one leaf of this shape under a rule (None: the default) on a (data x model) mesh."""
    shape = tuple(int(n) for n in shape)
    rank = len(shape)
    if rank == 0:
        return P()
    if rule is None:
        if model > 1 and rank >= 2 and shape[-1] % model == 0:
            return P(*([None] * (rank - 1)), "model")
        return P()
    axes: list = [None] * rank
    model_ax = None
    if rule.model_axis is not None:
        if not -rank <= rule.model_axis < rank:
            raise ValueError(
                f"train.sharding_rules: rule {rule.text!r} ({rule.pattern.pattern!r}) names axis "
                f"{rule.model_axis} of {name!r}, which has shape {shape}; pick an axis in "
                f"[{-rank}, {rank}) or a narrower regex"
            )
        model_ax = rule.model_axis % rank
        if shape[model_ax] % model:
            raise ValueError(
                f"train.sharding_rules: rule {rule.text!r} ({rule.pattern.pattern!r}) splits axis "
                f"{rule.model_axis} of {name!r} (shape {shape}) over 'model' of size {model}, which "
                f"does not divide {shape[model_ax]}; change train.mesh_model or the rule"
            )
        if model > 1:
            axes[model_ax] = "model"
    if rule.fsdp and data > 1 and math.prod(shape) >= fsdp_min_size:
        ax = _fsdp_axis(shape, data, exclude=model_ax)
        if ax is not None:
            axes[ax] = "data"
    return P(*axes) if any(a is not None for a in axes) else P()


def state_specs(abstract_state, data: int, model: int, rules=(), fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE):
    """PartitionSpec for every leaf of a (shape-only) pytree on a (data x model) mesh; see the module docstring."""
    parsed = check_rules(rules)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
    specs = []
    for path, leaf in leaves:
        name = path_name(path)
        rule = next((r for r in parsed if r.pattern.search(name)), None)
        specs.append(leaf_spec(getattr(leaf, "shape", ()), rule, data, model, fsdp_min_size, name))
    return jax.tree_util.tree_unflatten(treedef, specs)


def state_shardings(mesh: Mesh, abstract_state, rules=(), fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE):
    """NamedSharding for every leaf of a (shape-only) state pytree, by train.sharding_rules (module docstring)."""
    specs = state_specs(abstract_state, mesh.shape["data"], mesh.shape["model"], rules, fsdp_min_size)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def frozen_shardings(mesh: Mesh, part: str, tree, train_config):
    """NamedShardings of a frozen part (a teacher, the ControlNet's base, a text encoder) held outside the state.

    train.sharding_rules are matched against 'frozen/<part>/<module path>' (e.g. frozen/base/down0_res0/conv1/kernel,
    frozen/teacher/..., frozen/text/...), so (('^frozen/', 'fsdp'), ...) shards every frozen part over 'data' and
    ('^frozen/teacher/', 'fsdp') only the teacher. A frozen leaf no rule names is replicated: frozen parts are read
    by every device on every step, so splitting them only pays when they do not fit."""
    parsed = check_rules(train_config.get("sharding_rules", ()))
    data, model = mesh.shape["data"], mesh.shape["model"]
    min_size = train_config.get("fsdp_min_size", DEFAULT_FSDP_MIN_SIZE)

    def spec(path, leaf):
        name = f"frozen/{part}/{path_name(path)}"
        rule = next((r for r in parsed if r.pattern.search(name)), None)
        if rule is None:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, leaf_spec(getattr(leaf, "shape", ()), rule, data, model, min_size, name))

    return jax.tree_util.tree_map_with_path(spec, tree)


def state_shardings_from_config(mesh: Mesh, abstract_state, train_config):
    """state_shardings with train.sharding_rules and train.fsdp_min_size (defaults when the keys are absent)."""
    return state_shardings(
        mesh,
        abstract_state,
        train_config.get("sharding_rules", ()),
        train_config.get("fsdp_min_size", DEFAULT_FSDP_MIN_SIZE),
    )


def _leaf_bytes(leaf, sharding) -> tuple:
    shape = tuple(getattr(leaf, "shape", ()))
    itemsize = np.dtype(getattr(leaf, "dtype", np.float32)).itemsize
    return math.prod(shape) * itemsize, math.prod(sharding.shard_shape(shape)) * itemsize


def state_bytes_per_device(abstract_state, shardings) -> int:
    """Bytes of the state each device holds (every device holds the same: only even splits are made)."""
    return sum(_leaf_bytes(a, s)[1] for a, s in zip(jax.tree.leaves(abstract_state), jax.tree.leaves(shardings)))


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def describe_shardings(abstract_state, shardings) -> str:
    """A table (path, shape, PartitionSpec, bytes per device) of every leaf and the per-device state total."""
    leaves = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
    shards = jax.tree.leaves(shardings)
    if len(leaves) != len(shards):
        raise ValueError(f"describe_shardings: {len(leaves)} state leaves but {len(shards)} shardings")
    rows, total, per_device = [], 0, 0
    for (path, leaf), sh in zip(leaves, shards):
        full, mine = _leaf_bytes(leaf, sh)
        total += full
        per_device += mine
        spec = getattr(sh, "spec", sh)
        rows.append((path_name(path), str(tuple(getattr(leaf, "shape", ()))), str(spec), str(mine)))
    header = ("path", "shape", "spec", "bytes/device")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]

    def fmt(row):
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    lines = [fmt(header)] + [fmt(r) for r in rows]
    lines.append(
        f"state per device: {per_device} bytes ({_human(per_device)}); whole state {total} bytes "
        f"({_human(total)}), {len(rows)} leaves"
    )
    return "\n".join(lines)


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
    """Assemble a global array from this process's slice of the batch (works for one process too)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
