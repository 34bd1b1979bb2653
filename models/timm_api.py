"""The timm model interface of the DTL wrappers, their registered pretrained cfgs and the timm-way weight loading.

Everything a timm user or tool expects of a model built with ``timm.create_model`` lives here, so that the
wrappers (:mod:`models.dtl_vit`, :mod:`models.dtl_swin`) only inherit it and provide a few per-backbone hooks:

- :class:`DTLTimmMixin` (a base of :class:`~models.dtl_base.DTLBase`, so of both wrappers) — ``pretrained_cfg`` / ``default_cfg`` describing *the wrapper*
  (architecture = the ``dtl_*`` name, ``first_conv`` / ``classifier`` naming keys of the wrapper, mean = std =
  0.5 as the recipe, the VTAB evaluation resize), ``head_hidden_size``, ``reset_classifier(n, global_pool)``,
  ``set_grad_checkpointing`` (refused together with lean mode, which already recomputes more),
  ``feature_info`` (``features_only=True`` through timm's ``FeatureGetterNet``), ``prune_intermediate_layers``,
  ``no_weight_decay``; :class:`ViTTimmMixin` / :class:`SwinTimmMixin` add ``forward_intermediates`` (the block /
  stage outputs *with* the side network's additions) and ``group_matcher``.
- :func:`dtl_default_cfgs` — the pretrained cfgs registered per entry point: the tag is the tag of the
  *backbone* weights (``dtl_vit_base_patch16_224.orig_in21k`` = timm's ``vit_base_patch16_224.orig_in21k``, the
  tensors of Google's ``ViT-B_16.npz``; ``dtl_swin_base_patch4_window7_224.ms_in22k``); the side network and the
  head start fresh.
- :func:`build_dtl_model` — the entry points' builder: resolves the cfg exactly as timm does
  (``pretrained_cfg=`` tag / dict, ``pretrained_cfg_overlay=``), builds through timm's ``build_model_with_cfg``
  (``features_only``, traits) and loads the backbone weights with timm's ``load_pretrained`` (hub with
  ``cache_dir``, url, local ``.pth`` / ``.safetensors`` and, with ``custom_load`` set automatically for a
  ``.npz`` file, Google's npz) behind a check that no backbone tensor is left uninitialised. A folder written by
  ``timm.models.save_for_hf`` (``create_model("local-dir:...")``) loads the whole DTL model; a delta-only
  folder (:mod:`models.hub`) loads the backbone weights the delta records (timm's published ones of the recorded
  tag; a random backbone again, from the recorded ``init_seed``; a file must be given as the overlay's ``file``)
  or the overlay's, and then the delta.
"""
from __future__ import annotations

import importlib
import logging
import math
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, is_model, load_pretrained
from timm.models._builder import resolve_pretrained_cfg
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from timm.models._pretrained import PretrainedCfg

from .backbones import published_weights_error
from .config import DTL_KEYS, pop_model_kwargs
from .families import RECIPE_MEAN, RECIPE_STD
from .delta_folder import DELTA_FILE, folder_weights, load_delta_tensors, read_folder_config, weights_file_needed
from .pretrained import CheckpointError, _head_key, check_finite, in_model_layout, load_backbone_weights, weights_fingerprint

__all__ = [
    "DTLTimmMixin", "ViTTimmMixin", "SwinTimmMixin", "dtl_default_cfgs", "build_dtl_model", "backbone_tag_of",
    "load_backbone_pretrained", "describe_weights_in_cfg", "DTL_MEAN", "DTL_STD", "DELTA_FILE",
]

_logger = logging.getLogger(__name__)

DTL_MEAN, DTL_STD = RECIPE_MEAN, RECIPE_STD  # the recipe normalises with mean = std = 0.5 (models.families)
_POOLS = ("avg", "")
_SOURCE_KEYS = ("url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source", "custom_load")
_CFG_FIELDS = set(PretrainedCfg.__dataclass_fields__)
#: The entry point of a DTL model on a backbone without a ``dtl_*`` name of its own (``backbone=<timm name>``):
#: what ``save_for_hf`` and delta folders record for it, so that ``local-dir:`` rebuilds any supported backbone.
GENERIC_ENTRY = "dtl_timm"

