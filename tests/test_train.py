"""train.py on VTAB-1k layout data: every output of a run, the recipe (schedule, optimiser groups, losses, EMA,
AMP), --eval_only, the YAML config and the flag checks."""
from __future__ import annotations

import sys
import json
import math
import os

import pytest
import torch
import torch.nn as nn

from helpers_train import single_thread  # noqa: F401 - autouse fixture
from helpers_train import TINY, load_delta, read_results, read_summary, run_train, vtab_root


@pytest.fixture(scope="session")
def vtab(tmp_path_factory):
    return vtab_root(tmp_path_factory)


@pytest.fixture(scope="module")
def vtab_run(vtab, tmp_path_factory):
    """The issue's reference run: cifar_100, 2 + 1 epochs, batch 8 (3 steps per epoch)."""
    out = tmp_path_factory.mktemp("vtab_run") / "run"
    rc = run_train(["--data_dir", vtab, "--dataset", "cifar_100", *TINY, "--epochs", "2", "--warmup_epochs", "1",
                    "--batch_size", "8", "--lr", "5e-3", "--drop_path", "0.1", "--output_dir", out])
    assert rc == 0
    return out


RESULT_FIELDS = {
    "benchmark": str, "dataset": str, "backbone": str, "method": str, "top1": float, "epochs": int,
    "n_params": int, "n_trainable": int, "n_trainable_excl_head": int, "peak_rss_mib": float,
    "train_time_s": float, "images_per_s": float, "versions": dict, "args": dict, "per_seed": list,
}


def test_run_folder_has_every_output(vtab_run):
    names = set(os.listdir(vtab_run))
    assert {"log.txt", "config.yaml", "summary.csv", "results.json", "delta.pth", "last.pth"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    assert not any(n.endswith(".tmp") for n in names), names
    assert "partial" not in names

    res = read_results(vtab_run)
    for key, typ in RESULT_FIELDS.items():
        assert isinstance(res[key], typ), (key, res.get(key))
    assert res["benchmark"] == "vtab" and res["dataset"] == "cifar_100" and res["method"] == "dtl"
    assert res["backbone"] == "vit_tiny_patch16_224"
    assert res["epochs"] == 3
    assert res["peak_memory_mib"] is None  # CPU
    assert 0.0 <= res["top1"] <= 100.0
    assert res["n_test_images"] == {"test": 23}
    # ViT-Ti: 12 taps x 2 x (2 x 192) + head 192 x 100 + 100
    assert res["n_trainable_excl_head"] == 12 * 2 * 2 * 192
    assert res["n_trainable"] == 12 * 2 * 2 * 192 + 192 * 100 + 100
    assert res["versions"]["torch"] == torch.__version__
    assert res["args"]["lr"] == 5e-3

    rows = read_summary(vtab_run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert {"epoch", "lr", "train_loss", "seconds", "test_top1"} <= set(rows[0])
    assert rows[0]["test_top1"] == rows[1]["test_top1"] == ""  # evaluated once, after the last epoch
    assert float(rows[2]["test_top1"]) == pytest.approx(res["top1"])

    log = open(os.path.join(vtab_run, "log.txt")).read()
    assert "RANDOMLY INITIALISED" in log and "trainable:" in log and "epoch 3/3" in log and "ETA" in log

    import yaml

    cfg = yaml.safe_load(open(os.path.join(vtab_run, "config.yaml")))
    assert cfg["lr"] == 5e-3 and cfg["dataset"] == "cifar_100"


def test_tensorboard_has_loss_lr_accuracy(vtab_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(vtab_run))
    ev.Reload()
    tags = set(ev.Tags()["scalars"])
    assert {"train/loss", "train/lr", "test/top1"} <= tags
    assert [e.step for e in ev.Scalars("train/loss")] == [1, 2, 3]


def test_delta_checkpoint_holds_only_trainable_tensors(vtab_run):
    from models import create_dtl_model
    from models.trainable import trainable_names

    ck = load_delta(vtab_run / "delta.pth")
    assert ck["method"] == "dtl" and ck["backbone"] == "vit_tiny_patch16_224"
    assert ck["model_config"]["num_classes"] == 100 and ck["model_config"]["arch"] == "vit"
    assert ck["model_kwargs"]["img_size"] == 32
    model = create_dtl_model("vit_tiny_patch16_224", 100, img_size=32)
    assert sorted(ck["delta"]) == sorted(trainable_names(model))
    # trained: the head moved away from its zero initialisation, and the side network's B did too
    assert ck["delta"]["head.weight"].abs().sum() > 0
    assert ck["delta"]["side.taps.6.lora_B"].abs().sum() > 0


def test_eval_only_reproduces_accuracy(vtab_run, vtab, tmp_path):
    out = tmp_path / "eval"
    rc = run_train(["--data_dir", vtab, "--dataset", "cifar_100", "--num_workers", "0", "--eval_only",
                    "--checkpoint", vtab_run / "delta.pth", "--output_dir", out])
    assert rc == 0
    res, train_res = read_results(out), read_results(vtab_run)
    assert res["epochs"] == 0
    assert res["top1"] == train_res["top1"]
    assert res["n_trainable"] == train_res["n_trainable"]
    assert res["backbone"] == "vit_tiny_patch16_224"  # rebuilt from the checkpoint, not from --model's default


def test_lr_schedule_is_the_original(vtab_run):
    """Epoch e (0-based) runs at the cosine-with-warm-up value at t = e; the last warmup_epochs at min_lr."""
    rows = read_summary(vtab_run)
    lr, lr_min, warm_init, epochs, warm = 5e-3, 1e-8, 1e-7, 2, 1

    def expected(t):
        if t < warm:
            return warm_init + t * (lr - warm_init) / warm
        if t >= epochs:
            return lr_min
        return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * t / epochs))

    assert [float(r["lr"]) for r in rows] == pytest.approx([expected(t) for t in range(3)], rel=1e-9)


