"""One Benchmark description per benchmark, consumed everywhere: the registry, and a fourth benchmark added as
one description (no other file touched) that train.py, the data checks and the run folder handle; the resume
state's round trip through last.pth's dict."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

import data.benchmarks as registry
from data.benchmark import Benchmark, DataPlan, SeedPlan
from data.check import check_data_root, detect_benchmark
from data.vtab import VTAB_TASKS, build_vtab_dataset, check_vtab_root, looks_like_vtab_root
from engine.run_folder import ResumeState, SeedProgress
from helpers_train import single_thread  # noqa: F401 - autouse fixture
from helpers_train import TINY, read_results, run_train, vtab_root
from utils.checkpoint import RESUME_FORMAT


@pytest.fixture(scope="session")
def vtab(tmp_path_factory):
    return vtab_root(tmp_path_factory)


def test_registry_describes_the_benchmarks():
    assert registry.BENCHMARKS == ("vtab", "few_shot", "domain_generalization", "folder")
    for alias, name in (("VTAB-1k", "vtab"), ("few-shot", "few_shot"), ("fgfs", "few_shot"), ("DG", "domain_generalization")):
        assert registry.canonical_benchmark(alias) == name
    with pytest.raises(ValueError, match="unknown benchmark"):
        registry.get_benchmark("imagenet-c")
    vt, fs, dg = (registry.get_benchmark(n) for n in registry.BENCHMARKS[:3])
    assert vt.knows("oxford_iiit_pet") and not vt.knows("food101-FS") and fs.knows("food101-FS")
    assert [b.selects_on_val for b in (vt, fs, dg)] == [False, True, False]
    assert [b.train_transform_is_deterministic() for b in (vt, fs, dg)] == [True, False, False]
    assert fs.run_name("dtl", 4) == "dtl_shot_4" and vt.run_name("dtl+", None) == "dtl+"
    assert dg.primary("imagenet-sketch", ["imagenet", "imagenet-sketch"]) == "imagenet-sketch"
    assert dg.primary("imagenet-x", ["imagenet", "imagenet-sketch"]) == "imagenet"
    assert vt.primary("cifar_100", ["test"]) == "test"
    assert fs.num_classes("food101") == 101 and dg.num_classes("imagenet-r") == 1000


# A fourth benchmark: the VTAB layout under other task names ("toy-<task>"), one seed plan per data seed,
# selection on val200. Everything train.py needs comes from this one description.
def _toy_name(name: str) -> str:
    key = name.strip().lower()
    if not key.startswith("toy-") or key[4:] not in VTAB_TASKS:
        raise ValueError(f"unknown toy dataset {name!r}")
    return key


def _toy_build(req):
    task = VTAB_TASKS[_toy_name(req.dataset)[4:]]
    kw = req.dataset_kwargs
    test = build_vtab_dataset(req.data_dir, task, "test", transform=req.test_transform, **kw)
    val = build_vtab_dataset(req.data_dir, task, "val200", transform=req.test_transform, **kw) if req.need_train else None
    train = (build_vtab_dataset(req.data_dir, task, "train800", transform=req.train_transform, **kw)
             if req.need_train else None)
    return DataPlan(task.num_classes, [SeedPlan(i, s, train, val, {"test": test}) for i, s in enumerate(req.seeds)],
                    _toy_name(req.dataset), {"toy": True})


TOY = Benchmark(
    name="toy", title="toy", aliases=("toy_bench",), table="toy", launcher_data_dir="/path/to/toy",
    default_seeds=(0, 1), shot="none", shot_help="the toy benchmark has no shots", augment_train=False,
    eval_resize=1, selects_on_val=True, default_eval_interval=1, targets=False, shot_in_names=False,
    canonical_dataset=_toy_name, dataset_names=tuple(f"toy-{t}" for t in VTAB_TASKS),
    num_classes=lambda n: VTAB_TASKS[_toy_name(n)[4:]].num_classes, build=_toy_build,
    check_root=check_vtab_root, detect=lambda root: False, protocol="toy",
)


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setitem(registry.REGISTRY, "toy", TOY)
    monkeypatch.setitem(registry._ALIASES, "toy", "toy")
    yield


def test_a_fourth_benchmark_is_one_description(vtab, tmp_path, toy_registered):
    out = tmp_path / "toy"
    rc = run_train(["--data_dir", vtab, "--dataset", "toy-cifar_100", *TINY, "--epochs", "2", "--warmup_epochs", "0",
                    "--batch_size", "8", "--lr", "1e-2", "--output_dir", out])
    assert rc == 0
    res = read_results(out)
    assert res["benchmark"] == "toy" and res["dataset"] == "toy-cifar_100" and res["toy"] is True
    assert [s["seed"] for s in res["per_seed"]] == [0, 1]  # its default seeds
    assert all(s["best_epoch"] in (1, 2) for s in res["per_seed"])  # it selects on validation, every epoch
    assert os.path.isfile(out / "delta_seed1.pth")
    assert check_data_root(vtab, benchmark="toy", tasks=["cifar_100"], check_images=False).ok


def test_resume_state_round_trip():
    state = ResumeState(seed_index=1, epoch=3, trainer={"model_delta": {"w": torch.ones(2)}},
                        progress=SeedProgress(best_val=50.0, best_epoch=2, best_delta={"w": torch.zeros(2)}),
                        completed=[{"seed": 0, "top1": 40.0}], train_time_s=1.5, train_images=64,
                        counts={"n_params": 10, "n_trainable": 2, "n_trainable_excl_head": 1})
    ck = state.to_checkpoint()
    assert ck["format"] == RESUME_FORMAT
    assert set(ck) == {"format", *(f.name for f in dataclasses.fields(ResumeState))}
    assert isinstance(ck["progress"], dict)  # last.pth holds plain types (weights_only loading)
    back = ResumeState.from_checkpoint(ck)
    assert back.progress.best_epoch == 2 and torch.equal(back.progress.best_delta["w"], torch.zeros(2))
    assert (back.seed_index, back.epoch, back.train_images, back.completed) == (1, 3, 64, [{"seed": 0, "top1": 40.0}])
    progress = SeedProgress()
    progress.offer(60.0, 1, lambda: "a")
    progress.offer(60.0, 2, lambda: "b")  # a tie keeps the earlier weights
    progress.offer(70.0, 3, lambda: "c")
    assert (progress.best_val, progress.best_epoch, progress.best_delta) == (70.0, 3, "c")


def test_detection_reads_each_benchmark_s_own_rule(vtab):
    assert looks_like_vtab_root(vtab) and detect_benchmark(vtab) == "vtab"
