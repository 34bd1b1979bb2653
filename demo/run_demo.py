#!/usr/bin/env python3
"""The embedded demo: pre-train a small ViT, transfer it with DTL, DTL+ and a linear probe through the real
launchers, print the aggregated table. CPU only, about two minutes on two cores.

1. Data: a learnable VTAB-1k-layout root from ``data.synthetic`` (procedural scenes in the spirit of VTAB's
   dSprites/CLEVR tasks) holding two different tasks: the pre-training task ``pets`` (37 classes: shape x colour
   x background, 2000 training images) and the transfer task ``eurosat`` (10 classes: colour x object size, a
   different label space; 500 training images -- half of VTAB-1k's 1000 -- and 300 test images).
2. Pre-training: ``train.py --method full`` on ``pets`` (a ViT with ViT-Ti's 12 blocks at width 64, 8 x 8
   patches of 32 x 32 images), then its backbone is written as a Google-layout ``.npz`` -- the format of the
   paper's ``ViT-B_16.npz`` -- with :func:`models.npz.save_vit_npz`.
3. Transfer: ``DATA_DIR=... LOAD_PATH=<the .npz> bash train_scripts/vit/vtab/eurosat/train_dtl.sh`` (and
   ``train_dtl+.sh``, and ``train_dtl.sh --method linear``): the launchers' own recipe (learning rate, drop path,
   fusion size, blocks, batch 32) with only the model size, image size and epoch count overridden.
4. ``tools/aggregate.py`` prints the VTAB table of the three transferred models.

Usage: ``bash run_demo.sh`` (sets up .venv first) or ``python demo/run_demo.py [--workdir DIR]``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PRE_TASK, PRE_CLASSES = "pets", 37
TASK, TASK_CLASSES = "eurosat", 10
MODEL = ["--model", "vit_tiny_patch16_224", "--model_kwargs", "embed_dim=64,num_heads=2,patch_size=8",
         "--img_size", "32"]
RUNTIME = ["--num_workers", "0", "--no-amp", "--no-prefetcher", "--batch_size_test", "300"]
PRETRAIN_EPOCHS = 12
TRANSFER_EPOCHS = 10  # + 1 warm-up epoch


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def run(cmd, env=None, log=None) -> None:
    """Run a command; its output goes to ``log`` (its end is shown if it fails)."""
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run([str(c) for c in cmd], env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode != 0:
        print(open(log).read()[-5000:])
        raise SystemExit(f"demo step failed (exit {proc.returncode}): {' '.join(map(str, cmd))}")


def top1(run_dir: str) -> float:
    with open(os.path.join(run_dir, "results.json")) as f:
        return json.load(f)["top1"]


# The project's modules are imported inside the functions that use them: `run_demo.sh --help` runs this file
# before the environment (torch, timm) is set up.


def make_data(root: str) -> None:
    from data.synthetic import make_vtab_root

    make_vtab_root(root, tasks=(PRE_TASK,), n_train=1600, n_val=400, n_test=300, img_size=32, seed=0)
    make_vtab_root(root, tasks=(TASK,), n_train=400, n_val=100, n_test=300, img_size=32, seed=1)


def export_npz(pre_dir: str, npz_path: str) -> None:
    """The pre-trained backbone (from the full fine-tuning delta) as a Google-layout .npz."""
    import torch

    from models.baselines import create_baseline_model
    from models.npz import save_vit_npz
    from models.trainable import load_delta_state_dict

    ck = torch.load(os.path.join(pre_dir, "delta.pth"), map_location="cpu", weights_only=True)
    kwargs = dict(ck["model_kwargs"])
    model = create_baseline_model("full", ck["backbone"], ck["model_config"]["num_classes"], **kwargs)
    load_delta_state_dict(model, ck["delta"], source=os.path.join(pre_dir, "delta.pth"))
    save_vit_npz(model.backbone, npz_path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="bash run_demo.sh", allow_abbrev=False,
        description="The DTL demo on generated data (CPU, about two minutes after setup): pre-train a small ViT, "
                    "transfer it with DTL, DTL+ and a linear probe through the launchers, print the results table. "
                    "run_demo.sh sets up .venv/ first when it is missing (python demo/run_demo.py skips that).")
    p.add_argument("--workdir", default=os.path.join(REPO, "demo_output"), help="where data and runs go")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or
                   min(2, os.cpu_count() or 1), help="CPU threads per training process")
    args = p.parse_args(argv)
    start = time.time()
    work = os.path.abspath(args.workdir)
    marker = os.path.join(work, ".dtl_demo_workdir")
    if os.path.exists(work) and not os.path.isdir(work):
        p.error(f"--workdir {work}: exists and is not a folder")
    if os.path.isdir(work) and os.listdir(work) and not os.path.isfile(marker):
        p.error(f"--workdir {work}: not empty and not a folder an earlier demo made; the demo deletes its workdir "
                f"before it starts, so give a new or empty folder")
    if os.path.exists(work):
        shutil.rmtree(work)
    os.makedirs(work)
    open(marker, "w").close()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    py = sys.executable
    root = os.path.join(work, "data")

    banner(f"1/4 data: generated VTAB-layout root with '{PRE_TASK}' (pre-training) and '{TASK}' (transfer)")
    make_data(root)
    print(f"{root}: {PRE_TASK} 2000 train / 300 test, {TASK} 500 train / 300 test (32 x 32 px)")

    banner(f"2/4 pre-training a small ViT on '{PRE_TASK}' (train.py --method full, {PRETRAIN_EPOCHS} epochs)")
    pre = os.path.join(work, "pretrain")
    run([py, os.path.join(REPO, "train.py"), "--data_dir", root, "--dataset", PRE_TASK, "--method", "full", *MODEL,
         *RUNTIME, "--epochs", PRETRAIN_EPOCHS, "--warmup_epochs", "1", "--lr", "1e-3", "--batch_size", "32",
         "--load_path", "", "--output_dir", pre], env=env, log=os.path.join(work, "logs", "pretrain.log"))
    npz = os.path.join(work, "demo_vit.npz")
    export_npz(pre, npz)
    print(f"pre-training top-1 on {PRE_TASK}: {top1(pre):.1f}% (chance {100 / PRE_CLASSES:.1f}%); "
          f"backbone saved as {npz}")

    banner(f"3/4 transfer to '{TASK}' through train_scripts/vit/vtab/{TASK}/ (DTL, DTL+, linear probe)")
    out = os.path.join(work, "runs")
    launchers = os.path.join(REPO, "train_scripts", "vit", "vtab", TASK)
    jobs = [("dtl", "train_dtl.sh", []), ("dtl+", "train_dtl+.sh", []), ("linear", "train_dtl.sh", ["--method", "linear"])]
    results = {}
    for name, script, extra in jobs:
        run_dir = os.path.join(out, "vtab", TASK, name)
        cmd = ["bash", os.path.join(launchers, script), *MODEL, *RUNTIME, "--epochs", TRANSFER_EPOCHS,
               "--warmup_epochs", "1", *extra, "--output_dir", run_dir]
        print(f"DATA_DIR={root} LOAD_PATH={npz} \\\n    bash {os.path.relpath(cmd[1], REPO)} "
              + " ".join(map(str, cmd[2:])).replace(work, "$WORK"), flush=True)
        run(cmd, env=dict(env, DATA_DIR=root, LOAD_PATH=npz), log=os.path.join(work, "logs", f"{name}.log"))
        results[name] = top1(run_dir)
        print(f"  -> {name}: top-1 {results[name]:.1f}%", flush=True)
    banner("4/4 tools/aggregate.py " + os.path.relpath(out, REPO))
    proc = subprocess.run([py, os.path.join(REPO, "tools", "aggregate.py"), out, "--out",
                           os.path.join(work, "table.md"), "--fig_dir", os.path.join(work, "figs")],
                          cwd=REPO, env=env, capture_output=True, text=True)
    print(proc.stdout)
    if proc.returncode != 0:
        print(proc.stderr)
        raise SystemExit("tools/aggregate.py failed")

    chance = 100.0 / TASK_CLASSES
    print(f"{TASK}: chance {chance:.1f}% | " + " | ".join(f"{k} {v:.1f}%" for k, v in results.items()))
    print("(generated data: this checks the whole pipeline end to end; it is not a measure of DTL's accuracy)")
    print(f"demo finished in {time.time() - start:.0f} s; everything is under {work}")
    weak = [k for k, v in results.items() if v < 2 * chance]
    if weak:
        print(f"WARNING: {', '.join(weak)} ended below twice the chance level")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
