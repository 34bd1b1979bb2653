"""The parsed flags become, once, the frozen specs of a run (:class:`engine.spec.Experiment`).

Every flag of :func:`cli.flags.build_parser` is mapped into a field of one of the four sections
(:data:`engine.spec.FIELD_FLAGS`) or declared here as belonging to no spec (:data:`RUN_LOCAL_FLAGS`); a test
enumerates the parser to keep it so. Later steps derive new experiments (never mutate one): the data's class
count and canonical name (:func:`with_data`), the effective precision on the device (:func:`on_device`), the
model of an ``--eval_only`` checkpoint (:func:`with_model`). Each derivation also updates the flag record
config.yaml and results.json's ``args`` keep, so that they say what was used.
"""
from __future__ import annotations

import argparse
import logging
from typing import Any, Dict, Optional, Sequence

import torch

from data.benchmarks import get_benchmark
from data.spec import DataSpec
from engine.spec import Experiment, OptimSpec, RunSpec
from engine.trainer import effective_precision
from models.backbones import backbone_arch, default_normalization, default_rank
from methods import get_method
from models.config import format_blocks
from models.spec import ModelSpec, WeightsSpec
from utils.errors import ModelSettingsError, UsageError

from .flags import DTL_FLAGS, method_config_of_flags, parse_args, resolved_method

__all__ = ["build_experiment", "model_spec", "with_data", "with_model", "on_device", "resolved_method",
           "parse_args", "RUN_LOCAL_FLAGS", "DTL_FLAGS"]

_logger = logging.getLogger("train")

#: Flags that go into no spec: they only steer the parsing itself.
RUN_LOCAL_FLAGS = ("config",)


def _method_config(args: argparse.Namespace) -> Dict[str, Any]:
    """The method's settings from the flags (:func:`cli.flags.method_config_of_flags`), checked, with the
    backbone's default rank for a left-out ``--r`` (DTL); a baseline's are its defaults (empty)."""
    method = get_method(args.method)
    if not method.supports("uses_dtl_flags"):
        given = [f"--{k}" for k in DTL_FLAGS if k not in ("fusion_size", "beta") and getattr(args, k) is not None]
        if given:
            _logger.info("%s: DTL setting%s that --method %s ignores (it uses its own configuration)",
                         ", ".join(given), "s" if len(given) > 1 else "", args.method)
        return {}
    config = method_config_of_flags(args)
    if config["r"] is None:
        try:
            config["r"] = default_rank(backbone_arch(args.model))
        except ModelSettingsError as e:
            raise UsageError(f"--model: {e}") from None
    try:
        return method.config_to_dict(method.config_from_dict(config))
    except ModelSettingsError as e:
        raise UsageError(f"cannot build --model {args.model} --method {args.method}: {e}") from None

def model_spec(args: argparse.Namespace, num_classes: int) -> ModelSpec:
    """The :class:`~models.spec.ModelSpec` of the model flags (``--mean``/``--std`` left out: the backbone's
    normalisation, :func:`models.backbones.default_normalization`)."""
    config = _method_config(args)
    mean, std = default_normalization(args.model)
    return ModelSpec(
        backbone=args.model, method=get_method(args.method).results_name(config), num_classes=num_classes,
        img_size=args.img_size, drop_path_rate=args.drop_path, backbone_kwargs=args.model_kwargs or {},
        method_config=config, weights=WeightsSpec.from_load_path(args.load_path),
        mean=args.mean if args.mean is not None else mean, std=args.std if args.std is not None else std)


def build_experiment(args: argparse.Namespace, world_size: int = 1) -> Experiment:
    """The four specs of parsed and validated flags (:func:`cli.flags.parse_args`)."""
    bench = get_benchmark(args.benchmark)
    data = DataSpec(benchmark=args.benchmark, dataset=args.dataset, data_dir=args.data_dir, shot=args.shot,
                    seeds=args.seeds, target_dataset=args.target_dataset, img_size=args.img_size,
                    check_images=args.check_images, skip_bad_images=args.skip_bad_images,
                    num_classes=args.num_classes, allow_train_test_overlap=args.allow_train_test_overlap)
    optim = OptimSpec(**{name: getattr(args, name) for name in OptimSpec.__dataclass_fields__})
    run = RunSpec(world_size=world_size, **{name: getattr(args, name) for name in RunSpec.__dataclass_fields__
                                            if name not in ("precision", "world_size")})
    num_classes = bench.num_classes(bench.canonical_dataset(args.dataset)) or 0  # 0: counted by with_data
    return Experiment(model_spec(args, num_classes), data, optim, run, vars(args))


def with_data(exp: Experiment, dataset: str, num_classes: int,
              class_names: Optional[Sequence[str]] = None) -> Experiment:
    """The experiment once its data are built: the canonical dataset name, the head's class count and, when the
    data name them, the class names."""
    model = exp.model.replace(num_classes=num_classes,
                              class_names=tuple(class_names) if class_names else exp.model.class_names)
    return exp.replace(data=exp.data.replace(dataset=dataset), model=model,
                       flags={**exp.flags, "dataset": dataset})


def on_device(exp: Experiment, device: torch.device) -> Experiment:
    """The experiment with its effective precision on ``device``. When ``--amp`` cannot be honoured (float16 off
    CUDA) it says so once and records ``amp`` off, so that config.yaml, results.json's ``args`` and ``last.pth``
    say what was used."""
    precision = effective_precision(exp.optim.amp, exp.optim.amp_dtype, device)
    run = exp.run.replace(precision=precision)
    if exp.optim.amp and precision == "fp32":
        _logger.warning("--amp with float16 needs CUDA: training in float32 on %s (use --amp_dtype bfloat16 for "
                        "CPU autocast); recorded as --no-amp", device)
        return exp.replace(run=run, optim=exp.optim.replace(amp=False), flags={**exp.flags, "amp": False})
    return exp.replace(run=run)


def with_model(exp: Experiment, spec: ModelSpec) -> Experiment:
    """``--eval_only``: the checkpoint's model (``spec``: :attr:`models.delta.DeltaCheckpoint.spec`) replaces the
    one of the flags, on the flags' backbone weights; its image size wins over ``--img_size``. The flag record
    says what is evaluated."""
    if spec.img_size != exp.data.img_size:
        _logger.info("--img_size %d from the checkpoint (was %d)", spec.img_size, exp.data.img_size)
    if spec.backbone != exp.model.backbone:
        _logger.info("--model %s from the checkpoint (was %s)", spec.backbone, exp.model.backbone)
    spec = spec.replace(weights=exp.model.weights)
    return exp.replace(model=spec, data=exp.data.replace(img_size=spec.img_size),
                       flags={**exp.flags, **_model_flags(spec)})


def _model_flags(spec: ModelSpec) -> Dict[str, Any]:
    """The model flags that give ``spec`` (for the flag record)."""
    method = get_method(spec.method)
    out: Dict[str, Any] = {"model": spec.backbone, "method": method.name, "img_size": spec.img_size}
    cfg = spec.method_config
    if method.supports("uses_dtl_flags"):
        values = {flag: cfg.get(key) for flag, key in DTL_FLAGS.items()}
        out.update(values, fusion_size=int(values["fusion_size"] or 0), beta=float(cfg.get("beta", 100.0)),
                   **{f: format_blocks(values[f]) for f in ("lora_before_blocks", "add_after_blocks")
                      if values[f] is not None})
    else:
        out.update(fusion_size=0, r=None, lora_before_blocks=None, add_after_blocks=None)
    return out
