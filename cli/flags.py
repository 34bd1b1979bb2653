"""Command line of ``train.py``: the original's flag names, grouped; an optional YAML config; validation.

``--config FILE.yaml`` holds ``flag: value`` pairs (flag names without dashes, e.g. ``lr: 0.001``) that become
the defaults; anything given on the command line wins. Unknown keys, empty values and YAML aliases are errors
naming the file and key; a boolean flag takes a YAML boolean or true/false, yes/no, on/off, 1/0 (also quoted),
anything else is an error naming the key.

This module imports no torch/timm (only the stdlib, yaml and the light registries of benchmarks and methods):
parsing and validating flags is cheap for tools and launcher checks (``tools/run_table.py`` reads every
launcher's flags without torch). The checks that depend on the tuning method read its capabilities from
:mod:`methods`. The parsed flags become the run's typed specs in :mod:`cli.specs`; nothing below train.py reads
the namespace.
"""
from __future__ import annotations

import argparse
import difflib
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from data.benchmarks import BENCHMARKS, REGISTRY, get_benchmark
from methods import get_method, method_names
from utils.blocks import parse_blocks
from utils.errors import UsageError

__all__ = ["UsageError", "FlagParser", "build_parser", "parse_args", "infer_benchmark", "parse_int_list",
           "block_range", "float_triple", "positive_float_triple", "model_kwargs_type", "MODEL_KWARGS_OWNED",
           "CACHE_STORAGES", "CACHE_DTYPES", "DTL_FLAGS", "method_config_of_flags", "resolved_method"]

CACHE_STORAGES = ("auto", "device", "host", "mmap")
CACHE_DTYPES = ("float16", "bfloat16", "float32")
#: The flags of the DTL settings -> their keys in the method's configuration (``ModelSpec.method_config`` of a
#: method with ``uses_dtl_flags``): the original's flag names, the configuration's names.
DTL_FLAGS = {"fusion_size": "fusion_size", "r": "r", "beta": "beta", "lora_before_blocks": "csn_blocks",
             "add_after_blocks": "add_back_blocks"}
#: The most YAML nodes a --config file may have (a config is a few dozen flag: value pairs).
CONFIG_MAX_NODES = 10_000
#: The longest repr of a value an error message shows.
_MAX_REPR = 200


