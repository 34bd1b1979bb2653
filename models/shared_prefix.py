"""Several DTL tasks on one frozen backbone: the blocks no task changes run once per image.

DTL leaves the backbone untouched; a task is only its side network and head. Before a task's first add-back
block its tokens are the backbone's own, so for every task the inputs of the blocks up to its first add-back
(:meth:`~models.dtl_base.DTLBase.prefix_plan`) are plain backbone activations, the same for all tasks. They are
computed once per image (up to the latest of the tasks' first add-back blocks), and each task continues from
them with its own :meth:`~models.dtl_base.DTLBase.forward_from_prefix` (its side sum from the recorded tap
inputs, its tail blocks, its head). Swin: blocks are numbered globally across stages, a stage's first block input
is taken after its patch merging. The logits are those of each task's model run alone (the same operations on the
same values; :meth:`SharedPrefixDTL.forward_separately` is that reference).
"""
from __future__ import annotations

import json
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn as nn

from utils.errors import CheckpointError

from .delta import DeltaCheckpoint, apply_delta, build_from_delta
from .spec import thaw

__all__ = ["SharedPrefixDTL", "shared_model_from_deltas"]


class SharedPrefixDTL(nn.Module):
    """DTL models that share one frozen backbone module, run with one pass through their common prefix.

    Args:
        tasks: DTL models (:class:`~models.dtl_base.DTLBase`) whose ``backbone`` is the same module object.
        names: a name per task (default ``task0``, ``task1``, ...).

    Attributes:
        resume: the earliest first add-back block among the tasks (every block before it runs exactly once).
        record: the blocks whose inputs are recorded (every task's :meth:`prefix_plan` blocks).
    """

    def __init__(self, tasks: Sequence[nn.Module], names: Sequence[str] = ()) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("SharedPrefixDTL: no tasks")
        backbone = tasks[0].backbone
        if any(t.backbone is not backbone for t in tasks):
            raise ValueError("SharedPrefixDTL: every task must wrap the same backbone module")
        if any(p.requires_grad for p in backbone.parameters()):
            raise ValueError("SharedPrefixDTL: the shared backbone must be frozen")
        self.tasks = nn.ModuleList(tasks)
        self.names = list(names) or [f"task{i}" for i in range(len(tasks))]
        if len(self.names) != len(tasks):
            raise ValueError(f"SharedPrefixDTL: {len(self.names)} names for {len(tasks)} tasks")
        plans = [t.prefix_plan() for t in tasks]
        self.resume = min(resume for _, resume in plans)
        self.record = sorted({i for blocks, _ in plans for i in blocks})
        # the task with the latest first add-back records for all: every recorded block is in its frozen prefix
        self._recorder = max(range(len(tasks)), key=lambda k: plans[k][1])

    @property
    def backbone(self) -> nn.Module:
        return self.tasks[0].backbone

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> List[torch.Tensor]:
        """Logits of every task for ``images``."""
        recorder = self.tasks[self._recorder]
        inputs = recorder.record_block_inputs(images, self.record)
        grid = recorder.patch_grid(images)
        return [task.forward_from_prefix(inputs, grid=grid) for task in self.tasks]

    @torch.no_grad()
    def forward_separately(self, images: torch.Tensor) -> List[torch.Tensor]:
        """The same logits, each task's full model run on its own (the reference)."""
        return [task(images) for task in self.tasks]


def shared_model_from_deltas(
    deltas: Sequence[DeltaCheckpoint],
    *,
    load_path: Optional[str] = None,
    cache_dir: Optional[str] = None,
    allow_backbone_mismatch: bool = False,
    log: Optional[Callable[[str], None]] = None,
) -> SharedPrefixDTL:
    """The :class:`SharedPrefixDTL` of DTL deltas on one backbone (the same name, image size and timm
    arguments): the first through :func:`models.delta.build_from_delta` (backbone weights ``load_path``, the
    backbone check), the others around its backbone, each checked against the weights it records."""
    if not deltas:
        raise CheckpointError("no deltas given")
    for d in deltas:
        if d.spec is None:
            raise CheckpointError(f"{d.source}: tensors without a model description (give the model settings)")
        if not d.is_dtl:
            raise CheckpointError(f"{d.source}: method {d.spec.method!r}; shared-prefix inference needs DTL/DTL+ "
                                  f"deltas (other methods change the early blocks)")
    describe = lambda d: (d.spec.backbone, d.spec.img_size, json.dumps(thaw(d.spec.backbone_kwargs), sort_keys=True))  # noqa: E731
    first = describe(deltas[0])
    other = [f"{d.source} ({d.spec.backbone}, {d.spec.img_size} px, {thaw(d.spec.backbone_kwargs)})"
             for d in deltas if describe(d) != first]
    if other:
        raise CheckpointError(f"the deltas do not share one backbone: {deltas[0].source} is on {first[0]} at "
                              f"{first[1]} px with {first[2]}, but {other}")
    model = build_from_delta(deltas[0], load_path=load_path, cache_dir=cache_dir,
                             allow_backbone_mismatch=allow_backbone_mismatch, log=log)
    tasks = [model]
    for d in deltas[1:]:
        task = type(model)(model.backbone, d.spec.num_classes, d.dtl_config()).eval()
        tasks.append(apply_delta(task, d, allow_backbone_mismatch=allow_backbone_mismatch, log=log))
    return SharedPrefixDTL(tasks, [d.name for d in deltas]).eval()