def test_longer_schedule_values():
    """The default 100 + 10 epochs: warm-up from 1e-7, cosine without restart, last 10 epochs at 1e-8."""
    from utils.optim import create_scheduler

    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = create_scheduler(opt, epochs=100, warmup_epochs=10, min_lr=1e-8, warmup_lr=1e-7)
    lrs = []
    for epoch in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step(epoch + 1)
    assert lrs[0] == pytest.approx(1e-7)
    assert lrs[5] == pytest.approx(1e-7 + 5 * (1e-3 - 1e-7) / 10)
    assert max(lrs) == pytest.approx(lrs[10])
    assert lrs[99] > 1e-8 and lrs[100:] == pytest.approx([1e-8] * 10)


def test_weight_decay_follows_the_name_rule_only():
    from utils.optim import param_groups

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.norm = nn.LayerNorm(3)
            self.frozen = nn.Linear(3, 3)
            self.frozen.requires_grad_(False)

    m = Toy()
    groups = param_groups(m, 0.05)
    by_id = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert by_id[id(m.lin.weight)] == 0.05
    assert by_id[id(m.norm.weight)] == 0.05  # 1-D but not named *.bias: decayed, as the original
    assert by_id[id(m.lin.bias)] == 0.0 and by_id[id(m.norm.bias)] == 0.0
    assert id(m.frozen.weight) not in by_id


def test_losses_and_mixup_choice():
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    from utils.optim import create_losses, create_mixup

    mk = lambda **kw: {"mixup": 0.0, "cutmix": 0.0, "prob": 1.0, "smoothing": 0.0, **kw}  # noqa: E731
    assert isinstance(create_losses(smoothing=0.0, mixup_active=False)[0], nn.CrossEntropyLoss)
    assert isinstance(create_losses(smoothing=0.1, mixup_active=False)[0], LabelSmoothingCrossEntropy)
    assert create_mixup(10, **mk()) is None
    mix = create_mixup(10, **mk(mixup=0.8, smoothing=0.1))
    assert mix is not None and mix.label_smoothing == 0.1
    assert isinstance(create_losses(smoothing=0.0, mixup_active=True)[0], SoftTargetCrossEntropy)


