"""Tasks: what a run trains, as registered objects.

`config.task` names a task; `get_task(name)` returns its object, importing `research/tasks/<name>.py` on first
use, so adding a task is adding one file that defines a `Task` subclass decorated with `@register_task("name")`.
The training loop (research/train/loop.py), the run loader and the sample command talk to tasks only through the
`Task` interface below; none of them names a task.

A task
  - validates its own config section (`validate`) and may rewrite the config before it is saved (`resolve`, e.g.
    making a referenced run's path absolute);
  - builds its `Trainer` for a mesh: the compiled init and step, the state's shardings, the checkpoint metadata
    (parameter signature, frozen-part references);
  - supplies optional hooks: the training data source, a per-batch preparation run on the global batch inside the
    loop (to latents, condition dropout happens inside the step), the preview written during training, what
    happens when the run finishes, and its sampler for `research.sample` (None for an autoencoder).
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
from typing import Any, Callable, Dict, Optional, Tuple

from research.config import ConfigError, apply_overrides, load_config_file, validate_common

_TASKS: Dict[str, "Task"] = {}
# Modules under research/tasks/ that are not tasks.
_NOT_TASKS = {"base", "common", "teacher", "add"}  # helpers; add.py is fewstep.method="add"


def register_task(name: str):
    """Class decorator: register one instance of a Task subclass under `name`."""

    def wrap(cls):
        if name in _TASKS and type(_TASKS[name]) is not cls:
            raise ValueError(f"task {name!r} is registered twice ({type(_TASKS[name]).__name__}, {cls.__name__})")
        cls.name = name
        _TASKS[name] = cls()
        return cls

    return wrap


def task_names() -> list:
    """Every task: those registered plus the modules in this package (imported to register them)."""
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name not in _NOT_TASKS and not info.name.startswith("_"):
            get_task(info.name)
    return sorted(_TASKS)


def get_task(name: str) -> "Task":
    if name not in _TASKS:
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    if name not in _TASKS:
        raise ConfigError(f"task={name!r} is not valid; choose one of {task_names()}")
    return _TASKS[name]


def task_of(config) -> "Task":
    return get_task(str(config.task))


def validate_config(config) -> None:
    """Fail before any compilation on values that cannot work, naming the key and the fix: the shared sections,
    then the task's own checks."""
    from research.train.mesh import check_rules

    validate_common(config)
    try:
        check_rules(config.train.sharding_rules)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    task = task_of(config)
    from research.train.grads import uses_loss_scale

    if not task.gradient_options and (config.train.grad_accum > 1 or uses_loss_scale(config)):
        what = f"train.grad_accum={config.train.grad_accum}" if config.train.grad_accum > 1 else "dynamic loss scaling"
        raise ConfigError(
            f"{what}: task {task.name!r} does not support it (the diffusion, text_to_image and controlnet tasks "
            f"do); use train.grad_accum=1 and a float32 or bfloat16 model.dtype"
        )
    task.validate(config)


def get_config(path: str, overrides=()):
    """Load a config file (`file.py` or `file.py:variant`), apply `--config.a.b=v` overrides, validate."""
    config = apply_overrides(load_config_file(path), overrides)
    validate_config(config)
    return config


@dataclasses.dataclass
class Trainer:
    """Everything the loop needs to train one task on one mesh."""

    model: Any  # the main network ('net'), for previews and summaries
    mesh: Any
    abstract_state: Any  # TrainState of ShapeDtypeStructs
    state_sharding: Any
    batch_sharding: Any
    init: Callable  # key -> sharded TrainState
    step: Callable  # (state, batch) -> (state, metrics); donates the state
    meta: dict  # stored with every checkpoint; meta['params'] is the parameter signature
    schedule: Any = None  # the diffusion schedule, when the task has one
    context: Dict[str, Any] = dataclasses.field(default_factory=dict)  # task-owned objects (frozen parts, ...)

    def abstract_state_sharded(self):
        import jax

        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract_state, self.state_sharding
        )


