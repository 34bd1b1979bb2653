"""The run specs: every flag lands in a spec field or is declared run-local; specs are frozen; a resume compares
them section by section (run-local fields aside, backbone weights included); old last.pth files still resume;
--eval_only rebuilds the model from the delta's spec (or, for old deltas, its loose keys); --config files are
bounded (no aliases) and an empty value is a one-line error naming the key; the method registry."""
from __future__ import annotations

import dataclasses
import logging
import os

import pytest
import torch

from helpers_train import single_thread  # noqa: F401 - autouse fixture
from helpers_train import TINY, Killed, kill_after, read_results, run_train, vtab_root
from models.spec import WeightsSpec
from utils.errors import ModelSettingsError, UsageError


@pytest.fixture(scope="module")
def vtab(tmp_path_factory):
    return vtab_root(tmp_path_factory)


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    from models.backbones import create_backbone

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "backbone.pth"
    torch.save(create_backbone("vit_tiny_patch16_224", img_size=32).state_dict(), path)
    return path


def _argv(root, out, load_path, *extra):
    return ["--data_dir", root, "--dataset", "dsprites_loc", *TINY, "--epochs", "2", "--warmup_epochs", "0",
            "--batch_size", "8", "--lr", "1e-2", "--load_path", load_path, "--output_dir", out, *extra]


def _error_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("error:")]


# --------------------------------------------------------------------------------------------- flag mapping
def test_every_flag_is_mapped_into_a_spec_or_declared_run_local():
    from cli.flags import build_parser
    from cli.specs import RUN_LOCAL_FLAGS
    from engine.spec import FIELD_FLAGS

    dests = {a.dest for a in build_parser()._actions if a.dest != "help"}
    mapped = set(FIELD_FLAGS.values())
    forgotten = sorted(dests - mapped - set(RUN_LOCAL_FLAGS))
    assert not forgotten, f"flags in no spec field and not declared run-local: {forgotten}"
    assert not (mapped - dests), f"spec fields mapped to flags that do not exist: {sorted(mapped - dests)}"
    assert not (mapped & set(RUN_LOCAL_FLAGS))


def test_flag_values_reach_their_spec_fields(tmp_path):
    from cli.specs import build_experiment, parse_args
    from engine.spec import FIELD_FLAGS
    from models.spec import thaw

    argv = ["--dataset", "food101-FS", "--shot", "4", "--seeds", "3,5", "--img_size", "64", "--num_workers", "1",
            "--lr", "0.02", "--weight_decay", "0.1", "--epochs", "7", "--warmup_epochs", "2", "--batch_size", "6",
            "--batch_size_test", "9", "--smoothing", "0.1", "--ema", "--ema_decay", "0.9", "--seed", "3",
            "--eval_interval", "2", "--lean", "--no-tensorboard", "--output_dir", str(tmp_path / "o"),
            "--r", "3", "--beta", "50", "--fusion_size", "3", "--lora_before_blocks", "0-5",
            "--add_after_blocks", "3-5", "--drop_path", "0.1", "--mean", "0.4,0.5,0.6", "--std", "0.2,0.3,0.4"]
    args = parse_args(argv)
    exp = build_experiment(args)
    for key, flag in FIELD_FLAGS.items():
        section, _, name = key.partition(".")
        if section == "model":
            continue
        assert getattr(getattr(exp, section), name) == (tuple(args.seeds) if flag == "seeds" else getattr(args, flag)), key
    m = exp.model
    assert (m.backbone, m.method, m.img_size, m.drop_path_rate) == ("vit_base_patch16_224_in21k", "dtl+", 64, 0.1)
    assert thaw(m.method_config) == {"r": 3, "beta": 50.0, "fusion_size": 3, "csn_blocks": [0, 1, 2, 3, 4, 5],
                                     "add_back_blocks": [3, 4, 5]}
    assert m.mean == (0.4, 0.5, 0.6) and m.std == (0.2, 0.3, 0.4) and m.weights.kind == "random"
    assert exp.optim.total_epochs == 9 and exp.flags["lora_before_blocks"] == "0-5"


