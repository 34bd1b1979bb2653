#!/usr/bin/env python3
"""Generate (or ``--check``) the 136 launchers under ``train_scripts/`` from ``train_scripts/hparams.tsv``.

The table holds every per-dataset setting of the original launchers (docs/method.md, section 4). Layout written:

    train_scripts/vit/vtab/<task>/train_dtl.sh, train_dtl+.sh                     (38)
    train_scripts/swin/vtab/<task>/train_dtl.sh, train_dtl+.sh                    (38)
    train_scripts/vit/few_shot/<dataset>-FS/train_dtl_shot_<k>.sh, ...+...        (50)
    train_scripts/vit/domain_generalization/<target>/train_dtl.sh, train_dtl+.sh  (10)

Usage::

    python tools/make_launchers.py            # (re)write them
    python tools/make_launchers.py --check    # exit 1 if any launcher differs from the table or is missing/extra
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from data.benchmarks import get_benchmark  # noqa: E402

SCRIPTS = os.path.join(REPO, "train_scripts")
TABLE = os.path.join(SCRIPTS, "hparams.tsv")

# DTL, ViT-B/16, VTAB-1k top-1 of the paper (docs/method.md, section 5).
PAPER_DTL_VIT_VTAB = {
    "cifar_100": 69.6, "caltech101": 94.8, "dtd": 71.3, "flowers102": 99.3, "pets": 91.3, "svhn": 83.3,
    "sun397": 56.2, "patch_camelyon": 87.1, "eurosat": 96.2, "resisc45": 86.1, "diabetic_retinopathy": 75.0,
    "clevr_count": 82.8, "clevr_dist": 64.2, "dmlab": 48.8, "kitti": 81.9, "dsprites_loc": 93.9,
    "dsprites_ori": 53.9, "smallnorb_azi": 34.2, "smallnorb_ele": 47.1,
}

@dataclass(frozen=True)
class LauncherBackbone:
    """One ``backbone`` value of the table: the paper's backbone, its launchers' defaults and their comments."""

    model: str            # --model (the original's name)
    default_load: str     # LOAD_PATH default
    title: str            # in the first comment line
    load_doc: str         # the LOAD_PATH lines of the usage comment
    vtab_note: str        # the paper comment of a VTAB-1k launcher without a recorded number ({method}, {dataset})
    vtab_numbers: Dict[str, Dict[str, float]] = field(default_factory=dict)  # method -> task -> paper top-1


BACKBONES = {
    "vit": LauncherBackbone(
        "vit_base_patch16_224_in21k", "/path/to/ViT-B_16.npz", "ViT-B/16 (ImageNet-21k)",
        "#   LOAD_PATH   Google's ViT-B_16.npz (ImageNet-21k); 'timm' = timm's copy (downloaded);\n"
        "#               empty = random initialisation (a loud warning; for tests only).",
        "# Paper: see the paper's VTAB-1k results for DTL+ on ViT-B/16 (group-mean average ~77.7);\n"
        "# the per-task DTL+ number is not recorded here.",
        {"dtl": PAPER_DTL_VIT_VTAB},
    ),
    "swin": LauncherBackbone(
        "swin_base_patch4_window7_224_in22k", "timm", "Swin-B (ImageNet-22k, window 7, 224)",
        "#   LOAD_PATH   Swin-B weights: 'timm' (default) downloads timm's swin_base_patch4_window7_224.ms_in22k,\n"
        "#               as the original did; or a local .pth/.safetensors file; empty = random init.",
        "# Paper: see the paper's Swin-B VTAB-1k results ({method}, {dataset}); no number is recorded here.",
    ),
}


def read_table(path: str = TABLE) -> List[Dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def launcher_path(row: Dict[str, str]) -> str:
    """Path of a row's launcher, relative to the repository root."""
    shot = f"_shot_{row['shot']}" if get_benchmark(row["benchmark"]).shot_in_names else ""
    name = f"train_{row['method']}{shot}.sh"
    return os.path.join("train_scripts", row["backbone"], row["benchmark"], row["dataset"], name)


def paper_comment(row: Dict[str, str]) -> str:
    b, bench, ds, m = BACKBONES[row["backbone"]], row["benchmark"], row["dataset"], row["method"]
    if bench == "vtab":
        numbers = b.vtab_numbers.get(m)
        if numbers is not None:
            return f"# Paper (DTL, ViT-B/16, VTAB-1k {ds}): {numbers[ds]:.1f} top-1."
        return b.vtab_note.format(method=m.upper(), dataset=ds)
    if bench == "few_shot":
        return (f"# Paper: see the paper's few-shot FGFS results ({ds}, {row['shot']}-shot, {m.upper()}, mean of "
                f"seeds 0,1,2);\n# no number is recorded here.")
    return (f"# Paper: see the paper's domain-generalisation results ({m.upper()}, target {ds}, mean of seeds 0,1,2);\n"
            f"# no number is recorded here.")


