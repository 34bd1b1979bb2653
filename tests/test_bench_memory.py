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


def test_lean_dtl_keeps_less_than_dtl():
    res = {r["method"]: r for r in bench_memory.main([*TINY, "--in_process", "--methods", "dtl,dtl-lean,dtl+,dtl+-lean"])}
    assert res["dtl-lean"]["saved_mib"] < res["dtl"]["saved_mib"]
    assert res["dtl+-lean"]["saved_mib"] < res["dtl+"]["saved_mib"]
    assert res["dtl-lean"]["n_trainable"] == res["dtl"]["n_trainable"]


@pytest.mark.parametrize("argv,message", [
    (["--methods", "full,lst"], "unknown \\['lst'\\]"),
    (["--methods", "dtl,dtl"], "twice"),
    (["--batch_size", "0"], "--batch_size must be >= 1"),
    (["--model", "resnet50"], "--model: unsupported backbone"),
    (["--model_kwargs", "depth"], "key=value"),
    (["--model", "swin_tiny_patch4_window7_224", "--methods", "vpt"], "--methods vpt: --method vpt is not implemented for swin"),
    (["--json", "/nonexistent/dir/x.json"], "does not exist"),
])
def test_bad_arguments_stop_before_any_work(argv, message):
    with pytest.raises(SystemExit, match=message):
        bench_memory.main([*TINY, *argv])


# ---------------------------------------------------------------------------------------------------------------
# tools/plot_memory.py
# ---------------------------------------------------------------------------------------------------------------
import plot_memory  # noqa: E402


def _bench_rows(**over):
    base = {k: None for k in KEYS}
    base.update(device="cpu", batch_size=8, img_size=224, precision="fp32", fused_attn=True, n_trainable=1)
    rows = []
    for m, mib in (("full", 901.5), ("lora", 616.4), ("dtl", 319.3), ("dtl+", 347.0), ("dtl-lean", 55.0)):
        rows.append({**base, "method": m, "saved_mib": mib, **over.get(m, {})})
    return rows


def test_plot_uses_own_complete_results_and_marks_published(tmp_path):
    bench = tmp_path / "b.json"
    bench.write_text(json.dumps(_bench_rows()))
    agg = tmp_path / "aggregate_vtab_summary.csv"
    agg.write_text("backbone,method,natural,specialized,structured,mean_of_group_means,mean_19_tasks,n_tasks,partial\n"
                   "vit_base_patch16_224_in21k,dtl,80.0,86.0,63.0,76.3333,74.1,19/19,\n"
                   "vit_base_patch16_224_in21k,lora,80.0,86.0,63.0,70.0,74.0,3/19,mean_of_group_means\n")
    out = tmp_path / "figs" / "m.png"
    points = {p["method"]: p for p in plot_memory.main(["--bench", str(bench), "--results", str(agg), "--out", str(out),
                                                        "--accuracy", "dtl+=77.0"])}
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert points["dtl"]["source"] == "own" and points["dtl"]["accuracy"] == pytest.approx(76.3333)
    assert points["lora"]["source"] == "published"  # 3/19 tasks: not comparable, the published number is used
    assert points["lora"]["accuracy"] == plot_memory.PUBLISHED_VTAB_GROUP_MEAN["lora"][0]
    assert points["dtl+"]["source"] == "override" and points["dtl+"]["accuracy"] == 77.0
    assert points["dtl-lean"]["accuracy"] == plot_memory.PUBLISHED_VTAB_GROUP_MEAN["dtl"][0]
    assert points["full"]["memory"] == 901.5
    only_own = plot_memory.main(["--bench", str(bench), "--results", str(agg), "--out", str(out), "--no_published"])
    assert [p["method"] for p in only_own] == ["dtl"]


def test_plot_refuses_bad_input(tmp_path):
    bench = tmp_path / "b.json"
    bench.write_text(json.dumps(_bench_rows(dtl={"batch_size": 32})))
    with pytest.raises(SystemExit, match="different settings"):
        plot_memory.main(["--bench", str(bench)])
    with pytest.raises(SystemExit, match="file not found"):
        plot_memory.main(["--bench", str(tmp_path / "none.json")])
    bench.write_text(json.dumps(_bench_rows()))
    with pytest.raises(SystemExit, match="not a number"):
        plot_memory.main(["--bench", str(bench), "--accuracy", "dtl=high"])
    bad = tmp_path / "agg.csv"
    bad.write_text("method,top1\ndtl,70\n")
    with pytest.raises(SystemExit, match="aggregate.py VTAB CSV"):
        plot_memory.main(["--bench", str(bench), "--results", str(bad)])