def parse_int_list(text: str) -> List[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (also ``"0-2"``)."""
    try:
        out = parse_blocks(str(text), "list")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers such as 0,1,2, got {text!r}")
    if not out:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    return out


def block_range(text: str) -> str:
    """A block selection such as ``0-11`` or ``0,2,4-6`` (validated, kept as written)."""
    try:
        parse_blocks(text, "blocks")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))
    return str(text)


#: ``--model_kwargs`` keys that other flags own (the model builder passes them itself) -> the flag to use.
MODEL_KWARGS_OWNED = {
    "num_classes": "--num_classes (the class count comes from the data)",
    "img_size": "--img_size",
    "drop_path_rate": "--drop_path",
    "pretrained": "--load_path timm",
    "load_path": "--load_path",
    "checkpoint_path": "--load_path",
    "lean": "--lean",
    "model_name": "--model",
    "name": "--model",
    "method": "--method",
    "dtl": "--method and its flags (--r, --fusion_size, ...)",
    "settings": "--method and its flags",
    "config": "--method and its flags",
}
_KWARGS_FORM = "key=value pairs separated by ',' only (e.g. embed_dim=64,num_heads=2)"


def model_kwargs_type(text: str) -> Dict[str, Any]:
    """``"embed_dim=64,patch_size=8"`` -> ``{"embed_dim": 64, "patch_size": 8}`` (values read as YAML scalars;
    ``(2,2,6,2)`` as a list). Refused: a piece without ``=``, an empty value, another separator than ``,``
    (``a=1 b=2``, ``a=1;b=2``), a key given twice, and the keys other flags own (:data:`MODEL_KWARGS_OWNED`);
    an explicit ``null`` is a value (timm's ``None``)."""
    if isinstance(text, dict):  # a --config mapping
        for key, value in text.items():
            _check_kwarg(str(key))
        return dict(text)
    out: Dict[str, Any] = {}
    for part in _split_top_level(str(text)):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        where = f"{part.strip()!r}" + (f" in {str(text)!r}" if part.strip() != str(text).strip() else "")
        if not sep or not key.isidentifier():
            raise argparse.ArgumentTypeError(f"expected {_KWARGS_FORM}, got {where}")
        outside = "".join(_split_top_level(value, keep_nested=False))
        if "=" in outside or (not value.startswith(("'", '"')) and any(c.isspace() or c == ";" for c in outside)):
            raise argparse.ArgumentTypeError(f"expected {_KWARGS_FORM}, got {where}")
        if not value:
            raise argparse.ArgumentTypeError(f"{key!r} has no value (expected {key}=VALUE), got {where}")
        if key in out:
            raise argparse.ArgumentTypeError(f"{key!r} is given twice in {str(text)!r}")
        if value.startswith("(") and value.endswith(")"):  # a tuple, e.g. depths=(2,2,6,2): read as a list
            value = "[" + value[1:-1] + "]"
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise argparse.ArgumentTypeError(f"cannot read the value of {key!r}: {value!r}") from None
        _check_kwarg(key)
    return out


def _check_kwarg(key: str) -> None:
    if not key.isidentifier():
        raise argparse.ArgumentTypeError(f"{key!r} is not a keyword argument name (expected {_KWARGS_FORM})")
    if key in MODEL_KWARGS_OWNED:
        raise argparse.ArgumentTypeError(f"{key} is set by {MODEL_KWARGS_OWNED[key]}, not by --model_kwargs; "
                                         f"remove it from --model_kwargs")


def _split_top_level(text: str, keep_nested: bool = True) -> List[str]:
    """Split at the commas outside brackets: ``"a=1,b=[1,2]"`` -> ``["a=1", "b=[1,2]"]`` (``keep_nested=False``:
    without the bracketed parts, ``["a=1", "b="]``)."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                raise argparse.ArgumentTypeError(f"unbalanced brackets in {text!r}")
        elif depth and not keep_nested:
            continue
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise argparse.ArgumentTypeError(f"unbalanced brackets in {text!r}")
    parts.append("".join(cur))
    return parts


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return v


def _nonneg_int(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return v


def float_triple(text: str) -> Tuple[float, float, float]:
    """``"0.485,0.456,0.406"`` -> ``(0.485, 0.456, 0.406)``: three finite numbers, one per channel."""
    parts = [p.strip() for p in str(text).strip("()[] ").split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers such as 0.5,0.5,0.5, "
                                         f"got {text!r}") from None
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected three finite numbers (one per RGB channel), got {text!r}")
    return values  # type: ignore[return-value]


#: The smallest --std value: float32's smallest normal number (a smaller one, e.g. 1e-45, is 0 or denormal in
#: float32 and 1/std is infinite).
MIN_STD = 1.1754943508222875e-38


def positive_float_triple(text: str) -> Tuple[float, float, float]:
    """:func:`float_triple` whose values are > 0 (``--std``: the images are divided by it); values below
    :data:`MIN_STD`, whose reciprocal is not finite in float32, are refused too."""
    values = float_triple(text)
    if not all(v >= MIN_STD for v in values):
        raise argparse.ArgumentTypeError(f"expected three numbers > 0 (at least {MIN_STD:.2g}, one per RGB "
                                         f"channel; the images are divided by them), got {text!r}")
    return values


def _data_flags(g: argparse._ArgumentGroup) -> None:
    """Data: root, benchmark, dataset, shots and seeds, input size, loading and its checks, classes."""
    g.add_argument("--data_dir", default="", help="benchmark root (VTAB-1k / FGFS / DG folder)")
    g.add_argument("--dataset", default="", help="VTAB task (cifar_100, ...), few-shot dataset (food101-FS, ...) "
                   "or DG target (imagenet-sketch, ...)")
    g.add_argument("--benchmark", default=None, choices=BENCHMARKS, help="inferred from --dataset when omitted")
    g.add_argument("--shot", type=_positive_int, default=None,
                   help="few-shot: shots per class (1,2,4,8,16); DG: shots of the ImageNet source (default 16)")
    g.add_argument("--seeds", type=parse_int_list, default=None,
                   help="data seeds to run in turn (few-shot / DG split seeds; default 0,1,2 there, 0 for VTAB); "
                        "the random seed of seed k is --seed + k")
    g.add_argument("--target_dataset", default=None,
                   help="DG only: target(s) to evaluate: a name, a comma list, or 'all' (the five targets); "
                        "default: --dataset")
    g.add_argument("--img_size", type=_positive_int, default=224, help="input resolution")
    g.add_argument("--num_workers", type=_nonneg_int, default=4, help="data-loading processes per GPU/process")
    g.add_argument("--prefetcher", action=argparse.BooleanOptionalAction, default=False,
                   help="on CUDA: load uint8 images and normalise them on the device in a side stream")
    g.add_argument("--check_images", action=argparse.BooleanOptionalAction, default=True,
                   help="open every listed image's header at start (finds non-image/empty files before training)")
    g.add_argument("--skip_bad_images", action="store_true",
                   help="drop missing/unreadable images (decodes every image at start) instead of stopping")
    g.add_argument("--num_classes", type=_positive_int, default=None,
                   help="the class count you expect; checked against the data (default: the data's own count)")
    g.add_argument("--allow_train_test_overlap", action="store_true",
                   help="accept an image listed both for training and for testing (refused otherwise)")


def _model_flags(g: argparse._ArgumentGroup) -> None:
    """Model: backbone and its weights, the tuning method and its settings, drop path, normalisation."""
    g.add_argument("--model", default="vit_base_patch16_224_in21k",
                   help="backbone: vit_base_patch16_224_in21k (the original's), swin_base_patch4_window7_224_in22k, "
                        "or any timm ViT/Swin name")
    g.add_argument("--load_path", default="",
                   help="pre-trained backbone weights (.npz / .pth / .safetensors); 'timm' = timm's published "
                        "weights for --model (downloaded); empty = random initialisation (a warning)")
    g.add_argument("--method", default="dtl",
                   help=f"tuning method: {', '.join(method_names())} (dtl: DTL, or DTL+ with --fusion_size > 0; "
                        f"the others: the baselines; methods/builtin.py)")
    g.add_argument("--fusion_size", type=_nonneg_int, default=0, help="DTL+ depthwise kernel (0 = DTL)")
    g.add_argument("--r", type=_positive_int, default=None, help="CSN rank (default: ViT 2, Swin 4)")
    g.add_argument("--beta", type=float, default=100.0, help="swish gate slope")
    g.add_argument("--lora_before_blocks", type=block_range, default=None,
                   help="blocks whose input the CSN taps, e.g. 0-11 (default: ViT all, Swin-B 4-23)")
    g.add_argument("--add_after_blocks", type=block_range, default=None,
                   help="blocks after which side information is added, e.g. 6-11 (default: ViT second half, "
                        "Swin-B 14-23)")
    g.add_argument("--drop_path", type=float, default=0.0, help="stochastic depth rate of the backbone")
    g.add_argument("--model_kwargs", type=model_kwargs_type, default=None, metavar="K=V,...",
                   help="extra timm arguments of the backbone, e.g. embed_dim=64,num_heads=2,patch_size=8 or, for "
                        "Swin, embed_dim=16,depths=[1,1,2,1],num_heads=[1,1,2,2],window_size=2 (small experiments; "
                        "stored in the delta checkpoint); not the settings of other flags (img_size: --img_size, "
                        "num_classes, drop_path_rate: --drop_path, ...)")
    g.add_argument("--mean", type=float_triple, default=None, metavar="R,G,B",
                   help="input normalisation mean per channel (default: the backbone's, 0.5,0.5,0.5 for the "
                        "paper's backbones)")
    g.add_argument("--std", type=positive_float_triple, default=None, metavar="R,G,B",
                   help="input normalisation std per channel (default: the backbone's)")


def _optimisation_flags(g: argparse._ArgumentGroup) -> None:
    """The recipe: learning rate and schedule, epochs, batch sizes, mixed precision."""
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    g.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay (not on *.bias)")
    g.add_argument("--epochs", type=_nonneg_int, default=100, help="cosine epochs (t_initial)")
    g.add_argument("--warmup_epochs", type=_nonneg_int, default=10,
                   help="warm-up epochs; training runs epochs + warmup_epochs in all, the last at --min_lr")
    g.add_argument("--min_lr", type=float, default=1e-8, help="cosine floor")
    g.add_argument("--warmup_lr", type=float, default=1e-7, help="learning rate at the start of the warm-up")
    g.add_argument("--batch_size", type=_positive_int, default=32,
                   help="training batch (global: split over the processes of a torchrun run)")
    g.add_argument("--batch_size_test", type=_positive_int, default=256, help="evaluation batch per process")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="mixed precision on CUDA (autocast; fp16 with a gradient scaler)")
    g.add_argument("--amp_dtype", default="float16", choices=("float16", "bfloat16"),
                   help="autocast dtype of --amp (bfloat16 needs no scaler and also works on the CPU)")


def _regularisation_flags(g: argparse._ArgumentGroup) -> None:
    """The recipe's regularisation: Mixup / CutMix, label smoothing, EMA."""
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0 = off)")
    g.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0 = off)")
    g.add_argument("--mixup_prob", type=float, default=1.0, help="probability of mixup/cutmix per batch")
    g.add_argument("--smoothing", type=float, default=0.0, help="label smoothing")
    g.add_argument("--ema", action=argparse.BooleanOptionalAction, default=False,
                   help="keep an EMA of the trainable tensors and evaluate/save it")
    g.add_argument("--ema_decay", type=float, default=0.9998, help="EMA decay per step")