def test_trainable_ema_update_and_swap():
    from utils.optim import TrainableEMA

    lin = nn.Linear(2, 1)
    lin.bias.requires_grad_(False)
    ema = TrainableEMA(lin, decay=0.9)
    start = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update()
    assert torch.allclose(ema.shadow["weight"], start + 0.1)
    assert "bias" not in ema.shadow
    ema.swap()
    assert torch.allclose(lin.weight, start + 0.1)
    ema.swap()
    assert torch.allclose(lin.weight, start + 1.0)


def test_options_mixup_smoothing_ema_bf16_run(vtab, tmp_path):
    """The optional paths run end to end; with --ema the saved delta is the EMA, not the raw weights."""
    out = tmp_path / "opts"
    rc = run_train(["--data_dir", vtab, "--dataset", "dsprites_loc", *TINY, "--epochs", "1", "--warmup_epochs", "0",
                    "--batch_size", "8", "--mixup", "0.8", "--cutmix", "1.0", "--smoothing", "0.1", "--ema",
                    "--ema_decay", "0.5", "--amp", "--amp_dtype", "bfloat16", "--fusion_size", "3",
                    "--output_dir", out])
    assert rc == 0
    res = read_results(out)
    assert res["method"] == "dtl+"
    ck = load_delta(out / "delta.pth")
    last = torch.load(out / "last.pth", weights_only=True)
    assert last["trainer"] is None  # run finished; states were in the per-epoch versions
    assert "side.fusion.conv.weight" in ck["delta"]


def test_config_yaml_gives_defaults_and_flags_win(tmp_path):
    from cli.flags import UsageError, parse_args

    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: dtd\nlr: 0.02\nlora_before_blocks: 0-5\nseeds: [1, 2]\namp: true\n")
    args = parse_args(["--config", str(cfg), "--lr", "0.5"])
    assert args.dataset == "dtd" and args.lr == 0.5 and args.lora_before_blocks == "0-5"
    assert args.seeds == [1, 2] and args.amp is True and args.benchmark == "vtab"
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 0.1\n")
    with pytest.raises(UsageError, match="unknown key 'learning_rate'"):
        parse_args(["--config", str(bad)])


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "food101-FS"], "--shot is required"),
    (["--dataset", "cifar_100", "--shot", "2"], "--shot does not apply"),
    (["--dataset", "cifar_100", "--eval_only"], "--eval_only needs --checkpoint"),
    (["--dataset", "cifar_100", "--checkpoint", "x.pth"], "only used with --eval_only"),
    (["--dataset", "cifar_100", "--eval_interval", "5"], "few-shot and folder benchmarks only"),
    (["--dataset", "cifar_100", "--target_dataset", "all"], "domain_generalization benchmark only"),
    (["--dataset", "cifar_100", "--mixup", "0.8", "--batch_size", "7"], "even batch"),
    (["--dataset", "not_a_task"], "unknown dataset"),
    (["--dataset", "cifar_100", "--seed", "-1"], "--seed must lie in"),
    (["--dataset", "cifar_100", "--method", "linear", "--fusion_size", "3"], r"DTL\+ setting"),
])
def test_flag_errors(argv, message):
    from cli.flags import UsageError, parse_args

    with pytest.raises(UsageError, match=message):
        parse_args(argv)


def test_parser_rejects_abbreviations_and_bad_ranges(capsys):
    from cli.flags import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--dataset", "cifar_100", "--warmup", "3"])  # no abbreviation of --warmup_epochs
    with pytest.raises(SystemExit):
        parse_args(["--dataset", "cifar_100", "--lora_before_blocks", "11-0"])
    assert "cannot parse block selection" in capsys.readouterr().err


