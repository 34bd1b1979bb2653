"""The data section of a run: which benchmark, dataset, splits and seeds, read from where, at what size."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

__all__ = ["DataSpec"]


@dataclass(frozen=True)
class DataSpec:
    """What a run trains and evaluates on (frozen; :meth:`replace` makes a new one).

    Args:
        benchmark: canonical benchmark name (:mod:`data.benchmarks`).
        dataset: the dataset as given (a VTAB task, few-shot dataset or DG target; canonical once the data is
            built: :meth:`replace`).
        data_dir: the benchmark root.
        shot: shots per class (few-shot, DG source), ``None`` where the benchmark has none.
        seeds: the data seeds trained in turn.
        target_dataset: DG targets (a name, a comma list or ``all``); ``None`` = the dataset itself.
        img_size: input resolution of the transforms.
        check_images: open every listed image's header at start.
        skip_bad_images: drop missing/unreadable images instead of stopping.
        num_classes: the class count the user expects (``--num_classes``); ``None`` = whatever the data has.
        allow_train_test_overlap: accept images listed for training and for testing (otherwise refused).
    """

    benchmark: str
    dataset: str
    data_dir: str = ""
    shot: Optional[int] = None
    seeds: Tuple[int, ...] = (0,)
    target_dataset: Optional[str] = None
    img_size: int = 224
    check_images: bool = True
    skip_bad_images: bool = False
    num_classes: Optional[int] = None
    allow_train_test_overlap: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        object.__setattr__(self, "img_size", int(self.img_size))

    def replace(self, **changes: Any) -> "DataSpec":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        out["seeds"] = list(self.seeds)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DataSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