def _memory_speed_flags(g: argparse._ArgumentGroup) -> None:
    """Beyond the original: lean mode and the frozen-prefix cache."""
    g.add_argument("--lean", action=argparse.BooleanOptionalAction, default=False,
                   help="DTL only: recompute the frozen blocks' activations in backward instead of storing them "
                        "(same results up to float summation order, a fraction of the training memory)")
    g.add_argument("--cache_prefix", action=argparse.BooleanOptionalAction, default=False,
                   help="DTL only: compute the frozen blocks before the first add-back block once per training "
                        "image (needs a deterministic training transform, i.e. VTAB-1k, and no drop-path there) and "
                        "train every epoch on the remaining blocks only")
    g.add_argument("--cache_prefix_approx", action="store_true",
                   help="let --cache_prefix approximate: random augmentation frozen to one sample per image and "
                        "the cached blocks run without drop-path/dropout")
    g.add_argument("--cache_storage", default="auto", choices=CACHE_STORAGES,
                   help="where --cache_prefix keeps the cache: GPU memory, host RAM, a memory-mapped file in "
                        "--cache_dir, or auto (the first that fits)")
    g.add_argument("--cache_dtype", default="float16", choices=CACHE_DTYPES,
                   help="storage precision of the --cache_prefix cache")
    g.add_argument("--cache_dir", default=None, metavar="DIR",
                   help="folder of the memory-mapped --cache_prefix file (default: the system temp folder)")