def test_benchmark_inference():
    from cli.flags import infer_benchmark

    assert infer_benchmark("cifar_100") == "vtab"
    assert infer_benchmark("oxford_iiit_pet") == "vtab"
    assert infer_benchmark("food101-FS") == "few_shot"
    assert infer_benchmark("imagenet-sketch") == "domain_generalization"


def test_few_shot_and_dg_defaults():
    from cli.flags import parse_args

    fs = parse_args(["--dataset", "food101-FS", "--shot", "4"])
    assert fs.seeds == [0, 1, 2] and fs.eval_interval == 10
    dg = parse_args(["--dataset", "imagenetv2"])
    assert dg.seeds == [0, 1, 2] and dg.shot == 16 and dg.eval_interval is None
    assert parse_args(["--dataset", "dtd"]).seeds == [0]


def test_model_kwargs_are_stored_and_rebuilt(vtab, tmp_path):
    out = tmp_path / "mk"
    rc = run_train(["--data_dir", vtab, "--dataset", "dsprites_loc", *TINY, "--model_kwargs",
                    "embed_dim=32,num_heads=2,patch_size=8", "--epochs", "1", "--warmup_epochs", "0",
                    "--batch_size", "8", "--output_dir", out])
    assert rc == 0
    res = read_results(out)
    assert res["backbone"] == "vit_tiny_patch16_224[embed_dim=32,num_heads=2,patch_size=8]"
    assert res["n_trainable_excl_head"] == 12 * 2 * 2 * 32
    ck = load_delta(out / "delta.pth")
    assert ck["model_kwargs"]["embed_dim"] == 32 and ck["backbone"] == "vit_tiny_patch16_224"
    ev = tmp_path / "ev"
    assert run_train(["--data_dir", vtab, "--dataset", "dsprites_loc", "--num_workers", "0", "--eval_only",
                      "--checkpoint", out / "delta.pth", "--output_dir", ev]) == 0
    assert read_results(ev)["top1"] == res["top1"] and read_results(ev)["backbone"] == res["backbone"]


def test_demo_pipeline_pretrain_export_npz_and_launcher(vtab, tmp_path):
    """The demo's path at toy scale: train.py --method full, export its backbone as a Google .npz
    (demo.run_demo.export_npz), then a launcher with LOAD_PATH=<npz> loads it through timm's npz loader."""
    import importlib.util
    import subprocess

    from helpers_train import REPO

    small = ["--model_kwargs", "embed_dim=32,num_heads=2,patch_size=8", "--epochs", "1", "--warmup_epochs", "0",
             "--batch_size", "8"]
    pre = tmp_path / "pre"
    assert run_train(["--data_dir", vtab, "--dataset", "dsprites_loc", "--method", "full", *TINY, *small,
                      "--output_dir", pre]) == 0
    spec = importlib.util.spec_from_file_location("run_demo", REPO / "demo" / "run_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    npz = tmp_path / "small_vit.npz"
    demo.export_npz(str(pre), str(npz))

    out = tmp_path / "dtl"
    env = dict(os.environ, DATA_DIR=str(vtab), LOAD_PATH=str(npz), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(REPO / "train_scripts/vit/vtab/cifar_100/train_dtl.sh"), *TINY, *small,
                           "--no-amp", "--no-prefetcher", "--output_dir", str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert f"backbone tensors from {npz}" in log and "RANDOMLY" not in log
    assert read_results(out)["args"]["load_path"] == str(npz)

    # the loaded backbone is the pre-trained one
    from models import create_dtl_model
    from models.pretrained import load_backbone_weights

    full = load_delta(pre / "delta.pth")["delta"]
    m = create_dtl_model("vit_tiny_patch16_224", 100, embed_dim=32, num_heads=2, patch_size=8, img_size=32)
    load_backbone_weights(m, str(npz))
    for k, v in m.backbone.state_dict().items():
        assert torch.allclose(v, full["backbone." + k], atol=1e-6), k