def test_specs_are_frozen_and_derived_by_replace():
    from cli.specs import build_experiment, parse_args
    from models.backbones import default_normalization

    exp = build_experiment(parse_args(["--dataset", "dtd"]))
    for spec, name in ((exp.optim, "lr"), (exp.run, "lean"), (exp.data, "dataset"), (exp.model, "img_size"), (exp, "model")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(spec, name, None)
    with pytest.raises(TypeError):
        exp.flags["lr"] = 1.0
    assert (exp.model.mean, exp.model.std) == default_normalization(exp.model.backbone)
    assert exp.replace(optim=exp.optim.replace(lr=0.5)).optim.lr == 0.5 and exp.optim.lr == 1e-3


def test_spec_differences_name_section_and_field_and_skip_run_local():
    from cli.specs import build_experiment, parse_args
    from engine.spec import spec_differences

    base = build_experiment(parse_args(["--dataset", "dtd"]))
    other = build_experiment(parse_args(["--dataset", "dtd", "--num_workers", "0", "--output_dir", "x",
                                         "--batch_size_test", "8", "--no-tensorboard", "--device", "cpu"]))
    assert spec_differences(base.sections(), other) == []
    changed = build_experiment(parse_args(["--dataset", "dtd", "--r", "4", "--mixup", "0.5", "--seeds", "1"]))
    text = [d.describe() for d in spec_differences(base.sections(), changed)]
    assert "--r: checkpoint 2 vs now 4 (model spec, method_config.r)" in text
    assert "--mixup: checkpoint 0.0 vs now 0.5 (optim spec, mixup)" in text
    assert "--seeds: checkpoint [0] vs now [1] (data spec, seeds)" in text


@pytest.mark.parametrize("flag, value", [("--mean", "0.5,0.5"), ("--std", "a,b,c"), ("--mean", "nan,0,0"),
                                         ("--std", "0,1,1"), ("--std", "-1,1,1"), ("--std", "1e-45,1,1"),
                                         ("--std", "1,inf,1")])
def test_bad_normalisation_flags_exit_2(flag, value, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:  # argparse: usage and one error line naming the flag, no run folder
        run_train(["--dataset", "dtd", flag, value, "--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert e.value.code == 2 and len(errors) == 1 and f"error: argument {flag}:" in errors[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value, needle", [
    ("embed_dim=,depth=4", "'embed_dim' has no value (expected embed_dim=VALUE)"),
    ("embed_dim=32 num_heads=2", "separated by ',' only (e.g. embed_dim=64,num_heads=2), got 'embed_dim=32 num"),
    ("embed_dim=32;depth=4", "separated by ',' only"),
    ("embed_dim=32 depth", "separated by ',' only"),
    ("depth", "separated by ',' only"),
    ("embed_dim=32,embed_dim=64", "'embed_dim' is given twice"),
    ("num_classes=7", "num_classes is set by --num_classes (the class count comes from the data), not by "
                      "--model_kwargs"),
    ("embed_dim=32,img_size=64", "img_size is set by --img_size, not by --model_kwargs"),
    ("drop_path_rate=0.1", "drop_path_rate is set by --drop_path, not by --model_kwargs"),
    ("pretrained=true", "pretrained is set by --load_path timm"),
    ("lean=true", "lean is set by --lean"),
])
def test_bad_model_kwargs_exit_2_naming_the_flag(value, needle, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        run_train(["--dataset", "dtd", *TINY, "--img_size", "32", "--model_kwargs", value,
                   "--output_dir", str(tmp_path / "run")])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert e.value.code == 2 and len(errors) == 1 and "error: argument --model_kwargs: " in errors[0], errors
    assert needle in errors[0], errors
    assert not (tmp_path / "run").exists()


def test_model_kwargs_values_and_the_config_file(tmp_path):
    from cli.flags import model_kwargs_type
    from cli.specs import parse_args

    assert model_kwargs_type("embed_dim=32, depths=(2, 2,6,2),num_heads=[1,2],x=null,y='a b',") == {
        "embed_dim": 32, "depths": [2, 2, 6, 2], "num_heads": [1, 2], "x": None, "y": "a b"}
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model_kwargs: {embed_dim: 32, num_classes: 7}\n")
    with pytest.raises(UsageError, match="bad value for 'model_kwargs': num_classes is set by --num_classes"):
        parse_args(["--dataset", "dtd", "--config", str(cfg)])
    cfg.write_text("model_kwargs: {embed_dim: 32, depth: 4}\n")
    assert parse_args(["--dataset", "dtd", "--config", str(cfg)]).model_kwargs == {"embed_dim": 32, "depth": 4}


def test_std_takes_small_positive_values_and_refuses_them_in_a_config(tmp_path):
    from cli.flags import MIN_STD
    from cli.specs import parse_args

    assert parse_args(["--dataset", "dtd", "--std", "1e-3,0.5,2"]).std == (1e-3, 0.5, 2.0)
    assert parse_args(["--dataset", "dtd", "--std", f"{MIN_STD!r},1,1"]).std[0] == MIN_STD
    cfg = tmp_path / "c.yaml"
    cfg.write_text("std: [0, 1, 1]\n")
    with pytest.raises(UsageError, match="bad value for 'std': expected three numbers > 0"):
        parse_args(["--dataset", "dtd", "--config", str(cfg)])


def test_a_misspelled_flag_is_two_lines_with_the_closest_flag(capsys):
    with pytest.raises(SystemExit) as e:
        run_train(["--dataset", "dtd", "--epoch", "3", "--lr_warmup", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "usage:" not in err and len(err.splitlines()) == 2, err
    assert "unrecognized arguments: --epoch (did you mean --epochs?) 3 --lr_warmup 1" in err
    assert "train.py --help" in err


# ------------------------------------------------------------------------------------------------- resume
def test_resume_refuses_other_backbone_weights_and_accepts_run_local_changes(vtab, backbone_file, tmp_path,
                                                                                caplog):
    from models.backbones import create_backbone

    cut = tmp_path / "cut"
    with kill_after(0, 1), pytest.raises(Killed):
        run_train(_argv(vtab, cut, backbone_file))
    last = torch.load(cut / "last.pth", weights_only=False)
    assert set(last["specs"]) == {"model", "data", "optim", "run"}
    assert last["specs"]["model"]["weights"]["fingerprint"].startswith("sha256:")

    copy = tmp_path / "other_name.pth"
    copy.write_bytes(backbone_file.read_bytes())
    caplog.clear()
    assert run_train(_argv(vtab, cut, copy, "--resume", cut / "last.pth")) == 2
    assert any("--load_path" in e and "model spec, weights" in e for e in _error_lines(caplog))

    swapped = tmp_path / "swapped"
    swapped.mkdir()
    torch.manual_seed(1)
    target = swapped / backbone_file.name
    torch.save(create_backbone("vit_tiny_patch16_224", img_size=32).state_dict(), target)
    cut2 = tmp_path / "cut2"
    with kill_after(0, 1), pytest.raises(Killed):
        run_train(_argv(vtab, cut2, target))
    torch.manual_seed(2)
    torch.save(create_backbone("vit_tiny_patch16_224", img_size=32).state_dict(), target)  # same path, new tensors
    caplog.clear()
    assert run_train(_argv(vtab, cut2, target, "--resume", cut2 / "last.pth")) == 2
    errors = _error_lines(caplog)
    assert len(errors) == 1 and "other backbone weights" in errors[0] and "fingerprint" in errors[0]

    # run-local flags may change: the loader processes, TensorBoard, the evaluation batch
    assert run_train(_argv(vtab, cut, backbone_file, "--resume", cut / "last.pth", "--no-tensorboard",
                           "--batch_size_test", "8")) == 0
    assert read_results(cut)["specs"]["run"]["tensorboard"] is False


def test_last_pth_without_specs_still_resumes(vtab, tmp_path, caplog):
    cut = tmp_path / "old"
    with kill_after(0, 1), pytest.raises(Killed):
        run_train(_argv(vtab, cut, ""))
    from utils.checkpoint import CHECKSUM_KEY, save_checkpoint

    last = torch.load(cut / "last.pth", weights_only=False)
    del last["specs"], last[CHECKSUM_KEY]  # a file written before the specs: flags only
    save_checkpoint(last, str(cut / "last.pth"))
    caplog.set_level(logging.INFO)
    assert run_train(_argv(vtab, cut, "", "--lr", "0.5", "--resume", cut / "last.pth")) == 2
    assert "--lr: checkpoint 0.01 vs now 0.5" in caplog.text and "predates the run specs" in caplog.text
    caplog.clear()
    assert run_train(_argv(vtab, cut, "", "--resume", cut / "last.pth")) == 0
    assert "predates the run specs" in caplog.text
    assert read_results(cut)["epochs"] == 2


# --------------------------------------------------------------------------------------------- eval only
def test_eval_only_rebuilds_from_the_delta_spec_and_from_old_deltas(vtab, backbone_file, tmp_path):
    run = tmp_path / "run"
    assert run_train(_argv(vtab, run, backbone_file, "--fusion_size", "3", "--mean", "0.4,0.5,0.6")) == 0
    ck = torch.load(run / "delta.pth", weights_only=False)
    assert ck["model_spec"]["method"] == "dtl+" and ck["model_spec"]["mean"] == [0.4, 0.5, 0.6]
    top1 = read_results(run)["top1"]
    ev_argv = ["--data_dir", vtab, "--dataset", "dsprites_loc", "--num_workers", "0", "--batch_size_test", "16",
               "--load_path", backbone_file, "--eval_only"]
    ev = tmp_path / "ev"
    assert run_train(ev_argv + ["--checkpoint", run / "delta.pth", "--output_dir", ev]) == 0
    res = read_results(ev)
    assert res["top1"] == top1 and res["method"] == "dtl+" and res["specs"]["model"]["mean"] == [0.4, 0.5, 0.6]
    assert res["args"]["fusion_size"] == 3 and res["args"]["img_size"] == 32

    from utils.checkpoint import CHECKSUM_KEY, save_checkpoint

    old = {k: v for k, v in ck.items() if k not in ("model_spec", CHECKSUM_KEY)}  # a delta written before specs
    save_checkpoint(old, str(tmp_path / "old_delta.pth"))
    ev_old = tmp_path / "ev_old"
    assert run_train(ev_argv + ["--checkpoint", tmp_path / "old_delta.pth", "--output_dir", ev_old]) == 0
    res_old = read_results(ev_old)
    assert res_old["method"] == "dtl+" and res_old["specs"]["model"]["mean"] == [0.5, 0.5, 0.5]  # the backbone's


# ------------------------------------------------------------------------------------------------- --config
@pytest.mark.parametrize("text, needle", [
    ("dataset: dtd\nlr:\n", "'lr' has no value"),
    ("dataset: dtd\ndata_dir:\n", "'data_dir' has no value"),
    ("dataset: dtd\nbatch_size:\n", "'batch_size' has no value"),
    ("a: &x [1, 2]\nlr: *x\n", "YAML aliases (*x) are not supported"),
    ("a: &a [1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
     "d: [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n", "aliases"),
    ("dataset: dtd\nlr: " + "x" * 5000 + "\n", "bad value for 'lr'"),
    ("dataset: dtd\nseeds: " + "[" * 50, "not valid YAML: line"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, caplog, text, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    assert run_train(["--config", cfg, "--output_dir", tmp_path / "o"]) == 2
    errors = _error_lines(caplog)
    assert len(errors) == 1 and needle in errors[0] and "\n" not in errors[0] and len(errors[0]) < 600
    assert not os.path.exists(tmp_path / "o")


def test_config_yaml_records_the_specs_and_is_usable_as_config(vtab, tmp_path):
    import yaml

    out = tmp_path / "run"
    assert run_train(_argv(vtab, out, "", "--epochs", "1")) == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert set(cfg["specs"]) == {"model", "data", "optim", "run"} and cfg["specs"]["optim"]["lr"] == 1e-2
    again = tmp_path / "again"
    assert run_train(["--config", out / "config.yaml", "--output_dir", again]) == 0
    assert read_results(again)["top1"] == read_results(out)["top1"]


# --------------------------------------------------------------------------------------------- registry
def test_method_registry():
    from methods import Method, get_method, method_names, methods_with, register_method
    from models.factory import METHODS, create_tuned_model

    assert METHODS == method_names() and METHODS[0] == "dtl" and "lora" in METHODS
    assert get_method("dtl+") is get_method("dtl")
    assert get_method("dtl").results_name({"fusion_size": 3}) == "dtl+"
    assert get_method("dtl").results_name({"fusion_size": 0}) == "dtl"
    assert get_method("lora").results_name({}) == "lora"
    for cap in ("lean", "prefix_cache", "delta_folder", "uses_dtl_flags"):
        assert methods_with(cap) == ("dtl",)
    with pytest.raises(ValueError, match="already registered"):
        register_method(Method(name="lora", builder=lambda *a, **k: None))
    with pytest.raises(ValueError, match="unknown --method 'nope'"):
        get_method("nope")
    with torch.device("meta"):
        m = create_tuned_model("linear", "vit_tiny_patch16_224", 3, img_size=32)
    assert m.model_config()["method"] == "linear"


def test_every_registered_method_resolves_and_builds():
    """The registry names its model code by import path (so that it loads without torch): every path of every
    registered method must import, and every method build, check and describe a model."""
    from methods import get_method, method_names
    from methods.builtin import BASELINES
    from methods.registry import resolve
    from models.baselines import BASELINE_METHODS

    assert set(BASELINES) == set(BASELINE_METHODS), "a BaselineModel without its line in methods/builtin.py"
    for name in method_names():
        method = get_method(name)
        for ref in (method.builder, method.config_class, method.model_config_reader, method.checker):
            if ref is not None:
                assert callable(resolve(ref)), (name, ref)
        with torch.device("meta"):
            model = method.build("vit_tiny_patch16_224", 3, method.config_from_dict({}), img_size=32)
        assert method.check(model) is None, name
        config = method.config_from_model(model.model_config())
        assert method.config_to_dict(method.config_from_dict(config)) == config, name
        assert method.results_name(config) == name


def test_a_method_registered_from_code_reaches_the_flags_and_the_factory(monkeypatch):
    """Adding a method is one registry line: --method, its capability checks and the factory take it."""
    from cli.flags import parse_args, resolved_method
    from methods import Method, registry
    from models.baselines import create_baseline_model
    from models.factory import create_tuned_model

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_BY_NAME", dict(registry._BY_NAME))

    def build(method, model_name, num_classes, config, lean=False, **kwargs):
        return create_baseline_model("linear", model_name, num_classes, **kwargs)

    registry.register_method(Method(name="probe", builder=build))
    args = parse_args(["--dataset", "dtd", "--method", "probe"])
    assert resolved_method(args) == "probe"
    with pytest.raises(UsageError, match="--lean applies to --method dtl .* not to --method probe"):
        parse_args(["--dataset", "dtd", "--method", "probe", "--lean"])
    with pytest.raises(ModelSettingsError, match="lean mode .* not for --method probe"):
        create_tuned_model("probe", "vit_tiny_patch16_224", 3, lean=True, img_size=32)
    with torch.device("meta"):
        assert create_tuned_model("probe", "vit_tiny_patch16_224", 3, img_size=32).model_config()["method"] == "linear"


def test_method_references_are_checked():
    from methods.registry import resolve

    assert resolve("os.path:join") is os.path.join
    for bad in ("os.path.join", ":join", "os.path:"):
        with pytest.raises(ValueError, match="not a 'package.module:attribute' reference"):
            resolve(bad)
    with pytest.raises(AttributeError):
        resolve("os.path:no_such_function")


@pytest.mark.parametrize("load_path, kind", [("", "random"), ("timm", "timm"), ("/w/ViT-B_16.npz", "file")])
def test_weights_spec_gives_back_its_load_path(load_path, kind):
    w = WeightsSpec.from_load_path(load_path)
    assert (w.kind, w.load_path) == (kind, load_path)