_RUNTIME_KWARGS = ("features_only", "out_indices", "feature_cls", "feature_cfg", "output_fmt", "device", "dtype")

# "dtl_<arch>.<tag>" -> the timm backbone "<arch>.<tag>" whose weights the DTL cfg loads
_BACKBONE_TAGS: Dict[str, str] = {}


# ----------------------------------------------------------------------------------------------- cfgs
def _wrapper_cfg(backbone_tag: str, recipe_normalization: bool = True) -> PretrainedCfg:
    """The DTL cfg over backbone weights ``backbone_tag`` (``arch.tag``): the backbone's weight source and
    input size, the wrapper's keys, the recipe's normalisation (``recipe_normalization=False``: the backbone
    weights' own mean / std) and the VTAB evaluation resize."""
    b = get_pretrained_cfg(backbone_tag)
    if b is None:
        raise KeyError(f"timm has no pretrained cfg {backbone_tag!r}")
    mean, std = (DTL_MEAN, DTL_STD) if recipe_normalization else (tuple(b.mean), tuple(b.std))
    return PretrainedCfg(
        hf_hub_id=b.hf_hub_id, hf_hub_filename=b.hf_hub_filename, url=b.url, custom_load=b.custom_load,
        input_size=b.input_size, min_input_size=b.min_input_size, fixed_input_size=b.fixed_input_size,
        interpolation="bicubic", crop_pct=1.0, crop_mode="squash", mean=mean, std=std,
        num_classes=1000, pool_size=b.pool_size, first_conv="backbone.patch_embed.proj", classifier="head",
        license=b.license, paper_ids="arXiv:2312.07856",
        paper_name="DTL: Disentangled Transfer Learning for Visual Recognition",
        notes=(f"backbone weights: timm {backbone_tag}; the side network and the head start fresh",),
    )


def dtl_default_cfgs(entries: Mapping[str, str], recipe_normalization: bool = True) -> Dict[str, Any]:
    """``{dtl entry point: backbone "arch.tag"}`` -> the module-level ``default_cfgs`` timm's ``register_model``
    reads: one cfg per entry point, tagged with the backbone's tag; normalised with the recipe's mean = std = 0.5
    (the paper's entry points) or, with ``recipe_normalization=False``, with the backbone weights' own."""
    cfgs = {}
    for name, backbone_tag in entries.items():
        tag = backbone_tag.split(".", 1)[1]
        _BACKBONE_TAGS[f"{name}.{tag}"] = backbone_tag
        cfgs[f"{name}.{tag}"] = _wrapper_cfg(backbone_tag, recipe_normalization)
    return generate_default_cfgs(cfgs)


def _timm_weights_cfg(weights: Any, backbone: str) -> Optional[PretrainedCfg]:
    """timm's cfg of the published weights a delta records (``weights.source``: ``arch`` or ``arch.tag``; none
    recorded: the default weights of ``backbone``); ``None`` if timm has none."""
    return get_pretrained_cfg(getattr(weights, "source", None) or backbone)


def describe_weights_in_cfg(cfg: Dict[str, Any], weights: Any, backbone: str) -> None:
    """Make a delta folder's ``pretrained_cfg`` (``cfg``, in place) describe the backbone weights the delta was
    trained on (``weights``: a :class:`~models.spec.WeightsSpec`): timm's published ones (their tag and source), a
    file (no download source: it must be given), or a random initialisation (no source)."""
    for key in _SOURCE_KEYS:
        cfg.pop(key, None)
    kind = getattr(weights, "kind", None)
    b = _timm_weights_cfg(weights, backbone) if kind == "timm" else None
    if b is not None:
        cfg.update({k: v for k, v in (("hf_hub_id", b.hf_hub_id), ("hf_hub_filename", b.hf_hub_filename),
                                      ("url", b.url)) if v})
        cfg["tag"] = b.tag
        what = f"timm {b.architecture}.{b.tag}"
    elif kind == "file":
        cfg["tag"] = None
        what = (f"the file {weights.source} ({weights.fingerprint or 'no fingerprint'}); give it with "
                f"pretrained_cfg_overlay=dict(file=...)")
    else:
        cfg["tag"] = None
        what = "a random initialisation (no pretrained weights)"
    cfg["notes"] = [f"backbone weights: {what}; the side network and the head come from this delta"]