def _run_flags(g: argparse._ArgumentGroup) -> None:
    """The run: seed, device, output folder, resume and starting points, evaluation, logging, DDP."""
    g.add_argument("--seed", type=int, default=42, help="random seed (offset by the seed index and the rank)")
    g.add_argument("--device", default="auto",
                   help="auto, cpu, cuda, cuda:N (under torchrun: process LOCAL_RANK uses GPU N + LOCAL_RANK)")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=False,
                   help="bitwise reproducible GPU runs: deterministic algorithms (an op without one is an error), "
                        "cuDNN without autotuning, math attention, CUBLAS_WORKSPACE_CONFIG=:4096:8 (slower)")
    g.add_argument("--output_dir", default="",
                   help="run folder (default output/<benchmark>/<dataset>/<method>[_shot_k]/<timestamp>)")
    g.add_argument("--resume", default="", metavar="LAST_PTH", help="continue the run of this last.pth")
    g.add_argument("--initial_checkpoint", default="", metavar="PATH",
                   help="start the trainable tensors from this file: a delta, a last.pth (its trainable tensors "
                        "only) or a state dict (this project's or the original code's key layout)")
    g.add_argument("--eval_only", action="store_true", help="evaluate --checkpoint on the test split, no training")
    g.add_argument("--allow_backbone_mismatch", action="store_true",
                   help="use a delta with backbone weights other than the ones it was trained on (otherwise refused; "
                        "the mismatch is logged)")
    g.add_argument("--checkpoint", default="", metavar="DELTA",
                   help="delta checkpoint (delta.pth) or delta folder (config.json + delta.safetensors) for --eval_only")
    g.add_argument("--delta_folder", action="store_true",
                   help="DTL: also write each delta as a folder next to it (delta/: config.json + delta.safetensors, "
                        "loadable with models.load_delta or timm.create_model('local-dir:...'))")
    g.add_argument("--eval_interval", type=_positive_int, default=None,
                   help="few-shot: validate every N epochs (default 10) and keep the best weights")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True,
                   help="write TensorBoard events into the run folder")
    g.add_argument("--find_unused_parameters", action="store_true",
                   help="DDP: allow trainable tensors without gradient (not needed for DTL)")