@dataclasses.dataclass
class Samples:
    """What a task's sampler returns: uint8 images [N, H, W, C], their labels [N] (-1 for unconditional models),
    the network evaluations per sample, and a file-name stem and one-line description."""

    images: Any
    labels: Any
    nfe: int
    name: str
    description: str


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """What `research.sample` asks of a task's sampler (None: the run's own config.sample value). A task refuses,
    with a ConfigError, every option it cannot honour; none is silently ignored."""

    step: Optional[int] = None  # checkpoint step (None: the newest readable one)
    use_ema: bool = True
    sampler: Optional[str] = None  # ddpm | ddim | dpm++2m | dpm++3m | dpm++2s | unipc
    steps: Any = None  # count, 'ddimN' or a timestep list
    eta: Optional[float] = None  # DDIM's eta
    batch_size: Optional[int] = None
    guidance: Optional[float] = None  # classifier-free guidance scale s = 1 + w
    guidance_rescale: float = 0.0
    grid: Optional[str] = None  # a solver's time grid: uniform | logsnr | karras
    classifier: Optional[str] = None  # a noisy_classifier run for classifier guidance
    classifier_scale: float = 1.0
    sigmas: Optional[Tuple[float, ...]] = None  # a consistency model's noise levels, one per step (cd/ct runs)


class Task(abc.ABC):
    """Base class: a task must build its trainer; every other hook has a default."""

    name = ""
    # Whether the step computes its gradients through research.train.grads (train.grad_accum, float16 loss scaling).
    gradient_options = False

    def validate(self, config) -> None:
        """Raise ConfigError for values of this task's section (and the shared sections it uses) that cannot work."""
        return None

    def resolve(self, config):
        """The config as it should be saved in config.json (e.g. referenced runs made absolute)."""
        return config

    def network_config(self, config):
        """The config whose model section builds this task's network, for inspection without training
        (research.summary): config itself, or e.g. a ControlNet's with its base run's architecture filled in."""
        return config

    @abc.abstractmethod
    def build_trainer(self, config, mesh) -> Trainer:
        """The compiled init and step of this task on `mesh`, with the state's shardings and checkpoint meta."""

    def data_source(self, config, trainer: Trainer):
        """The training split as a research.data source, or None for config.data's own."""
        return None

    def batch_preparer(self, config, trainer: Trainer) -> Optional[Callable]:
        """(batch dict, step) -> batch dict of global arrays, applied before the step (e.g. pixels -> latents).

        The batch holds the global arrays of the numeric fields and, as numpy string arrays of this process's rows,
        any text fields (captions), which the preparer must turn into arrays or drop."""
        return None

    def preview(self, config, trainer: Trainer) -> Optional[Callable]:
        """(state, png path) -> path: the picture written every train.sample_every steps."""
        return None

    def on_finish(self, config, trainer: Trainer, state, workdir: str) -> None:
        """Called once when the run reaches train.num_steps (also after a resume that finishes it)."""
        return None

    @property
    def has_sampler(self) -> bool:
        """Whether `sampler` can draw samples (a task whose override only explains the refusal sets False)."""
        return type(self).sampler is not Task.sampler

    def sampler(self, workdir: str, config, options: SampleOptions):
        """A callable (num, seed, progress) -> Samples for `research.sample`; ConfigError when the task has none.
        Options a task cannot honour (a sampler name for a few-step student, guidance without a null condition,
        a classifier workdir for classifier guidance) are refused with a ConfigError, never ignored."""
        raise ConfigError(f"{workdir} holds a {self.name!r} run, which has no sampler")


def default_labels(num: int, num_classes: int):
    """The one labelling policy of every sampler: class-conditional models cycle through the classes
    (0, 1, ..., K-1, 0, ...), so N samples cover the classes evenly; unconditional samples get label -1."""
    import numpy as np

    if num_classes:
        return np.arange(num, dtype=np.int32) % num_classes
    return np.full((num,), -1, np.int32)