def backbone_tag_of(architecture: str, tag: Optional[str]) -> Optional[str]:
    """The timm backbone ``arch.tag`` behind DTL cfg ``architecture.tag`` (``None`` if not registered)."""
    return _BACKBONE_TAGS.get(f"{architecture}.{tag}") if tag else None


def _input_size(backbone: nn.Module, in_chans: int) -> Tuple[int, int, int]:
    size = getattr(backbone.patch_embed, "img_size", None) or (224, 224)
    return (int(in_chans), int(size[0]), int(size[1]))


def cfg_for_backbone(backbone: nn.Module) -> Dict[str, Any]:
    """The wrapper cfg of a model built directly (not through an entry point): the registered DTL cfg of the
    backbone's architecture (the tag of the backbone's own cfg when registered, else the default), or one made
    from the backbone's cfg for an architecture without a ``dtl_*`` entry point."""
    bcfg = dict(getattr(backbone, "pretrained_cfg", None) or {})
    arch, tag = bcfg.get("architecture"), bcfg.get("tag")
    name = f"dtl_{arch}" if arch else GENERIC_ENTRY
    cfg = None
    if arch and is_model(name):
        cfg = get_pretrained_cfg(f"{name}.{tag}") if backbone_tag_of(name, tag) else None
        cfg = cfg or get_pretrained_cfg(name)
    if cfg is not None:
        return cfg.to_dict()
    out = PretrainedCfg(
        architecture=name if is_model(name) else GENERIC_ENTRY, tag=tag, input_size=tuple(bcfg.get("input_size", (3, 224, 224))),
        fixed_input_size=bool(bcfg.get("fixed_input_size", True)), interpolation="bicubic", crop_pct=1.0,
        crop_mode="squash", mean=DTL_MEAN, std=DTL_STD, num_classes=1000, pool_size=bcfg.get("pool_size"),
        first_conv="backbone.patch_embed.proj", classifier="head",
    ).to_dict()
    return out