def _flags(row: Dict[str, str]) -> List[Tuple[str, str]]:
    model = BACKBONES[row["backbone"]].model
    flags = [
        ("--benchmark", row["benchmark"]),
        ("--dataset", row["dataset"]),
    ]
    if get_benchmark(row["benchmark"]).shot == "required":
        flags.append(("--shot", row["shot"]))
    flags += [
        ("--model", model),
        ("--method", "dtl"),
        ("--batch_size", row["batch_size"]),
        ("--batch_size_test", row["batch_size_test"]),
        ("--epochs", row["epochs"]),
        ("--warmup_epochs", row["warmup_epochs"]),
        ("--fusion_size", row["fusion_size"]),
        ("--r", row["r"]),
        ("--beta", row["beta"]),
        ("--lora_before_blocks", row["csn_blocks"]),
        ("--add_after_blocks", row["add_back_blocks"]),
        ("--weight_decay", row["weight_decay"]),
        ("--lr", row["lr"]),
        ("--drop_path", row["drop_path"]),
    ]
    if row["amp"] == "yes":
        flags.append(("--amp", ""))
    flags.append(("--prefetcher", ""))
    return flags


def repo_lines(up: str) -> List[str]:
    """The lines of a launcher ``up`` folders below the repository that find it (``DTL_ROOT`` when set) and
    source ``launch_common.sh``; a launcher copied elsewhere without ``DTL_ROOT`` stops with one line."""
    return [
        f'REPO="${{DTL_ROOT:-$(cd "$(dirname "${{BASH_SOURCE[0]}}")/{up}" && pwd)}}"  # DTL_ROOT: the repository',
        'if [[ ! -f "$REPO/train_scripts/launch_common.sh" ]]; then',
        '  echo "error: no DTL repository at $REPO (the launcher was moved out of train_scripts/?): set DTL_ROOT to" \\',
        '       "the repository folder" >&2',
        "  exit 2",
        "fi",
        'source "$REPO/train_scripts/launch_common.sh"  # sets LAUNCH: python, or torchrun ... -- when NPROC > 1',
    ]


def render(row: Dict[str, str]) -> str:
    """The text of one launcher."""
    backbone = BACKBONES[row["backbone"]]
    default_load, bb_name, load_doc = backbone.default_load, backbone.title, backbone.load_doc
    bench = get_benchmark(row["benchmark"])
    method = row["method"].upper()  # hparams.tsv: dtl / dtl+
    what = f"{bench.title} {row['dataset']}" + (f", {row['shot']}-shot" if bench.shot == "required" else "")
    proto = "\n".join("# " + line for line in f"Protocol: {bench.protocol}".split("\n"))
    lines = [
        "#!/usr/bin/env bash",
        f"# {method} on {bb_name}, {what}: the original launcher's settings.",
        paper_comment(row),
        proto,
        "# Generated by tools/make_launchers.py from train_scripts/hparams.tsv (edit the table, then regenerate).",
        "#",
        f"# Usage: bash {launcher_path(row)} [extra train.py flags, e.g. --epochs 1 --output_dir DIR]",
        "#   DATA_DIR    the benchmark root (see the README's data preparation).",
        load_doc,
        "#   NPROC       processes (GPUs) on this machine; >1 runs torchrun (--batch_size stays the global batch).",
        "#   Environment variables of the same names override the values below; so do PYTHON and TORCHRUN_ARGS",
        "#   (extra torchrun flags for several nodes: --nnodes --node_rank --master_addr --master_port) and DTL_ROOT",
        "#   (the repository, for a launcher copied elsewhere).",
        "",
        f'DATA_DIR="${{DATA_DIR-{bench.launcher_data_dir}}}"',
        f'LOAD_PATH="${{LOAD_PATH-{default_load}}}"',
        'NPROC="${NPROC-1}"',
        "",
        "set -euo pipefail",
        *repo_lines("../../../.."),
        "",
        '# exec: this PID becomes the training (or torchrun) process, so signals sent to the launcher reach it.',
        'exec "${LAUNCH[@]}" "$REPO/train.py" \\',
        '    --data_dir "$DATA_DIR" \\',
        '    --load_path "$LOAD_PATH" \\',
    ]
    for flag, value in _flags(row):
        lines.append(f"    {flag} {value} \\" if value else f"    {flag} \\")
    lines.append('    "$@"')
    return "\n".join(lines) + "\n"


