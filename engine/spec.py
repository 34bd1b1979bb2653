"""The recipe and run sections of a run, and the :class:`Experiment` holding all four sections.

A run is described by four frozen specs, built once from the flags (:func:`cli.specs.build_experiment`):
:class:`models.spec.ModelSpec` (what is trained), :class:`data.spec.DataSpec` (on what),
:class:`OptimSpec` (the recipe) and :class:`RunSpec` (how this invocation runs). config.yaml, ``last.pth`` and
results.json store them (:meth:`Experiment.sections`); a resume compares the stored sections with the current
ones field by field (:func:`spec_differences`), ignoring the fields :data:`RUN_LOCAL_FIELDS` declares
(the output folder, the loader processes, the device choice, ...), which may change between invocations.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from data.spec import DataSpec
from models.spec import FrozenDict, ModelSpec, freeze

__all__ = ["OptimSpec", "RunSpec", "Experiment", "RUN_LOCAL_FIELDS", "FIELD_FLAGS", "DERIVED_FIELDS", "SECTIONS",
           "spec_differences", "SpecDifference"]

#: The sections of an :class:`Experiment`, in the order config.yaml / last.pth / results.json write them.
SECTIONS = ("model", "data", "optim", "run")


@dataclass(frozen=True)
class OptimSpec:
    """The training recipe: AdamW, the cosine schedule with warm-up, batch sizes, mixing, smoothing, EMA.

    ``epochs`` cosine epochs plus ``warmup_epochs`` are trained in all (:attr:`total_epochs`). ``amp`` /
    ``amp_dtype`` are the requested autocast (what runs is :attr:`RunSpec.precision`). ``eval_interval``:
    validate every N epochs (benchmarks that select on validation; ``None`` elsewhere). ``seed``: the random
    seed, offset by the data seed (model initialisation) and the rank (training randomness).
    """

    lr: float = 1e-3
    weight_decay: float = 0.05
    epochs: int = 100
    warmup_epochs: int = 10
    min_lr: float = 1e-8
    warmup_lr: float = 1e-7
    batch_size: int = 32
    batch_size_test: int = 256
    amp: bool = False
    amp_dtype: str = "float16"
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    smoothing: float = 0.0
    ema: bool = False
    ema_decay: float = 0.9998
    eval_interval: Optional[int] = None
    seed: int = 42

    @property
    def total_epochs(self) -> int:
        """Epochs trained in all: ``epochs + warmup_epochs`` (the original; the last ``warmup_epochs`` at
        ``min_lr``)."""
        return self.epochs + self.warmup_epochs

    @property
    def mixing(self) -> bool:
        """Whether mixup or cutmix is on."""
        return self.mixup > 0 or self.cutmix > 0

    def replace(self, **changes: Any) -> "OptimSpec":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RunSpec:
    """How this invocation runs: where it writes, on what device and in what precision, with how many
    processes, with which memory/speed options, from which checkpoints.

    ``precision`` is the effective one (``fp32``/``fp16``/``bf16``), ``None`` until the device is known
    (:meth:`Experiment.on_device`).
    """

    output_dir: str = ""
    device: str = "auto"
    precision: Optional[str] = None
    deterministic: bool = False
    world_size: int = 1
    num_workers: int = 4
    tensorboard: bool = True
    prefetcher: bool = False
    lean: bool = False
    cache_prefix: bool = False
    cache_prefix_approx: bool = False
    cache_storage: str = "auto"
    cache_dtype: str = "float16"
    cache_dir: Optional[str] = None
    resume: str = ""
    initial_checkpoint: str = ""
    eval_only: bool = False
    checkpoint: str = ""
    allow_backbone_mismatch: bool = False
    delta_folder: bool = False
    find_unused_parameters: bool = False

    def replace(self, **changes: Any) -> "RunSpec":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


#: Fields that belong to one invocation, not to what is trained: a resume ignores their differences.
RUN_LOCAL_FIELDS: Mapping[str, Tuple[str, ...]] = FrozenDict({
    "data": ("data_dir", "check_images", "skip_bad_images"),
    "optim": ("batch_size_test", "amp", "amp_dtype"),  # what autocast does is run.precision, which is compared
    "run": ("output_dir", "device", "deterministic", "world_size", "num_workers", "tensorboard", "prefetcher",
            "cache_storage", "cache_dir", "resume", "eval_only", "checkpoint", "allow_backbone_mismatch",
            "delta_folder", "find_unused_parameters"),
})

#: The train.py flag that sets each spec field (``section.field``; a DTL setting: ``model.method_config.<key>``).
FIELD_FLAGS: Mapping[str, str] = FrozenDict({
    "model.backbone": "model", "model.method": "method", "model.img_size": "img_size",
    "model.drop_path_rate": "drop_path", "model.backbone_kwargs": "model_kwargs", "model.weights": "load_path",
    "model.mean": "mean", "model.std": "std",
    "model.method_config.r": "r", "model.method_config.beta": "beta",
    "model.method_config.fusion_size": "fusion_size", "model.method_config.csn_blocks": "lora_before_blocks",
    "model.method_config.add_back_blocks": "add_after_blocks",
    **{f"data.{f.name}": f.name for f in dataclasses.fields(DataSpec)},
    **{f"optim.{f.name}": f.name for f in dataclasses.fields(OptimSpec)},
    **{f"run.{f.name}": f.name for f in dataclasses.fields(RunSpec) if f.name not in ("precision", "world_size")},
})


#: Spec fields that no flag sets, with where they come from (named when a resume finds them changed).
DERIVED_FIELDS: Mapping[str, str] = FrozenDict({
    "model.class_names": "label i is class i of the data: classes.txt, else the sorted train/ folders or list "
                         "labels; a changed order would permute the labels the head learnt",
})

@dataclass(frozen=True)
class Experiment:
    """The four sections of a run, plus ``flags``: the resolved train.py flags as config.yaml and results.json's
    ``args`` record them (derived from the same parse; kept in step by :meth:`with_model` / :meth:`on_device`)."""

    model: ModelSpec
    data: DataSpec
    optim: OptimSpec
    run: RunSpec
    flags: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "flags", freeze(dict(self.flags)))

    def sections(self) -> Dict[str, Dict[str, Any]]:
        """``{"model": ..., "data": ..., "optim": ..., "run": ...}``: the plain form stored in every file."""
        return {name: getattr(self, name).to_dict() for name in SECTIONS}

    def replace(self, **changes: Any) -> "Experiment":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class SpecDifference:
    """One field that differs between a stored and the current experiment."""

    section: str
    field: str
    saved: Any
    current: Any

    @property
    def flag(self) -> Optional[str]:
        """The flag that sets the field (``--lr``), ``None`` for derived fields (``run.precision``)."""
        name = FIELD_FLAGS.get(f"{self.section}.{self.field}")
        return f"--{name}" if name else None

    def describe(self) -> str:
        where = f"{self.section} spec, {self.field}"
        head = f"{self.flag}: " if self.flag else f"{self.section}.{self.field}: "
        hint = DERIVED_FIELDS.get(f"{self.section}.{self.field}")
        return f"{head}checkpoint {_short(self.saved)} vs now {_short(self.current)} ({where}" + \
            (f"; {hint})" if hint else ")")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def _plain(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def spec_differences(saved: Mapping[str, Mapping[str, Any]], current: Experiment,
                     compare_fingerprint: bool = False) -> List[SpecDifference]:
    """Every field of ``saved`` (:meth:`Experiment.sections` of the stored run) that differs from ``current``,
    section by section, except the :data:`RUN_LOCAL_FIELDS`. DTL settings are compared key by key
    (``method_config.fusion_size``); the backbone weights by kind and source, and by the tensors' fingerprint
    when ``compare_fingerprint`` (known once the backbone is loaded). A section or field the stored run lacks
    (an older file) is not compared."""
    now = current.sections()
    out: List[SpecDifference] = []
    for section in SECTIONS:
        old, new = saved.get(section), now[section]
        if not isinstance(old, Mapping):
            continue
        local = set(RUN_LOCAL_FIELDS.get(section, ()))
        for name, value in new.items():
            if name in local or name not in old:
                continue
            if section == "model" and name == "method_config":
                keys = sorted(set(old[name] or {}) | set(value or {}))
                out += [SpecDifference(section, f"method_config.{k}", (old[name] or {}).get(k), (value or {}).get(k))
                        for k in keys if _plain((old[name] or {}).get(k)) != _plain((value or {}).get(k))]
                continue
            if section == "model" and name == "weights":
                keys = ("kind", "source", "fingerprint") if compare_fingerprint else ("kind", "source")
                a, b = ({k: (w or {}).get(k) for k in keys} for w in (old[name], value))
                if a != b:
                    out.append(SpecDifference(section, name, a, b))
                continue
            if _plain(old[name]) != _plain(value):
                out.append(SpecDifference(section, name, old[name], value))
    return out
