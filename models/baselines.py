"""The baseline tuning methods DTL is compared with, on the same unmodified timm backbone.

Every model here owns a timm backbone as ``.backbone`` (built like DTL's: no classifier, timm's parameter
names untouched, pre-trained weights loaded into the *bare* backbone before anything is injected) and a fresh
``.head``; it declares what trains through ``trainable_prefixes`` or ``is_trainable(name)`` (the project's one
trainable rule, :mod:`models.trainable`), so the delta checkpoint, parameter counts and reports work as for DTL.

Wrap, don't fork: the small trainable modules of a method live in the tuned model (outside ``.backbone``, so
``backbone.state_dict()`` stays a plain timm state dict) and enter the backbone's computation through forward
hooks on the backbone's own modules (LoRA on ``attn.qkv``, adapters on ``mlp``/``attn``, SSF on every
linear/norm/conv).  Hooks are bound methods of the injected modules, so ``copy.deepcopy`` (EMA) and pickling
keep every copy wired to its own modules.  VPT-deep runs its own loop over the blocks (as the DTL wrapper does).

Head (ViT): the standard timm ViT head of the baselines' original code (VPT, NOAH, SSF repositories): class
token -> the backbone's final LayerNorm -> a fresh ``Linear`` (trunc-normal std .02, bias 0: timm 0.5.4's ViT
built with its default ``weight_init=''`` applies the generic Linear init to the head too).  (DTL's own head pools
the patch tokens instead; see :mod:`models.dtl_vit`.)  Swin: final LayerNorm -> mean over tokens -> ``Linear``
(trunc-normal std .02, bias 0, as timm 0.5.4's Swin).

Supported: every method on ViT; ``full``, ``linear``, ``bitfit``, ``lora``, ``adapter``, ``adaptformer`` and
``ssf`` on Swin (the injection points exist there too); ``vpt`` on ViT only (VPT for Swin needs window-aware
prompts, a different method).  LST (ladder side tuning) is not implemented: a faithful version needs its
structurally-pruned side transformer initialised from the backbone, which is outside this project's scope.
"""
from __future__ import annotations

import inspect
import math
from functools import reduce
from operator import mul
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from .backbones import backbone_arch, create_backbone
from .config import ModelSettingsError
from .families import family_of_model, list_families
from .head import ClassifierMixin
from .pretrained import load_backbone_weights
from .trainable import HEAD_PREFIX, apply_trainable_rule

__all__ = [
    "BASELINE_METHODS", "baseline_methods_for", "BaselineModel", "FullFineTune", "LinearProbe", "BitFit", "LoRA", "Adapter",
    "AdaptFormer", "VPTDeep", "SSF", "LoRAQKV", "BottleneckAdapter", "ScaleShift", "create_baseline_model",
    "baseline_settings", "baseline_class", "build_baseline",
]

_CONFIG_KEYS = ("arch", "method", "num_classes")


def _module_key(path: str) -> str:
    """A backbone module path as a ``ModuleDict`` key (``blocks.3.attn`` -> ``blocks_3_attn``)."""
    return path.replace(".", "_")


# --------------------------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------------------------
#: method name -> its model class; filled by ``BaselineModel.__init_subclass__``.
_CLASSES: Dict[str, Type["BaselineModel"]] = {}