COMMON = """\
# Sourced by every launcher: picks the Python interpreter and builds LAUNCH (an array) from NPROC.
# The launcher then `exec`s "${LAUNCH[@]}" train.py ...: its PID becomes the Python (or torchrun) process, so
# signals sent to the launcher reach the training.
#   PYTHON        interpreter (default: the repository's .venv, else python3, which must have torch)
#   NPROC         processes on this node; > 1 -> python tools/torchrun.py --nproc_per_node NPROC (torchrun, with
#                 train.py's exit statuses: 2, 130/143, and no torchrun traceback or failure report)
#   TORCHRUN_ARGS extra torchrun flags, e.g. "--nnodes 2 --node_rank 0 --master_addr host0 --master_port 29500"
if [[ -n "${PYTHON:-}" ]]; then
  if ! command -v "$PYTHON" > /dev/null; then
    echo "error: PYTHON=$PYTHON: no such interpreter (unset it to use $REPO/.venv, made by" \\
         "'bash scripts/setup_env.sh')" >&2
    exit 2
  fi
else
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
  # find_spec looks torch up without importing it (a few milliseconds)
  if ! "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)" 2> /dev/null; then
    echo "error: $PYTHON cannot import torch: run 'bash scripts/setup_env.sh' (creates $REPO/.venv, which the" \\
         "launchers use), or set PYTHON= to an interpreter with requirements.txt installed" >&2
    exit 2
  fi
fi
if ! [[ "${NPROC:-1}" =~ ^[1-9][0-9]*$ ]]; then
  echo "NPROC must be a positive integer, got '${NPROC}'" >&2
  exit 2
fi
if (( ${NPROC:-1} > 1 )) || [[ -n "${TORCHRUN_ARGS:-}" ]]; then
  # "--" ends torchrun's own options: without it torchrun's parser also reads train.py's flags (and refuses
  # e.g. --r as an ambiguous abbreviation of its --rdzv-*/--role/--run-path/--redirects).
  # shellcheck disable=SC2206  # TORCHRUN_ARGS is split on purpose
  LAUNCH=("$PYTHON" "$REPO/tools/torchrun.py" --nproc_per_node "${NPROC:-1}" ${TORCHRUN_ARGS:-} --)
else
  LAUNCH=("$PYTHON")
fi
"""


def expected_files(table: str = TABLE) -> Dict[str, str]:
    """Relative path -> content of every generated file."""
    files = {os.path.join("train_scripts", "launch_common.sh"): COMMON}
    for row in read_table(table):
        files[launcher_path(row)] = render(row)
    return files


def existing_launchers() -> List[str]:
    out = []
    for sub in BACKBONES:
        for dirpath, _, names in os.walk(os.path.join(SCRIPTS, sub)):
            out += [os.path.relpath(os.path.join(dirpath, n), REPO) for n in names if n.endswith(".sh")]
    return sorted(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--check", action="store_true", help="verify instead of writing; exit 1 on any difference")
    p.add_argument("--table", default=TABLE, help="hparams table (default: train_scripts/hparams.tsv)")
    args = p.parse_args(argv)
    files = expected_files(args.table)
    n_launchers = len(files) - 1
    if args.check:
        problems = []
        for rel, text in files.items():
            path = os.path.join(REPO, rel)
            if not os.path.isfile(path):
                problems.append(f"missing: {rel}")
            elif open(path, encoding="utf-8").read() != text:
                problems.append(f"differs from the table: {rel}")
            elif rel.endswith(".sh") and "launch_common" not in rel and not os.access(path, os.X_OK):
                problems.append(f"not executable: {rel}")
        extra = sorted(set(existing_launchers()) - set(files))
        problems += [f"not generated from the table (remove it or add a row): {e}" for e in extra]
        for prob in problems:
            print(prob)
        print(f"{n_launchers} launchers expected; " + ("all match" if not problems else f"{len(problems)} problem(s)"))
        return 1 if problems else 0
    for rel, text in files.items():
        path = os.path.join(REPO, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        if "launch_common" not in rel:
            os.chmod(path, 0o755)
    print(f"wrote {n_launchers} launchers + train_scripts/launch_common.sh from {os.path.relpath(args.table, REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
