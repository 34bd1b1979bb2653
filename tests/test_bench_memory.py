"""tools/bench_memory.py: the CLI, its JSON, and the relations its numbers must show."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import bench_memory  # noqa: E402

TINY = ["--model", "vit_tiny_patch16_224", "--model_kwargs", "embed_dim=32,depth=2,num_heads=2,patch_size=8",
        "--img_size", "32", "--batch_size", "4", "--warmup", "1", "--steps", "1", "--threads", "1"]
KEYS = {"method", "device", "batch_size", "img_size", "precision", "fused_attn", "saved_mib", "peak_alloc_mib",
        "peak_reserved_mib", "peak_rss_mib", "step_s", "images_per_s", "n_trainable"}


def test_cli_writes_the_documented_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench_memory.py"), *TINY, "--methods", "linear,dtl",
                           "--json", str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["linear", "dtl"]
    for r in rows:
        assert set(r) == KEYS
        assert r["device"] == "cpu" and r["batch_size"] == 4 and r["img_size"] == 32 and r["precision"] == "fp32"
        assert r["fused_attn"] is True
        assert r["peak_alloc_mib"] is None and r["peak_reserved_mib"] is None  # CPU
        assert r["saved_mib"] > 0 and r["peak_rss_mib"] > 0 and r["step_s"] > 0 and r["images_per_s"] > 0
    # linear probe: the head only (32 x 5... here 100 classes); DTL: 2 taps x 2 x (2 x 32) + head
    assert rows[0]["n_trainable"] == 32 * 100 + 100
    assert rows[1]["n_trainable"] == 2 * 2 * 2 * 32 + 32 * 100 + 100
    table = proc.stdout
    for text in ("vit_tiny_patch16_224", "img 32", "batch 4", "precision fp32", "fused attention on",
                 "fresh process per method", "saved MiB", "peak RSS"):
        assert text in table, text


def test_all_methods_in_process_and_their_order():
    res = {r["method"]: r for r in bench_memory.main([*TINY, "--in_process"])}
    assert set(res) == set(bench_memory.ALL_METHODS)
    saved = {m: r["saved_mib"] for m, r in res.items()}
    # the relations the paper's argument rests on (tiny model, same batch)
    assert saved["linear"] < saved["dtl"] < saved["lora"] < saved["full"]
    assert saved["dtl"] < saved["dtl+"] < saved["full"]
    assert saved["ssf"] > saved["full"]  # SSF keeps every scaled output as well
    assert res["full"]["n_trainable"] > res["lora"]["n_trainable"] > res["linear"]["n_trainable"]


def test_explicit_attention_and_bf16_are_applied():
    fused = bench_memory.main([*TINY, "--in_process", "--methods", "full"])[0]
    explicit = bench_memory.main([*TINY, "--in_process", "--methods", "full", "--fused_attn", "off"])[0]
    assert explicit["fused_attn"] is False and explicit["saved_mib"] > fused["saved_mib"]  # attention matrices kept
    bf16 = bench_memory.main([*TINY, "--in_process", "--methods", "dtl", "--precision", "bf16"])[0]
    fp32 = bench_memory.main([*TINY, "--in_process", "--methods", "dtl"])[0]
    assert bf16["precision"] == "bf16" and bf16["saved_mib"] < fp32["saved_mib"]


@pytest.mark.parametrize("argv,message", [
    (["--methods", "full,lst"], "unknown \\['lst'\\]"),
    (["--methods", "dtl,dtl"], "twice"),
    (["--batch_size", "0"], "--batch_size must be >= 1"),
    (["--model", "resnet50"], "--model: unsupported backbone"),
    (["--model_kwargs", "depth"], "key=value"),
    (["--model", "swin_tiny_patch4_window7_224", "--methods", "vpt"], "vpt is implemented for ViT"),
    (["--json", "/nonexistent/dir/x.json"], "does not exist"),
])
def test_bad_arguments_stop_before_any_work(argv, message):
    with pytest.raises(SystemExit, match=message):
        bench_memory.main([*TINY, *argv])