# ----------------------------------------------------------------------------------------------- the mixins
def set_normalization(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
    """Record the input normalisation ``model`` is trained and evaluated with in its ``pretrained_cfg`` (what
    ``timm.data.resolve_data_config`` reads), for models that describe themselves to timm (the DTL wrappers)."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict):
        cfg.update(mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))


class DTLTimmMixin:
    """timm's model interface over a DTL wrapper (``self.backbone``, ``self.side``, ``self.head``).

    :class:`~models.dtl_base.DTLBase` calls :meth:`_init_timm_api` at the end of ``__init__``; the wrappers run
    every backbone block through :meth:`run_block` (gradient checkpointing) and pool in ``forward_head``
    according to ``self.global_pool``.
    """

    default_out_indices: Union[int, Tuple[int, ...]] = 3
    output_fmt_default: Optional[str] = None
    global_pool: str = "avg"
    grad_checkpointing: bool = False

    def _init_timm_api(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.global_pool = "avg"
        self.grad_checkpointing = False
        self.head_hidden_size = self.num_features
        self.feature_info = [dict(info, module="backbone." + info["module"])
                             for info in getattr(self.backbone, "feature_info", [])]
        self.pretrained_cfg = cfg_for_backbone(self.backbone)
        self.pretrained_cfg.update(mean=tuple(mean), std=tuple(std))
        self._describe_self()

    # pretrained_cfg / default_cfg (timm keeps both names for the same dict)
    @property
    def default_cfg(self) -> Dict[str, Any]:
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: Dict[str, Any]) -> None:
        self.pretrained_cfg = cfg

    def _describe_self(self) -> None:
        """Make the cfg describe this model: its input size, class count and (Swin) unpooled grid."""
        cfg = self.pretrained_cfg
        in_chans = int(self.backbone.patch_embed.proj.weight.shape[1])
        cfg["input_size"] = _input_size(self.backbone, in_chans)
        cfg["num_classes"] = self.num_classes
        if cfg.get("pool_size") is not None:
            reduction = self.feature_info[-1]["reduction"] if self.feature_info else 32
            cfg["pool_size"] = tuple(int(s) // int(reduction) for s in cfg["input_size"][1:])

    # lean mode and gradient checkpointing both recompute in backward: one at a time
    @property
    def lean(self) -> bool:
        return bool(self.__dict__.get("_lean_mode", False))

    @lean.setter
    def lean(self, value: bool) -> None:
        if value and self.grad_checkpointing:
            raise ValueError("lean mode and gradient checkpointing both recompute blocks in backward; lean mode "
                             "already keeps less: call set_grad_checkpointing(False) before switching lean mode on")
        self.__dict__["_lean_mode"] = bool(value)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every backbone block (recomputed in backward; outputs and gradients unchanged).

        Refused in lean mode, which already recomputes the blocks and keeps less."""
        if enable and self.lean:
            raise ValueError("gradient checkpointing is not combined with lean mode: lean mode already recomputes "
                             "every block in backward and keeps less (use one of the two; set_lean(False) first)")
        self.grad_checkpointing = bool(enable)

    def run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One backbone block, checkpointed when gradient checkpointing is on and autograd records."""
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(block, x)
        return block(x)

    # classifier
    def set_global_pool(self, global_pool: str) -> None:
        """``'avg'`` (the DTL head's mean over tokens) or ``''`` (no pooling)."""
        if global_pool not in _POOLS:
            raise ValueError(f"global_pool must be one of {_POOLS} for a DTL model, got {global_pool!r}")
        self.global_pool = global_pool

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A fresh head for ``num_classes`` (0: none); ``global_pool`` ``'avg'`` (DTL's mean over tokens) or
        ``''`` (no pooling: ``forward`` returns the unpooled features when ``num_classes`` is 0)."""
        if global_pool is not None:
            self.set_global_pool(global_pool)
        super().reset_classifier(num_classes)  # type: ignore[misc]  # ClassifierMixin
        self.pretrained_cfg["num_classes"] = self.num_classes

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """The backbone's no-decay names (frozen here); timm's optimizer factory also skips every 1-D tensor,
        so only the head bias is exempt among the trainable ones, as in the recipe."""
        fn = getattr(self.backbone, "no_weight_decay", None)
        return {"backbone." + n for n in fn()} if callable(fn) else set()

    # features
    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """For ``features_only``: drop the head (the blocks stay: the side network spans them, and
        ``forward_intermediates(intermediates_only=True)`` stops after the last block asked for)."""
        take_indices, _ = feature_take_indices(len(self.feature_info), indices)
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    # timm's reconstruction arguments (save_for_hf's config.json "model_args"): the backbone arguments the model
    # was made with, plus the resolved DTL settings as plain values (never a DTLConfig object)
    @property
    def _model_args(self) -> Dict[str, Any]:
        raw = self.__dict__.get("_raw_model_args", {})
        args = {k: v for k, v in raw.items() if k not in ("dtl", "lean") + DTL_KEYS}
        args.update({k: getattr(self.dtl_cfg, k) for k in DTL_KEYS})
        args["num_classes"] = self.num_classes
        if self.pretrained_cfg.get("architecture") == GENERIC_ENTRY:  # which backbone dtl_timm is to build
            args["backbone"] = (getattr(self.backbone, "pretrained_cfg", None) or {}).get("architecture")
        return args

    @_model_args.setter
    def _model_args(self, value: Mapping[str, Any]) -> None:
        self.__dict__["_raw_model_args"] = dict(value)

    def backbone_kwargs(self) -> Dict[str, Any]:
        """The timm keyword arguments the backbone was built with (``img_size``, ``drop_path_rate``, ``depth``,
        ...; not the DTL settings, the class count or the pooling): what a delta records to rebuild it."""
        raw = self.__dict__.get("_raw_model_args", {})
        return {k: v for k, v in raw.items()
                if k not in ("dtl", "lean", "num_classes", "global_pool", "backbone") + DTL_KEYS}

    # loading pretrained weights the timm way (custom_load: a Google .npz given as the cfg's file)
    def load_pretrained(self, checkpoint_path: str, prefix: str = "") -> None:
        load_backbone_weights(self, checkpoint_path)


class ViTTimmMixin:
    """The ViT part of the timm interface (mixed into :class:`~models.dtl_vit.DTLVisionTransformer` before
    :class:`~models.dtl_base.DTLBase`, which carries :class:`DTLTimmMixin`): ``forward_intermediates`` over the
    blocks, through the wrapper's ``run_blocks``; ``group_matcher``."""

    default_out_indices = 3

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Block outputs *after* the side network's additions (as timm's ``VisionTransformer``).

        Returns ``(forward_features output, intermediates)`` or, with ``intermediates_only``, the intermediates;
        ``output_fmt`` ``'NCHW'`` (patch tokens on the grid) or ``'NLC'``; ``norm`` applies the final norm to
        each. Runs the default (not lean) path, which computes the same values."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        npt = self.num_prefix_tokens
        depth = len(self.backbone.blocks)
        take_indices, max_index = feature_take_indices(depth, indices)
        batch = x.shape[0]
        grid = self.patch_grid(x)
        x = self.embed(x)
        last = max_index if (stop_early or intermediates_only) else depth - 1
        s = None
        kept = []
        for i in range(last + 1):  # the wrapper's own block loop (run_blocks), one block at a time
            x, s = self.run_blocks(x, i, i + 1, s, grid)
            if i in take_indices:
                kept.append(self.final_norm()(x) if norm else x)
        prefix_tokens = [y[:, :npt] for y in kept]
        out = [y[:, npt:] for y in kept]
        if output_fmt == "NCHW":
            out = [y.reshape(batch, grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous() for y in out]
        if return_prefix_tokens and npt:
            out = list(zip(out, prefix_tokens))
        if intermediates_only:
            return out
        return x, out

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups (layer-wise decay): the tap of block ``i`` goes with block ``i``."""
        return dict(
            stem=r"^backbone\.(?:cls_token|reg_token|pos_embed|patch_embed)",
            blocks=[(r"^backbone\.blocks\.(\d+)", None), (r"^side\.taps\.(\d+)\.", None),
                    (r"^side\.", (99998,)), (r"^backbone\.norm", (99999,))],
        )


class SwinTimmMixin:
    """The Swin part of the timm interface (mixed into :class:`~models.dtl_swin.DTLSwinTransformer` before
    :class:`~models.dtl_base.DTLBase`): NHWC features, ``forward_intermediates`` over the stages (through the
    wrapper's ``forward_stage``), ``group_matcher``."""

    default_out_indices = (0, 1, 2, 3)
    output_fmt = "NHWC"

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs *after* the side networks' additions (as timm's ``SwinTransformer``: ``norm`` applies the
        final norm to the last stage only). Returns ``(forward_features output, intermediates)`` or the
        intermediates alone; ``output_fmt`` ``'NCHW'`` or ``'NHWC'``."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        n = len(self.depths)
        take_indices, max_index = feature_take_indices(n, indices)
        x = self.embed(x)
        last = max_index if (stop_early or intermediates_only) else n - 1
        out = []
        for j in range(last + 1):
            x = self.forward_stage(x, j)
            if j in take_indices:
                y = self.backbone.norm(x) if norm and j == n - 1 else x
                out.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y)
        if intermediates_only:
            return out
        return x, out  # as forward_features: before the final norm (forward_head applies it)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups (layer-wise decay): a stage's side network goes with its stage."""
        if coarse:
            blocks = [(r"^backbone\.layers\.(\d+)", None), (r"^side\.(\d+)\.", None), (r"^backbone\.norm", (99999,))]
        else:
            blocks = [(r"^backbone\.layers\.(\d+)\.downsample", (0,)), (r"^backbone\.layers\.(\d+)\.\w+\.(\d+)", None),
                      (r"^side\.(\d+)\.", None), (r"^backbone\.norm", (99999,))]
        return dict(stem=r"^backbone\.(?:patch_embed|absolute_pos_embed)", blocks=blocks)


# ----------------------------------------------------------------------------------------------- loading
def _describe_source(cfg: Mapping[str, Any]) -> str:
    for key in ("file", "hf_hub_id", "url"):
        if cfg.get(key):
            return f"{key}={cfg[key]}"
    return "state_dict" if cfg.get("state_dict") is not None else "(no source)"


def _backbone_filter(backbone: nn.Module, source: str) -> Callable:
    """The backbone family's timm ``checkpoint_filter_fn``, without any classifier; a whole DTL model given as
    backbone weights is refused (it belongs in ``create_model("local-dir:...")`` or ``load_state_dict``)."""
    family_filter = getattr(importlib.import_module(type(backbone).__module__), "checkpoint_filter_fn", None)

    def fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
        for key in ("model", "state_dict", "model_ema"):
            if key in state_dict and isinstance(state_dict[key], Mapping):
                state_dict = state_dict[key]
                break
        state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
        if any(k.startswith(("side.", "backbone.")) for k in state_dict):
            raise CheckpointError(f"{source} holds a whole DTL model (backbone.*/side.* keys), not backbone weights: "
                                  "load its folder with timm.create_model('local-dir:<folder>', pretrained=True)")
        check_finite(state_dict, source)
        if family_filter is not None and not in_model_layout(state_dict, model):
            state_dict = family_filter(state_dict, model)
        own = model.state_dict()
        return {k: v for k, v in state_dict.items() if not (_head_key(k) and k not in own)}

    return fn


def load_backbone_pretrained(
    model: nn.Module, cfg: Mapping[str, Any], backbone_tag: Optional[str], in_chans: int = 3,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
) -> int:
    """Load backbone weights from the weight source of DTL cfg ``cfg`` with timm's ``load_pretrained``.

    The backbone's own timm cfg (``backbone_tag``; its input channels, classifier and class count) gets the
    source keys of ``cfg`` (``file``, ``state_dict``, ``url``, ``hf_hub_id``, ``custom_load``...), so a local file,
    the hub with ``cache_dir`` and urls behave as for a plain timm backbone. Every backbone parameter is set to NaN
    first: one still NaN afterwards was not in the weights, a :class:`CheckpointError` naming the source.
    """
    backbone = model.backbone
    bcfg = get_pretrained_cfg(backbone_tag) if backbone_tag else None
    bcfg = bcfg.to_dict() if bcfg is not None else dict(getattr(backbone, "pretrained_cfg", {}) or {})
    bcfg.update({k: cfg.get(k) for k in _SOURCE_KEYS})
    source = _describe_source(bcfg)
    params = dict(backbone.named_parameters())
    with torch.no_grad():
        for p in params.values():
            p.fill_(math.nan)
    try:
        load_pretrained(backbone, pretrained_cfg=bcfg, num_classes=0, in_chans=in_chans,
                        filter_fn=_backbone_filter(backbone, source), strict=False, cache_dir=cache_dir)
    except CheckpointError:
        raise
    except AttributeError as e:
        if bcfg.get("custom_load"):
            raise CheckpointError(f"{source}: a custom-format (.npz) file is for ViT backbones, not "
                                  f"{type(backbone).__name__}") from e
        raise
    except OSError as e:
        if not bcfg.get("file") and bcfg.get("source") != "local-dir":  # the hub or a url: not downloadable now
            raise published_weights_error(backbone_tag or str(bcfg.get("architecture") or source), e) from e
        raise CheckpointError(f"cannot load backbone weights from {source}: {type(e).__name__}: {e}") from e
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"cannot load backbone weights from {source}: {type(e).__name__}: {e}") from e
    missing = [n for n, p in params.items() if torch.isnan(p).any()]
    if missing:
        shown = ", ".join(missing[:12]) + (f", ... ({len(missing)} in all)" if len(missing) > 12 else "")
        raise CheckpointError(f"{source} leaves backbone tensors uninitialised: {shown}")
    # what was loaded, as models.pretrained records a --load_path file (a delta stores it; models.delta checks it)
    file = bcfg.get("file")
    backbone.weights_record = {"file": os.path.basename(str(file)) if file else f"timm:{backbone_tag or source}",
                               "fingerprint": weights_fingerprint(params)}
    return len(params)


# ----------------------------------------------------------------------------------------------- building
def _split_cfg_dict(cfg: Any) -> Any:
    """A cfg dict (e.g. read from a config.json) with only timm's PretrainedCfg fields."""
    if isinstance(cfg, Mapping):
        return {k: v for k, v in cfg.items() if k in _CFG_FIELDS}
    return cfg


def create_dtl_variant(variant: str, arch: str, pretrained: bool, wrapper: type,
                       create_backbone: Callable[..., nn.Module], **kwargs: Any) -> nn.Module:
    """The body of every ``dtl_*`` entry point: ``wrapper`` (a DTL wrapper class) over ``create_backbone(arch,
    ...)``, built the timm way by :func:`build_dtl_model`."""
    def make(**kw: Any) -> nn.Module:
        num_classes, dtl, lean = pop_model_kwargs(kw)
        global_pool = kw.pop("global_pool", "avg")
        model = wrapper(create_backbone(arch, **kw), num_classes, dtl, lean=lean)
        model.set_global_pool(global_pool)
        return model

    return build_dtl_model(variant, make, pretrained, default_out_indices=wrapper.default_out_indices, **kwargs)


def _recorded_backbone(folder: str, cfg_arg: Any, overlay: Dict[str, Any]) -> Tuple[Any, Optional[str], bool, Any]:
    """``local-dir:<delta folder>`` without a backbone source of the caller's: the weights the folder records.
    Returns (the cfg tag to resolve, the backbone ``arch.tag``, whether to load backbone weights, the RNG seed of a
    random backbone); ``overlay`` gets the source of timm's recorded weights. A delta trained on a file needs it:
    :class:`CheckpointError` saying so (as :func:`models.delta.build_from_delta`)."""
    block = read_folder_config(folder)["dtl"]
    weights = folder_weights(block)
    if weights is None:  # a folder written before the weights were recorded: its cfg's tag, as before
        return cfg_arg, None, True, None
    if weights.kind == "file":
        raise weights_file_needed(folder, weights)
    if weights.kind == "random":
        return None, None, False, block.get("init_seed")
    spec = block.get("model_spec") if isinstance(block.get("model_spec"), Mapping) else {}
    b = _timm_weights_cfg(weights, str(spec.get("backbone") or block.get("model_name") or ""))
    if b is None:
        raise CheckpointError(f"{folder} was trained on timm's weights {weights.source}, which this timm does not "
                              f"know; give the backbone weights file with pretrained_cfg_overlay=dict(file=...)")
    overlay.update({k: getattr(b, k, None) for k in _SOURCE_KEYS})
    return None, f"{b.architecture}.{b.tag}", True, None


def build_dtl_model(
    variant: str,
    make_model: Callable[..., nn.Module],
    pretrained: bool = False,
    default_out_indices: Union[int, Tuple[int, ...]] = 3,
    **kwargs: Any,
) -> nn.Module:
    """Build entry point ``variant`` the timm way.

    ``make_model(**model_kwargs)`` builds the wrapper with a randomly initialised backbone. ``pretrained_cfg``
    (a tag, dict or ``PretrainedCfg``), ``pretrained_cfg_overlay`` and ``cache_dir`` act as for timm's models;
    with ``pretrained=True`` the weights come from the resolved cfg's source:

    - a ``local-dir`` folder with :data:`DELTA_FILE` (a delta-only folder, :mod:`models.hub`): the backbone from
      ``pretrained_cfg_overlay`` (e.g. ``file=ViT-B_16.npz``) or else the weights the delta records
      (:func:`_recorded_backbone`), then the delta;
    - any other ``local-dir`` folder (``save_for_hf``): the whole model, with timm's ``load_pretrained``;
    - otherwise the backbone only (:func:`load_backbone_pretrained`); a ``.npz`` file gets ``custom_load``.
    """
    cfg_arg = kwargs.pop("pretrained_cfg", None)
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    cache_dir = kwargs.pop("cache_dir", None)
    pretrained_model_args = kwargs.pop("pretrained_model_args", None)
    feature_cfg = dict(kwargs.pop("feature_cfg", None) or {})

    delta_dir, backbone_tag, load_backbone, init_seed = None, None, True, None
    if isinstance(cfg_arg, Mapping) and cfg_arg.get("source") == "local-dir" and cfg_arg.get("file"):
        folder = str(cfg_arg["file"])
        if os.path.isfile(os.path.join(folder, DELTA_FILE)):
            delta_dir = folder
    if delta_dir is not None:
        # the weights of a delta folder: the ones it records (or the overlay's source), then the delta
        cfg_arg = cfg_arg.get("tag") or None
        if pretrained and not any(overlay.get(k) is not None for k in _SOURCE_KEYS):
            cfg_arg, backbone_tag, load_backbone, init_seed = _recorded_backbone(delta_dir, cfg_arg, overlay)
    cfg_arg = _split_cfg_dict(cfg_arg)
    file = overlay.get("file")
    if file and "custom_load" not in overlay:
        # the file's own format decides, not the registered source's: Google's npz layout goes through the ViT's
        # own loader, a .pth / .safetensors through the state-dict path (some timm versions register the tiny and
        # small ViTs with custom_load=True for their hub npz, which would send a local .pth to the npz reader)
        overlay["custom_load"] = str(file).endswith(".npz")

    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=cfg_arg, pretrained_cfg_overlay=overlay).to_dict()
    backbone_tag = backbone_tag or backbone_tag_of(variant, cfg.get("tag"))

    def construct(**model_kwargs: Any) -> nn.Module:
        if init_seed is not None:  # a delta trained on a random backbone: that backbone again (as load_delta)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(init_seed))
                model = make_model(**model_kwargs)
        else:
            model = make_model(**model_kwargs)
        if pretrained:
            in_chans = int(model_kwargs.get("in_chans", 3))
            if not load_backbone:
                _logger.info("%s: the delta of %s was trained on a randomly initialised backbone: no backbone "
                             "weights loaded", variant, delta_dir)
            elif cfg.get("source") == "local-dir" and delta_dir is None:
                load_pretrained(model, pretrained_cfg=cfg, num_classes=model.num_classes, in_chans=in_chans,
                                strict=True, cache_dir=cache_dir)
            else:
                n = load_backbone_pretrained(model, cfg, backbone_tag, in_chans=in_chans, cache_dir=cache_dir)
                _logger.info("%s: %d backbone tensors from %s", variant, n, _describe_source(cfg))
            if delta_dir is not None:
                load_delta_tensors(model, delta_dir)
        return model

    feature_cfg.setdefault("feature_cls", "getter")
    feature_cfg.setdefault("out_indices", default_out_indices)
    model = build_model_with_cfg(construct, variant, pretrained=False, pretrained_cfg=cfg, feature_cfg=feature_cfg,
                                 pretrained_model_args=pretrained_model_args, **kwargs)
    if isinstance(model, DTLTimmMixin):
        model._describe_self()
        # the construction arguments, for save_for_hf / delta folders (timm >= 1.0.31 records them too, after this)
        model._model_args = {**model.__dict__.get("_raw_model_args", {}),
                             **{k: v for k, v in kwargs.items() if k not in _RUNTIME_KWARGS}}
    return model
