"""Few-shot and domain-generalisation protocols on generated roots in the real layouts (file names with spaces,
labels spread over the whole class range): seeds, validation selection, per-seed results, DG targets."""
from __future__ import annotations

import statistics

import pytest
import torch

from helpers_train import single_thread  # noqa: F401 - autouse fixture
from helpers_train import TINY, count_lines, dg_root, fgfs_root, load_delta, read_results, read_summary, run_train


@pytest.fixture(scope="session")
def fgfs(tmp_path_factory):
    return fgfs_root(tmp_path_factory)


@pytest.fixture(scope="session")
def dg(tmp_path_factory):
    return dg_root(tmp_path_factory)


FS = ["--dataset", "food101-FS", "--shot", "2", *TINY, "--epochs", "3", "--warmup_epochs", "1", "--batch_size", "4",
      "--lr", "1e-2", "--eval_interval", "2"]


@pytest.fixture(scope="module")
def fs_run(fgfs, tmp_path_factory):
    out = tmp_path_factory.mktemp("fs") / "run"
    assert run_train(["--data_dir", fgfs, *FS, "--output_dir", out]) == 0
    return out


def test_few_shot_results_have_three_seeds(fs_run, fgfs):
    res = read_results(fs_run)
    assert res["benchmark"] == "few_shot" and res["shot"] == 2 and res["epochs"] == 4
    assert [s["seed"] for s in res["per_seed"]] == [0, 1, 2]
    tops = [s["top1"] for s in res["per_seed"]]
    assert res["top1"] == pytest.approx(statistics.mean(tops))
    assert res["top1_std"] == pytest.approx(statistics.stdev(tops))
    n_test = count_lines(f"{fgfs}/few-shot_split/food101/annotations/test_meta.list")
    assert res["n_test_images"] == {"test": n_test}
    for s in res["per_seed"]:
        assert s["best_epoch"] in (2, 4) and 0 <= s["best_val"] <= 100
        ck = load_delta(fs_run / f"delta_seed{s['seed']}.pth")
        assert ck["seed"] == s["seed"] and ck["shot"] == 2 and ck["model_config"]["num_classes"] == 101


def test_few_shot_validates_every_interval_and_selects_strictly(fs_run):
    rows = read_summary(fs_run)
    res = read_results(fs_run)
    for s in res["per_seed"]:
        mine = [r for r in rows if int(r["seed"]) == s["seed"]]
        assert [int(r["epoch"]) for r in mine] == [1, 2, 3, 4]
        vals = {int(r["epoch"]): float(r["val_top1"]) for r in mine if r["val_top1"] != ""}
        assert sorted(vals) == [2, 4]  # every 2 epochs (and the last)
        best = max(vals.values())
        assert s["best_val"] == best
        assert s["best_epoch"] == min(e for e, v in vals.items() if v == best)  # a tie does not replace
        assert float(mine[-1]["test_top1"]) == s["top1"]


def test_tested_weights_are_the_best_validation_weights(fgfs, tmp_path, monkeypatch):
    """Scripted validation accuracies 40, 60, 60, 50: epoch 2's weights win (the tie at 3 does not replace);
    the test split is evaluated with exactly those weights, and they are what delta_seed0.pth holds."""
    import train

    scripted = iter([40.0, 60.0, 60.0, 50.0])
    snapshots = {}
    real_eval = train.Trainer.evaluate

    def fake_eval(self, loader):
        lp = loader.dataset.list_path
        if lp.endswith("val_meta.list"):
            snapshots[len(snapshots) + 1] = self.delta()
            return {"top1": next(scripted), "top5": 100.0, "loss": 0.0, "n": len(loader.dataset)}
        tested.append(self.delta())
        return real_eval(self, loader)

    tested = []
    monkeypatch.setattr(train.Trainer, "evaluate", fake_eval)
    out = tmp_path / "sel"
    argv = ["--data_dir", fgfs, *FS, "--eval_interval", "1", "--seeds", "0", "--output_dir", out]
    assert run_train(argv) == 0
    res = read_results(out)
    assert res["per_seed"][0]["best_val"] == 60.0 and res["per_seed"][0]["best_epoch"] == 2
    assert len(tested) == 1
    saved = load_delta(out / "delta.pth")["delta"]
    for k, v in snapshots[2].items():
        assert torch.equal(tested[0][k], v) and torch.equal(saved[k], v), k
    assert any(not torch.equal(snapshots[2][k], snapshots[4][k]) for k in saved)  # the last weights differ


DG = [*TINY, "--epochs", "1", "--warmup_epochs", "0", "--batch_size", "4", "--lr", "1e-2", "--shot", "2"]


def test_dg_three_seeds_on_one_target(dg, tmp_path):
    out = tmp_path / "dg"
    assert run_train(["--data_dir", dg, "--dataset", "imagenet-sketch", *DG, "--output_dir", out]) == 0
    res = read_results(out)
    assert res["benchmark"] == "domain_generalization"
    assert res["source"] == "imagenet-2shot" and res["target"] == "imagenet-sketch"
    assert [s["seed"] for s in res["per_seed"]] == [0, 1, 2]
    assert all(s["best_val"] is None and s["best_epoch"] is None for s in res["per_seed"])
    assert res["top1"] == pytest.approx(statistics.mean(s["top1"] for s in res["per_seed"]))
    assert res["n_test_images"] == {"imagenet-sketch": count_lines(f"{dg}/imagenet-sketch/annotations/val_meta.list")}
    assert load_delta(out / "delta_seed2.pth")["model_config"]["num_classes"] == 1000

    every = tmp_path / "all"
    assert run_train(["--data_dir", dg, "--dataset", "imagenet-sketch", "--target_dataset", "all", *DG,
                      "--output_dir", every]) == 0
    res_all = read_results(every)
    assert sorted(res_all["per_target"]) == sorted(["imagenet", "imagenetv2", "imagenet-sketch",
                                                   "imagenet-adversarial", "imagenet-rendition"])
    # the same models: the primary target's numbers equal the single-target run's
    assert res_all["top1"] == res["top1"]
    assert res_all["per_target"]["imagenet-sketch"]["top1"] == pytest.approx(res["top1"])
    for s in res_all["per_seed"]:
        assert len(s["targets"]) == 5
    rows = read_summary(every)
    assert {"imagenet_top1", "imagenet-rendition_top1"} <= set(rows[-1])