class FlagParser(argparse.ArgumentParser):
    """``train.py``'s parser. A usage error is two lines (the error, with the closest flag for a misspelled one,
    and where every flag is listed) instead of argparse's whole usage text before it; the exit status stays 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {self._suggest(message)}\n"
                     f"{self.prog}: every flag and its default: {self.prog} --help\n")

    def _suggest(self, message: str) -> str:
        """``unrecognized arguments: --epoch 3`` -> ``... --epoch (did you mean --epochs?) 3``."""
        head, sep, rest = message.partition("unrecognized arguments: ")
        if not sep:
            return message
        known = [o for o in self._option_string_actions if o.startswith("--")]
        words = []
        for word in rest.split(" "):
            close = difflib.get_close_matches(word.split("=")[0], known, n=1, cutoff=0.75) \
                if word.startswith("--") else []
            words.append(f"{word} (did you mean {close[0]}?)" if close else word)
        return head + sep + " ".join(words)


#: The groups of ``train.py --help``, in order: (title, the function adding its flags).
FLAG_SECTIONS = (
    ("data", _data_flags),
    ("model", _model_flags),
    ("optimisation", _optimisation_flags),
    ("regularisation", _regularisation_flags),
    ("memory/speed (beyond the original)", _memory_speed_flags),
    ("run", _run_flags),
)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``train.py`` (also used by the launcher tests to read the launchers' commands)."""
    p = FlagParser(
        prog="train.py",
        description="DTL / DTL+ (and baseline tuning methods) on VTAB-1k, few-shot FGFS and domain generalisation.",
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", default=None, metavar="YAML", help="YAML file of flag defaults (flag: value)")
    for title, add_flags in FLAG_SECTIONS:
        add_flags(p.add_argument_group(title))
    return p


_BOOL_ACTIONS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _short(value: Any) -> str:
    """``repr(value)``, cut to a bounded length for messages (a --config value can be arbitrarily large)."""
    text = repr(value)
    return text if len(text) <= _MAX_REPR else text[:_MAX_REPR] + f"... ({len(text)} characters)"


def _config_bool(path: str, key: Any, v: Any) -> bool:
    """A boolean flag's value in ``--config``: a YAML boolean, 0/1, or (quoted) true/false, yes/no, on/off, 1/0 in
    any case. Anything else (``"maybe"``, ``2``, an empty value) is refused: a string such as ``"no"`` must not
    count as True just because it is not empty."""
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in _TRUE + _FALSE:
        return v.strip().lower() in _TRUE
    raise UsageError(f"--config {path}: {_short(key)} is a boolean flag: use true or false (also yes/no, on/off, "
                     f"1/0), got {_short(v)}")


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without aliases (``*name``: a small file could expand to a huge document) and with at
    most :data:`CONFIG_MAX_NODES` nodes."""

    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are not "
                                 f"supported in a --config file; write the value out")
        self._nodes = getattr(self, "_nodes", 0) + 1
        if self._nodes > CONFIG_MAX_NODES:
            raise yaml.YAMLError(f"more than {CONFIG_MAX_NODES} YAML nodes; a --config file is a mapping of "
                                 f"flag: value")
        return super().compose_node(parent, index)


#: The key under which config.yaml records the run's specs (informational; skipped when read as --config).
SPECS_KEY = "specs"


def _load_config(path: str, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise UsageError(f"--config: file not found: {path}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            cfg = yaml.load(f, Loader=_ConfigLoader) or {}
    except yaml.MarkedYAMLError as e:
        where = f"line {e.problem_mark.line + 1}: " if e.problem_mark is not None else ""
        raise UsageError(f"--config {path}: not valid YAML: {where}{str(e.problem)[:_MAX_REPR]}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path}: not valid YAML: " + " ".join(str(e).split())[:_MAX_REPR]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--config {path}: cannot read it ({e})") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"--config {path}: expected a mapping of flag: value")
    actions = {a.dest: a for a in parser._actions}
    out: Dict[str, Any] = {}
    for k, v in cfg.items():
        key = str(k).lstrip("-").replace("-", "_")
        if key == SPECS_KEY and isinstance(v, dict):
            continue  # config.yaml's record of the specs: derived from the flags above it
        if key not in actions or key in ("help", "config"):
            raise UsageError(f"--config {path}: unknown key {_short(k)} (keys are train.py flag names, e.g. lr, "
                             f"epochs)")
        action = actions[key]
        if isinstance(action, _BOOL_ACTIONS):
            out[key] = _config_bool(path, k, v)
            continue
        if v is None and action.default is not None:
            raise UsageError(f"--config {path}: {_short(k)} has no value; write {key}: VALUE, or leave the key out "
                             f"for the default ({_short(action.default)})")
        if v is not None and action.type is not None and not isinstance(v, bool):
            try:
                if isinstance(v, dict):
                    v = action.type(v)
                else:
                    v = action.type(str(v)) if not isinstance(v, list) else action.type(",".join(str(x) for x in v))
            except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
                raise UsageError(f"--config {path}: bad value for {_short(k)}: {str(e)[:_MAX_REPR]}") from None
        if action.choices is not None and v is not None and v not in action.choices:
            raise UsageError(f"--config {path}: {_short(k)} must be one of {list(action.choices)}, got {_short(v)}")
        out[key] = v
    return out


def _dataset_check(benchmark: str, dataset: str) -> Optional[str]:
    """Why ``dataset`` is not a dataset of ``benchmark`` (the benchmark's message, listing the valid names), or
    ``None`` when it is one."""
    try:
        get_benchmark(benchmark).canonical_dataset(dataset)
    except ValueError as e:
        return str(e)
    return None


def infer_benchmark(dataset: str) -> str:
    """The benchmark a dataset name belongs to; :class:`UsageError` when unknown or ambiguous."""
    checks = {b: _dataset_check(b, dataset) for b, bench in REGISTRY.items() if not bench.any_dataset_name}
    found = [b for b, err in checks.items() if err is None]
    if len(found) == 1:
        return found[0]
    if not found:
        own = [b for b, bench in REGISTRY.items() if bench.any_dataset_name]
        raise UsageError(f"--dataset {dataset!r}: unknown dataset, neither a VTAB-1k task, a few-shot dataset nor a "
                         f"DG target:\n  " + "\n  ".join(checks.values())
                         + "".join(f"\n  (your own data: --benchmark {b})" for b in own))
    raise UsageError(f"--dataset {dataset!r} exists in several benchmarks ({', '.join(found)}): pass --benchmark")


def parse_args(argv: Optional[Sequence[str]] = None, world_size: int = 1) -> argparse.Namespace:
    """Parse and validate; the benchmark's defaults (``--benchmark`` from ``--dataset``, its seeds, shot and
    validation interval) are filled in. Raises :class:`UsageError` for a bad combination (argparse exits for bad
    syntax). No torch: the method checks read the light registry :mod:`methods`."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**_load_config(pre.config, parser))
    raw = parser.parse_args(argv)
    if not raw.dataset:
        raise UsageError(_dataset_required(raw.benchmark))
    args = argparse.Namespace(**{**vars(raw), **_benchmark_defaults(raw)})
    validate_args(args, world_size)
    return args


def _dataset_required(benchmark: Optional[str]) -> str:
    """The message for a missing --dataset: what it names with ``--benchmark`` (any name for your own data)."""
    if benchmark is not None and get_benchmark(benchmark).any_dataset_name:
        return (f"--dataset is required: with --benchmark {benchmark} any name works (it only names the run), e.g. "
                f"the name of the data folder")
    own = " or ".join(f"--benchmark {b} and any name" for b, bench in REGISTRY.items() if bench.any_dataset_name)
    if benchmark is not None:
        names = get_benchmark(benchmark).dataset_names
        return f"--dataset is required: one of --benchmark {benchmark}'s ({', '.join(names)})"
    return f"--dataset is required (a VTAB task, a few-shot dataset or a DG target; your own data: {own})"


def _benchmark_defaults(args: argparse.Namespace) -> Dict[str, Any]:
    """The values the benchmark gives to flags left out: ``benchmark``, ``seeds``, ``shot``, ``eval_interval``."""
    if args.benchmark is None:
        name = infer_benchmark(args.dataset)
    else:
        err = _dataset_check(args.benchmark, args.dataset)
        if err is not None:
            raise UsageError(f"--dataset {args.dataset!r} (--benchmark {args.benchmark}): {err}")
        name = args.benchmark
    bench = get_benchmark(name)
    out: Dict[str, Any] = {"benchmark": name}
    if args.seeds is None:
        out["seeds"] = list(bench.default_seeds)
    if bench.shot == "optional" and args.shot is None:
        out["shot"] = bench.default_shot
    if bench.selects_on_val and args.eval_interval is None:
        out["eval_interval"] = bench.default_eval_interval
    return out


def _is_delta_folder(path: str) -> bool:
    from models.delta_folder import is_delta_folder  # torch: only when a --checkpoint folder is given

    return is_delta_folder(path)


def validate_args(args: argparse.Namespace, world_size: int = 1) -> None:
    """Check a parsed namespace whose benchmark defaults are filled in (:func:`parse_args`); changes nothing."""
    for flag, value, want in (("--load_path", args.load_path, "the weights file itself (e.g. .../ViT-B_16.npz), "
                               "'timm', or empty for random initialisation (the launchers' LOAD_PATH)"),
                              ("--resume", args.resume, "the run's last.pth"),
                              ("--checkpoint", args.checkpoint, "a delta file (delta.pth / delta_seed<k>.pth) "
                               "or a delta folder (holding delta.safetensors and config.json)")):
        if value and not (flag == "--load_path" and value == "timm") and os.path.isdir(value):
            if flag == "--checkpoint" and _is_delta_folder(value):
                continue
            raise UsageError(f"{flag} {value}: is a directory, not a file; give {want}")
    if args.eval_only and not args.checkpoint:
        raise UsageError("--eval_only needs --checkpoint DELTA (a delta checkpoint written by a training run)")
    if args.checkpoint and not args.eval_only:
        raise UsageError("--checkpoint is only used with --eval_only (to continue training use --resume LAST_PTH)")
    if args.eval_only and args.initial_checkpoint:
        raise UsageError("--initial_checkpoint starts training; --eval_only evaluates --checkpoint")
    if args.eval_only and args.resume:
        raise UsageError("--eval_only and --resume exclude each other")
    if not args.eval_only and args.epochs + args.warmup_epochs < 1:
        raise UsageError("--epochs + --warmup_epochs must be at least 1")
    bench = get_benchmark(args.benchmark)
    if not bench.selects_on_val and args.eval_interval is not None:
        selecting = [b.name.replace("_", "-") for b in REGISTRY.values() if b.selects_on_val]
        raise UsageError(f"--eval_interval applies to the {' and '.join(selecting)} benchmark"
                         f"{'s' if len(selecting) > 1 else ''} only ({bench.name} "
                         f"evaluates once, after the last epoch, without model selection)")
    if bench.shot == "required" and args.shot is None and not args.eval_only:
        raise UsageError(f"--shot is required for the {bench.name.replace('_', '-')} benchmark ({bench.shot_help})")
    if bench.shot == "none" and args.shot is not None:
        raise UsageError(f"--shot does not apply to {bench.title} ({bench.shot_help})")
    if args.target_dataset and not bench.targets:
        with_targets = [b.name for b in REGISTRY.values() if b.targets]
        raise UsageError(f"--target_dataset applies to the {', '.join(with_targets)} benchmark only")
    if not (0 <= args.seed and args.seed + max(args.seeds) + world_size < 2 ** 32):  # numpy seeds (timm random_seed)
        raise UsageError(f"--seed must lie in [0, 2^32) with the data seeds and ranks added, got {args.seed}")
    if len(set(args.seeds)) != len(args.seeds):
        raise UsageError(f"--seeds has repeated values: {args.seeds}")
    if args.batch_size % world_size:
        raise UsageError(f"--batch_size {args.batch_size} (global) is not divisible by the {world_size} processes")
    if (args.mixup > 0 or args.cutmix > 0) and (args.batch_size // world_size) % 2:
        raise UsageError("mixup/cutmix need an even batch per process (--batch_size)")
    for flag in ("lr", "weight_decay", "min_lr", "warmup_lr", "beta", "drop_path", "mixup", "cutmix", "mixup_prob",
                 "smoothing", "ema_decay"):
        v = getattr(args, flag)
        if not math.isfinite(v):
            raise UsageError(f"--{flag} must be a finite number, got {v}")
    for flag in ("lr", "weight_decay", "min_lr", "warmup_lr", "mixup", "cutmix"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if not 0.0 <= args.mixup_prob <= 1.0:
        raise UsageError(f"--mixup_prob must lie in [0, 1], got {args.mixup_prob}")
    if args.beta <= 0:
        raise UsageError(f"--beta (the swish gate's slope) must be > 0, got {args.beta}")
    if not 0.0 <= args.smoothing < 1.0:
        raise UsageError(f"--smoothing must lie in [0, 1), got {args.smoothing}")
    if not 0.0 < args.ema_decay < 1.0:
        raise UsageError(f"--ema_decay must lie in (0, 1), got {args.ema_decay}")
    if args.drop_path < 0 or args.drop_path >= 1:
        raise UsageError(f"--drop_path must lie in [0, 1), got {args.drop_path}")
    validate_method_flags(args)
    validate_memory_flags(args)


def validate_method_flags(args: argparse.Namespace) -> None:
    """The flags that only some methods take, checked against the capabilities of ``--method``
    (:mod:`methods`): each rule once, no method names."""
    method = get_method(args.method)  # an unknown name: UnknownNameError listing the methods
    if args.delta_folder and not method.supports("delta_folder"):
        raise UsageError(f"--delta_folder writes DTL/DTL+ deltas (a dtl_* timm model); not --method {args.method}")
    if args.fusion_size and not method.supports("uses_dtl_flags"):
        raise UsageError(f"--fusion_size is a DTL+ setting; it does not apply to --method {args.method}")
    if args.eval_only:
        return  # evaluation runs the plain forward; --lean / --cache_prefix only change training
    used = [(f, cap) for f, on, cap in (("--lean", args.lean, "lean"),
                                        ("--cache_prefix", args.cache_prefix, "prefix_cache"))
            if on and not method.supports(cap)]
    if used:
        verb = "applies" if len(used) == 1 else "apply"
        having = [m for m in method_names() if all(get_method(m).supports(cap) for _, cap in used)]
        raise UsageError(f"{' and '.join(f for f, _ in used)} {verb} to --method {' / '.join(having) or '(none)'} "
                         f"only, not to --method {args.method}")


def validate_memory_flags(args: argparse.Namespace) -> None:
    """--lean / --cache_prefix and their companions (the checks that need no model)."""
    if args.eval_only:
        return  # evaluation runs the plain forward; the flags only change training
    if not args.cache_prefix:
        stray = [f for f, on in (("--cache_prefix_approx", args.cache_prefix_approx),
                                 ("--cache_dir", bool(args.cache_dir)),
                                 ("--cache_storage", args.cache_storage != "auto"),
                                 ("--cache_dtype", args.cache_dtype != "float16")) if on]
        if stray:
            raise UsageError(f"{', '.join(stray)} {'applies' if len(stray) == 1 else 'apply'} only with --cache_prefix")
        return
    if args.mixup > 0 or args.cutmix > 0:
        raise UsageError("--cache_prefix cannot be combined with --mixup/--cutmix: mixing images happens before the "
                         "first block, so the cached block inputs would not be those of the mixed images")
    if not get_benchmark(args.benchmark).train_transform_is_deterministic() and not args.cache_prefix_approx:
        raise UsageError(f"--cache_prefix: the {args.benchmark} training transform is random (augmentation), so a "
                         "cache of the frozen prefix would freeze it to one sample per image; train without "
                         "--cache_prefix, or accept that approximation with --cache_prefix_approx")
    if args.cache_dir and not os.path.isdir(args.cache_dir):
        raise UsageError(f"--cache_dir {args.cache_dir}: folder not found")


def method_config_of_flags(args: argparse.Namespace) -> Dict[str, Any]:
    """The method's settings as the flags give them, before the backbone's defaults: DTL's from its flags
    (:data:`DTL_FLAGS`; ``r`` is ``None`` unless given), empty for a baseline (its own defaults)."""
    if not get_method(args.method).supports("uses_dtl_flags"):
        return {}
    return {key: getattr(args, flag) for flag, key in DTL_FLAGS.items()}


def resolved_method(args: argparse.Namespace) -> str:
    """results.json's ``method`` of parsed flags (``--method dtl --fusion_size 3``: ``dtl+``), without torch."""
    return get_method(args.method).results_name(method_config_of_flags(args))