class BaselineModel(ClassifierMixin, nn.Module):
    """A timm ViT/Swin backbone with a fresh classifier head; subclasses add a tuning method.

    Args:
        backbone: a timm backbone of a registered family (:mod:`models.families`) without classifier
            (:func:`models.backbones.create_backbone`), pre-trained weights already loaded.
        num_classes: classes of the new head.
    """

    method: str = ""
    trainable_prefixes: Tuple[str, ...] = (HEAD_PREFIX,)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass with a ``method`` name is the model of that ``--method`` (its line in methods/builtin.py)."""
        super().__init_subclass__(**kwargs)
        if cls.method:
            if cls.method in _CLASSES:
                raise ValueError(f"two baseline classes for method {cls.method!r}: "
                                 f"{_CLASSES[cls.method].__name__} and {cls.__name__}")
            _CLASSES[cls.method] = cls

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()

        try:
            self.arch = family_of_model(backbone).name
        except ModelSettingsError as e:
            raise TypeError(f"baselines wrap a timm backbone of a registered family: {e}") from None
        if getattr(backbone, "attn_pool", None) is not None or getattr(backbone, "num_classes", 0):
            raise ValueError("baseline backbones have no classifier or attention pool (build them with "
                             "models.backbones.create_backbone)")
        if self.arch not in self.supported_archs():
            raise ModelSettingsError(f"method {self.method!r} is not implemented for {self.arch} backbones "
                                     f"(supported: {', '.join(self.supported_archs())})")
        self.backbone = backbone
        self.num_classes = num_classes
        self.num_features = backbone.num_features
        self.pretrained_cfg = dict(getattr(backbone, "pretrained_cfg", {}) or {})
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.reset_head()

    @classmethod
    def supported_archs(cls) -> Tuple[str, ...]:
        """The backbone families implementing this method (:attr:`~models.families.BackboneFamily.baselines`)."""
        return tuple(f.name for f in list_families() if cls.method in f.baselines)

    def _finish_init(self) -> None:
        """Subclasses call this last: freeze/unfreeze by the rule."""
        apply_trainable_rule(self)

    # ---- head ------------------------------------------------------------------------------------------------
    def reset_head(self) -> None:
        """Trunc-normal std .02 and zero bias, as timm 0.5.4 (the original's) initialised a fresh ViT or Swin
        classifier (its ViT applies the generic Linear init to the head as well, see ``DTLVisionTransformer``)."""
        if not isinstance(self.head, nn.Linear):
            return
        trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    # ---- forward ---------------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.backbone.forward_head(x, pre_logits=True)  # ViT: class token (after the final norm); Swin: mean
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # ---- configuration ---------------------------------------------------------------------------------------
    def settings(self) -> Dict[str, Any]:
        """The method's settings (what ``create_baseline_model(..., settings=...)`` takes)."""
        return {}

    def model_config(self) -> Dict[str, Any]:
        """What is needed to rebuild this model (stored in delta checkpoints)."""
        return {"arch": self.arch, "method": self.method, "num_classes": self.num_classes, **self.settings()}


# --------------------------------------------------------------------------------------------------------------
# Full fine-tuning, linear probing, BitFit
# --------------------------------------------------------------------------------------------------------------
class FullFineTune(BaselineModel):
    """Full fine-tuning: every backbone parameter and the head train.

    Configuration (VPT paper, Jia et al. ECCV 2022, "Full" baseline of the VTAB-1k tables): all parameters,
    class-token head.  Nothing is injected.
    """

    method = "full"
    trainable_prefixes = ("backbone.", HEAD_PREFIX)

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__(backbone, num_classes)
        self._finish_init()


class LinearProbe(BaselineModel):
    """Linear probing: only the new head trains on the frozen backbone's features.

    Configuration (VPT paper's "Linear" baseline): class token -> final norm -> Linear; the backbone is frozen.
    """

    method = "linear"
    trainable_prefixes = (HEAD_PREFIX,)

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__(backbone, num_classes)
        self._finish_init()


class BitFit(BaselineModel):
    """BitFit: every bias term of the backbone trains, plus the head.

    Configuration (BitFit, Ben Zaken et al. ACL 2022; the VPT repository's ``bias`` transfer type used for the
    VTAB-1k "Bias" baseline): all backbone parameters whose name ends in ``.bias`` -- the biases of the patch
    embedding, of qkv/proj/fc1/fc2 and of every LayerNorm, the final norm included.  Swin's
    ``relative_position_bias_table`` is a learned position table, not a bias term, and stays frozen.
    """

    method = "bitfit"

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__(backbone, num_classes)
        self._finish_init()

    def is_trainable(self, name: str) -> bool:
        return name.startswith(HEAD_PREFIX) or (name.startswith("backbone.") and name.endswith(".bias"))


# --------------------------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------------------------
class LoRAQKV(nn.Module):
    """A low-rank update ``(alpha / r) * B A x`` of selected thirds (q, k, v) of a fused qkv projection.

    ``A`` (r x in) is Kaiming-uniform (a = sqrt(5), ``nn.Linear``'s default, as in the LoRA reference code),
    ``B`` (out x r) is zero, so the update is exactly zero at initialisation.  Registered as a forward hook on the
    qkv ``Linear``: ``qkv(x) + [dq | dk | dv]``.
    """

    def __init__(self, in_dim: int, attn_dim: int, rank: int, alpha: float, targets: str = "qv",
                 dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise ModelSettingsError(f"LoRA rank must be >= 1, got {rank}")
        bad = set(targets) - set("qkv")
        if bad or not targets or len(set(targets)) != len(targets):
            raise ModelSettingsError(f"LoRA targets must be a non-empty subset of 'qkv' without repeats, got {targets!r}")
        self.attn_dim = attn_dim
        self.rank = rank
        self.scaling = alpha / rank
        self.targets = "".join(t for t in "qkv" if t in targets)
        self.lora_A = nn.ParameterDict({t: nn.Parameter(torch.empty(rank, in_dim)) for t in self.targets})
        self.lora_B = nn.ParameterDict({t: nn.Parameter(torch.zeros(attn_dim, rank)) for t in self.targets})
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for t in self.targets:
            nn.init.kaiming_uniform_(self.lora_A[t], a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[t])

    def delta(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = self.dropout(x)
        return {t: F.linear(F.linear(x, self.lora_A[t]), self.lora_B[t]) * self.scaling for t in self.targets}

    def hook(self, module: nn.Module, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        d = self.delta(inputs[0])
        parts = list(output.split(self.attn_dim, dim=-1))
        for i, t in enumerate("qkv"):
            if t in d:
                parts[i] = parts[i] + d[t].to(parts[i].dtype)
        return torch.cat(parts, dim=-1)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, targets={self.targets!r}"


def _attention_modules(backbone: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(path, module) of every attention module with a fused ``qkv`` Linear (ViT ``Attention``, Swin ``WindowAttention``)."""
    out = [(n, m) for n, m in backbone.named_modules() if isinstance(getattr(m, "qkv", None), nn.Linear)]
    if not out:
        raise ValueError(f"{type(backbone).__name__} has no attention module with a fused qkv Linear")
    return out


def _block_modules(backbone: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(path, block) of every transformer block: modules with ``attn``, ``norm2`` and ``mlp`` children."""
    out = [(n, m) for n, m in backbone.named_modules()
           if all(isinstance(getattr(m, a, None), nn.Module) for a in ("attn", "norm2", "mlp"))]
    if not out:
        raise ValueError(f"{type(backbone).__name__} has no transformer blocks with attn/norm2/mlp")
    return out


class LoRA(BaselineModel):
    """LoRA on the attention's query and value projections.

    Configuration (LoRA, Hu et al. ICLR 2022: ``W_q`` and ``W_v``; the VTAB-1k "LoRA" baseline of NOAH, Zhang
    et al. 2022, rank 8, 0.29 M parameters for ViT-B/16 = 12 blocks x 2 x (768 x 8 + 8 x 768)): rank ``r = 8``,
    ``alpha = 8`` (scaling ``alpha / r = 1``), no LoRA dropout, on every block's fused ``qkv`` (q and v thirds;
    ``targets='qkv'`` adapts all three).  ``A`` Kaiming-uniform, ``B`` zero: the model starts as the backbone.

    Args:
        r: rank. alpha: scaling numerator. targets: which of q, k, v. dropout: dropout on the LoRA input.
    """

    method = "lora"
    trainable_prefixes = ("lora.", HEAD_PREFIX)

    def __init__(self, backbone: nn.Module, num_classes: int, r: int = 8, alpha: float = 8.0,
                 targets: str = "qv", dropout: float = 0.0) -> None:
        super().__init__(backbone, num_classes)
        self.lora = nn.ModuleDict()
        for path, attn in _attention_modules(backbone):
            qkv: nn.Linear = attn.qkv
            if qkv.out_features % 3:
                raise ValueError(f"{path}.qkv has {qkv.out_features} outputs, not 3 equal parts")
            mod = LoRAQKV(qkv.in_features, qkv.out_features // 3, r, alpha, targets, dropout)
            self.lora[_module_key(path)] = mod
            qkv.register_forward_hook(mod.hook)
        self._settings = {"r": r, "alpha": float(alpha), "targets": self.lora[next(iter(self.lora))].targets,
                          "dropout": float(dropout)}
        self._finish_init()

    def settings(self) -> Dict[str, Any]:
        return dict(self._settings)


# --------------------------------------------------------------------------------------------------------------
# Bottleneck adapters: Adapter (sequential, Houlsby) and AdaptFormer (parallel)
# --------------------------------------------------------------------------------------------------------------
_ACTS: Dict[str, Callable[[], nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


class BottleneckAdapter(nn.Module):
    """``scale * up(dropout(act(down(x))))`` with ``down: d -> bottleneck``, ``up: bottleneck -> d``.

    ``init='zero_up'`` (default): ``down`` Kaiming-uniform (``nn.Linear``'s default; AdaptFormer's ``lora``
    init), ``up`` and both biases zero, so the adapter outputs exactly zero at initialisation.
    ``init='houlsby'``: every weight from a normal with std 1e-2 truncated at 2 std, biases zero (Houlsby et
    al.'s near-identity initialisation).
    """

    def __init__(self, dim: int, bottleneck: int, act: str = "gelu", dropout: float = 0.0, scale: float = 1.0,
                 init: str = "zero_up") -> None:
        super().__init__()
        if bottleneck < 1:
            raise ModelSettingsError(f"adapter bottleneck must be >= 1, got {bottleneck}")
        if act not in _ACTS:
            raise ModelSettingsError(f"adapter activation must be one of {sorted(_ACTS)}, got {act!r}")
        if init not in ("zero_up", "houlsby"):
            raise ModelSettingsError(f"adapter init must be 'zero_up' or 'houlsby', got {init!r}")
        self.down = nn.Linear(dim, bottleneck)
        self.act = _ACTS[act]()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.Linear(bottleneck, dim)
        self.scale = float(scale)
        self.init = init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.init == "zero_up":
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
        else:
            for lin in (self.down, self.up):
                nn.init.trunc_normal_(lin.weight, std=1e-2, a=-2e-2, b=2e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(self.dropout(self.act(self.down(x))))
        return y * self.scale if self.scale != 1.0 else y

    def add_to_output(self, module: nn.Module, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        """Forward hook for a *sequential* adapter: ``h -> h + adapter(h)`` on the hooked module's output."""
        return output + self(output).to(output.dtype)

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}, init={self.init!r}"


class Adapter(BaselineModel):
    """Sequential bottleneck adapters (Houlsby et al. ICML 2019) after the sub-layers of every block.

    Configuration (the VTAB-1k "Adapter" baseline of NOAH, Zhang et al. 2022: bottleneck 8, 0.16 M parameters
    for ViT-B/16, i.e. one adapter per block): bottleneck ``8``, GELU, after the MLP (``positions='mlp'``):
    the MLP output ``h`` becomes ``h + up(gelu(down(h)))`` before the residual addition.  ``positions='attn,mlp'``
    gives Houlsby's original two adapters per block (after attention and after the MLP).  ``up`` is zero at
    initialisation (the model starts as the backbone; ``init='houlsby'`` for the near-identity normal init).
    """

    method = "adapter"
    trainable_prefixes = ("adapters.", HEAD_PREFIX)

    def __init__(self, backbone: nn.Module, num_classes: int, bottleneck: int = 8, positions: str = "mlp",
                 act: str = "gelu", init: str = "zero_up") -> None:
        super().__init__(backbone, num_classes)
        pos = [p.strip() for p in positions.split(",") if p.strip()]
        if not pos or set(pos) - {"attn", "mlp"} or len(set(pos)) != len(pos):
            raise ModelSettingsError(f"adapter positions must be 'mlp', 'attn' or 'attn,mlp', got {positions!r}")
        pos = [p for p in ("attn", "mlp") if p in pos]
        self.adapters = nn.ModuleDict()
        for path, blk in _block_modules(backbone):
            dim = blk.norm2.normalized_shape[0]
            for p in pos:
                mod = BottleneckAdapter(dim, bottleneck, act=act, init=init)
                self.adapters[_module_key(f"{path}.{p}")] = mod
                getattr(blk, p).register_forward_hook(mod.add_to_output)
        self._settings = {"bottleneck": bottleneck, "positions": ",".join(pos), "act": act, "init": init}
        self._finish_init()

    def settings(self) -> Dict[str, Any]:
        return dict(self._settings)


class _ParallelMlpAdapter(nn.Module):
    """AdaptFormer's AdaptMLP beside one block's MLP: ``mlp(norm2(x)) + scale * adapter(x_in)``.

    ``x_in`` is the MLP branch's un-normalised input ``x`` (``source='x'``, the official code's
    ``ffn_adapter_layernorm_option='none'``; captured by a hook on ``norm2``) or the MLP's own input
    ``norm2(x)`` (``source='norm'``, the paper's equation).
    """

    def __init__(self, dim: int, bottleneck: int, scale: float, dropout: float, source: str) -> None:
        super().__init__()
        self.adapter = BottleneckAdapter(dim, bottleneck, act="relu", dropout=dropout, scale=scale, init="zero_up")
        self.source = source
        self._x: Optional[torch.Tensor] = None

    def capture(self, module: nn.Module, inputs: Tuple[torch.Tensor, ...]) -> None:
        self._x = inputs[0]

    def add(self, module: nn.Module, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        if self.source == "x":
            if self._x is None:
                raise RuntimeError("AdaptFormer: the block's norm2 did not run before its mlp")
            x_in, self._x = self._x, None
        else:
            x_in = inputs[0]
        return output + self.adapter(x_in).to(output.dtype)

    def __getstate__(self) -> Dict[str, Any]:  # never pickle/deepcopy a captured activation
        state = self.__dict__.copy()
        state["_x"] = None
        return state


class AdaptFormer(BaselineModel):
    """AdaptFormer (Chen et al. NeurIPS 2022): a scaled bottleneck adapter in parallel with every block's MLP.

    ``x <- x + mlp(norm2(x)) + s * up(dropout(relu(down(x))))``.  Configuration: the official code's image
    setting (``ffn_option='parallel'``, ``ffn_adapter_layernorm_option='none'`` -- the adapter reads the
    un-normalised ``x`` -- ``ffn_adapter_init_option='lora'``, ``ffn_adapter_scalar=0.1``, adapter dropout
    0.1) with bottleneck ``8``, the size of the VTAB-1k "AdaptFormer" baseline in the NOAH/SSF/DTL tables
    (0.16 M parameters for ViT-B/16).  The AdaptFormer paper itself used bottleneck 64 on its own image/video
    benchmarks (``bottleneck=64``).  The adapter output is added to the MLP branch inside stochastic depth
    (the official code adds it after ``drop_path``; identical when ``drop_path_rate=0``).
    ``source='norm'`` feeds the adapter ``norm2(x)`` as the paper's equation writes.
    """

    method = "adaptformer"
    trainable_prefixes = ("adaptmlp.", HEAD_PREFIX)

    def __init__(self, backbone: nn.Module, num_classes: int, bottleneck: int = 8, scale: float = 0.1,
                 dropout: float = 0.1, source: str = "x") -> None:
        super().__init__(backbone, num_classes)
        if source not in ("x", "norm"):
            raise ModelSettingsError(f"AdaptFormer source must be 'x' (official code) or 'norm' (paper), got {source!r}")
        self.adaptmlp = nn.ModuleDict()
        for path, blk in _block_modules(backbone):
            mod = _ParallelMlpAdapter(blk.norm2.normalized_shape[0], bottleneck, scale, dropout, source)
            self.adaptmlp[_module_key(path)] = mod
            if source == "x":
                blk.norm2.register_forward_pre_hook(mod.capture)
            blk.mlp.register_forward_hook(mod.add)
        self._settings = {"bottleneck": bottleneck, "scale": float(scale), "dropout": float(dropout), "source": source}
        self._finish_init()

    def settings(self) -> Dict[str, Any]:
        return dict(self._settings)


# --------------------------------------------------------------------------------------------------------------
# SSF
# --------------------------------------------------------------------------------------------------------------
class ScaleShift(nn.Module):
    """SSF's per-channel affine ``y * scale + shift`` on a module's output (channels last, or dim 1 of a 4-D conv output).

    Initialised as SSF's code: ``scale ~ N(1, init_std)``, ``shift ~ N(0, init_std)`` (``init_std=0``: identity).
    """

    def __init__(self, dim: int, init_std: float = 0.02, channel_dim: int = -1) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.shift = nn.Parameter(torch.zeros(dim))
        self.init_std = float(init_std)
        self.channel_dim = channel_dim
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.init_std > 0:
            nn.init.normal_(self.scale, mean=1.0, std=self.init_std)
            nn.init.normal_(self.shift, std=self.init_std)
        else:
            nn.init.ones_(self.scale)
            nn.init.zeros_(self.shift)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale, self.shift
        if self.channel_dim == 1 and y.ndim == 4:
            scale, shift = scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1)
        return y * scale.to(y.dtype) + shift.to(y.dtype)

    def hook(self, module: nn.Module, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        return self(output)

    def extra_repr(self) -> str:
        return f"dim={self.scale.numel()}, init_std={self.init_std:g}"


class SSF(BaselineModel):
    """SSF (Scaling & Shifting your Features, Lian et al. NeurIPS 2022).

    Configuration (the SSF repository's ViT/Swin models): a per-channel scale and shift after *every* linear,
    LayerNorm and convolution of the backbone -- patch embedding, each block's ``norm1``, ``attn.qkv``,
    ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2`` (Swin also its patch-merging norm and reduction), and the
    final norm -- initialised ``scale ~ N(1, 0.02)``, ``shift ~ N(0, 0.02)`` as SSF's code (so the model does
    *not* start exactly as the backbone; ``init_std=0`` starts at the identity).  ViT-B/16: 205,824 parameters
    without the head.  (SSF re-parameterises them into the frozen weights after training; not done here.)
    """

    method = "ssf"
    trainable_prefixes = ("ssf.", HEAD_PREFIX)

    def __init__(self, backbone: nn.Module, num_classes: int, init_std: float = 0.02) -> None:
        super().__init__(backbone, num_classes)
        self.ssf = nn.ModuleDict()
        for path, m in backbone.named_modules():
            if isinstance(m, nn.Linear):
                mod = ScaleShift(m.out_features, init_std)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                mod = ScaleShift(m.normalized_shape[-1], init_std)
            elif isinstance(m, nn.Conv2d):
                mod = ScaleShift(m.out_channels, init_std, channel_dim=1)
            else:
                continue
            self.ssf[_module_key(path)] = mod
            m.register_forward_hook(mod.hook)
        self._settings = {"init_std": float(init_std)}
        self._finish_init()

    def settings(self) -> Dict[str, Any]:
        return dict(self._settings)


# --------------------------------------------------------------------------------------------------------------
# VPT-deep
# --------------------------------------------------------------------------------------------------------------
class VPTDeep(BaselineModel):
    """VPT-deep (Jia et al. ECCV 2022): learnable prompt tokens at the input of every ViT block.

    Configuration (the VPT repository): ``num_tokens`` prompts per block, inserted after the class token before
    block 0 and *replaced* by the next block's prompts before every later block; prompt dropout 0.1; prompts
    initialised uniform in ``+-sqrt(6 / (3 * patch_h * patch_w + d))``; class-token head.  The VPT paper picked
    the prompt length per VTAB-1k task from {1, 5, 10, 50, 100, 200} on the validation split; the default here
    is ``10`` (set ``num_tokens`` per task to reproduce a specific run).  ViT only.
    """

    method = "vpt"
    trainable_prefixes = ("prompts", HEAD_PREFIX)

    def __init__(self, backbone: nn.Module, num_classes: int, num_tokens: int = 10, dropout: float = 0.1) -> None:
        super().__init__(backbone, num_classes)
        if num_tokens < 1:
            raise ModelSettingsError(f"VPT num_tokens must be >= 1, got {num_tokens}")
        if getattr(backbone, "cls_token", None) is None or backbone.global_pool != "token":
            raise ModelSettingsError("--method vpt classifies from the class token: this ViT has none (or pools "
                                     f"with global_pool={backbone.global_pool!r}), which would average the prompts in")
        depth, dim = len(backbone.blocks), backbone.embed_dim
        self.num_tokens = num_tokens
        self.prompts = nn.Parameter(torch.empty(depth, num_tokens, dim))
        self.prompt_dropout = nn.Dropout(dropout)
        patch = tuple(backbone.patch_embed.patch_size)
        self._init_val = math.sqrt(6.0 / float(3 * reduce(mul, patch, 1) + dim))
        self.reset_prompts()
        self._settings = {"num_tokens": num_tokens, "dropout": float(dropout)}
        self._finish_init()

    def reset_prompts(self) -> None:
        nn.init.uniform_(self.prompts, -self._init_val, self._init_val)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        x = bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(x))))
        b, prefix, n = x.shape[0], bb.num_prefix_tokens, self.num_tokens
        for i, blk in enumerate(bb.blocks):
            p = self.prompt_dropout(self.prompts[i]).to(x.dtype).expand(b, -1, -1)
            rest = x[:, prefix:] if i == 0 else x[:, prefix + n:]
            x = blk(torch.cat([x[:, :prefix], p, rest], dim=1))
        return bb.norm(x)

    def settings(self) -> Dict[str, Any]:
        return dict(self._settings)


# --------------------------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------------------------
#: ``--method`` names of the baselines (the classes above with a ``method`` name, in the order defined).
BASELINE_METHODS = tuple(_CLASSES)


def baseline_methods_for(family: str) -> Tuple[str, ...]:
    """The baselines implemented for backbone family ``family`` (:mod:`models.families`)."""
    return tuple(m for m, c in _CLASSES.items() if family in c.supported_archs())


def baseline_class(method: str) -> Type[BaselineModel]:
    if method not in _CLASSES:
        raise ModelSettingsError(f"unknown baseline method {method!r}; choose from {', '.join(BASELINE_METHODS)}")
    return _CLASSES[method]


def build_baseline(method: str, model_name: str, num_classes: int, config: Optional[Mapping[str, Any]],
                   lean: bool = False, **kwargs: Any) -> BaselineModel:
    """The builder of every baseline in the method registry (:mod:`methods.builtin`): ``config`` is the
    method's settings (a dict; empty: its defaults). ``lean`` is always off (no baseline has lean mode)."""
    return create_baseline_model(method, model_name, num_classes, settings=config or None, **kwargs)


def baseline_settings(config: Mapping[str, Any]) -> Dict[str, Any]:
    """The method settings of a ``model_config()`` dict (drops ``arch``, ``method``, ``num_classes``)."""
    return {k: v for k, v in config.items() if k not in _CONFIG_KEYS}


def create_baseline_model(
    method: str,
    model_name: str,
    num_classes: int,
    load_path: Optional[str] = None,
    pretrained: bool = False,
    settings: Optional[Mapping[str, Any]] = None,
    **timm_kwargs: Any,
) -> BaselineModel:
    """A baseline-method model on backbone ``model_name`` (a timm ViT/Swin name or the original's names).

    ``load_path`` (a local ``.npz``/``.pth``/``.safetensors``) is loaded into the bare backbone before the
    method's modules are injected (so the loader's every-parameter check sees only backbone tensors).
    ``settings`` are the method's keyword arguments (e.g. ``{"r": 4}`` for LoRA; ``model_config()`` minus
    ``arch``/``method``/``num_classes``); ``timm_kwargs`` go to timm (``drop_path_rate``, ``img_size``, ...).
    """
    cls = baseline_class(method)
    settings = dict(settings or {})
    arch = backbone_arch(model_name)
    if arch not in cls.supported_archs():
        raise ModelSettingsError(f"--method {method} is not implemented for {arch} backbones ({model_name}); "
                         f"{arch} supports: {', '.join(m for m in BASELINE_METHODS if arch in _CLASSES[m].supported_archs())}")
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "backbone", "num_classes")]
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise ModelSettingsError(f"unknown settings {unknown} for method {method!r} (allowed: {allowed})")
    backbone = create_backbone(model_name, pretrained=pretrained, **timm_kwargs)
    if load_path:
        load_backbone_weights(backbone, load_path)
    return cls(backbone, num_classes, **settings)
