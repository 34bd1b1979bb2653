#!/usr/bin/env bash
# One prepared check of everything the CPU test suite cannot exercise; under 8 minutes on one GPU.
#
#   bash tools/gpu_check.sh [OUT_DIR]        (default: gpu_check_out/ at the repository root)
#
# Always (CPU): the reference fixtures with tools/check_reference.py, the fixture comparison below on the CPU
# (fp32 and bf16 autocast), and a tiny launcher run. Without CUDA the script says so and exits 0 here.
# With CUDA:
#   1. the reference fixtures on the GPU: fp32 (TF32 off; logits/loss 1e-4 abs, gradients 1e-3 rel) and
#      fp16 / bf16 autocast (logits within 1e-2 / 4e-2 of the largest reference logit, + 1e-3);
#   2. a tiny launcher run with the launcher's --amp --prefetcher (fp16), and one with --amp_dtype bfloat16;
#   3. the same through torchrun --nproc_per_node 1 (NPROC=1 TORCHRUN_ARGS=--standalone), and a one-rank NCCL
#      all-reduce under torchrun (train.py starts no process group for a single process);
#   4. --cache_prefix --cache_storage device;  5. --lean;
#   6. tools/bench_memory.py --device cuda --precision fp16 --batch_size 32 (ViT-B/16, 224 px) for DTL, DTL+,
#      DTL lean, full fine-tuning, LoRA, AdaptFormer, beside the paper's figures (and DTL + full once more in
#      one process: empty_cache between methods);
#   7. tools/bench_train.py --device cuda images/s for default / lean / cache (ViT-B/16, fp16, batch 32);
#   8. the CUDA-only paths of issue 15 (tools/cuda_checks.py): the prefetcher's normaliser bitwise equal to
#      ToTensor, the memory peaks per phase, the host cache unpinned with pinned batches, the fp16 scaler resumed
#      from a scaler-less state, cuda:N + LOCAL_RANK, a --deterministic run killed and resumed = uninterrupted;
#      a --cache_storage host launcher run; a CPU (fp32) run resumed with fp16 --amp refused; the results of the
#      launcher runs recording their precision and training / evaluation / cache-build peaks (run_records);
#      with two or more GPUs, the launcher with NPROC=2.
# Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md (logs of every step in OUT_DIR/logs/); exit status 1
# when any step failed. Environment: PYTHON (default: the repository's .venv, else python3), FIXTURES (default:
# the repository's tests/fixtures/reference; the fixture checks are skipped when the folder is absent).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
OUT="$(mkdir -p "${1:-$REPO/gpu_check_out}" && cd "${1:-$REPO/gpu_check_out}" && pwd)"
FIXTURES="${FIXTURES:-$REPO/tests/fixtures/reference}"
mkdir -p "$OUT/logs"
: > "$OUT/steps.tsv"
cd "$REPO" || exit 1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
T_START=$SECONDS

# step NAME TIMEOUT_S CMD...: run, log to logs/NAME.log, record "NAME<TAB>rc<TAB>seconds" in steps.tsv
step() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS rc
  echo "== $name: $*" | tee "$OUT/logs/$name.log"
  timeout "$limit" bash -c '"$@"' "$name" "$@" >> "$OUT/logs/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$OUT/steps.tsv"
  if (( rc == 0 )); then echo "   ok ($((SECONDS - t0)) s)"; else echo "   FAILED (exit $rc; log: $OUT/logs/$name.log)"; tail -n 5 "$OUT/logs/$name.log"; fi
  return 0
}

# fixtures DEVICE PRECISIONS JSON: the reference fixtures on DEVICE under each precision (fp32, fp16, bf16)
fixtures() {
  "$PYTHON" - "$FIXTURES" "$@" <<'PY'
import glob, json, os, sys
import torch
import torch.nn.functional as F
from models.convert import convert_original_state_dict
from models.reference import model_from_fixture_config

root, device, precisions, out = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4]
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
TOL = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 4e-2}  # fp32: abs; autocast: relative to max |reference logit|
rows, failed = [], 0
for folder in sorted(glob.glob(os.path.join(root, "*"))):
    if not os.path.isfile(os.path.join(folder, "io.pt")):
        continue
    meta = json.load(open(os.path.join(folder, "meta.json")))
    io = torch.load(os.path.join(folder, "io.pt"), map_location="cpu", weights_only=True)
    ref_sd = torch.load(os.path.join(folder, "reference_state_dict.pt"), map_location="cpu", weights_only=True)
    for prec in precisions:
        torch.manual_seed(0)
        model = model_from_fixture_config(meta["config"])
        model.load_state_dict(convert_original_state_dict(ref_sd, model), strict=False)
        model.to(device).eval()
        x, labels = io["x"].float().to(device), io["labels"].to(device)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(prec)
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        ref = io["logits"].float()
        d_logits = (logits.detach().float().cpu() - ref).abs().max().item()
        d_loss = abs(loss.item() - float(io["loss"]))
        row = {"fixture": os.path.basename(folder), "device": device, "precision": prec, "logits_abs": d_logits,
               "loss_abs": d_loss}
        if prec == "fp32":
            grads = convert_original_state_dict(io["grads"], model)
            params = dict(model.named_parameters())
            rel = 0.0
            for n, g_ref in grads.items():
                g = params[n].grad.detach().cpu()
                scale = g_ref.abs().max().item()
                rel = max(rel, (g - g_ref).abs().max().item() / (scale if scale > 0 else 1.0))
            row["grads_rel"] = rel
            ok = d_logits <= TOL["fp32"] and d_loss <= TOL["fp32"] and rel <= 1e-3
            row["tolerance"] = "logits/loss 1e-4 abs, gradients 1e-3 rel"
        else:
            limit = TOL[prec] * ref.abs().max().item() + 1e-3
            ok = d_logits <= limit and d_loss <= limit
            row["tolerance"] = f"logits/loss {limit:.3g} abs ({TOL[prec]:g} x max |logit| + 1e-3)"
        row["ok"] = bool(ok)
        failed += not ok
        rows.append(row)
        print(("PASS" if ok else "FAIL"), json.dumps(row), flush=True)
if not rows:
    print(f"no fixtures under {root}", flush=True)
    sys.exit(3)
json.dump(rows, open(out, "w"), indent=1)
sys.exit(1 if failed else 0)
PY
}

# tiny_run NAME [launcher flags...]: a tiny ViT through the eurosat DTL launcher (generated data, random init)
tiny_run() {
  local name=$1; shift
  DATA_DIR="$OUT/data" LOAD_PATH="" bash train_scripts/vit/vtab/eurosat/train_dtl.sh \
    --model vit_tiny_patch16_224 --img_size 64 --num_workers 2 --batch_size 8 --batch_size_test 32 \
    --epochs 2 --warmup_epochs 1 --output_dir "$OUT/runs/$name" "$@"
}

export -f fixtures tiny_run
export PYTHON OUT FIXTURES REPO

echo "gpu_check: repository $REPO, output $OUT, python $PYTHON"
step environment 120 "$PYTHON" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.version.cuda); print('cuda available', torch.cuda.is_available()); [print(torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())]"
HAS_CUDA=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
rm -rf "$OUT/data" "$OUT/runs"
step make_data 120 "$PYTHON" tools/make_synthetic_data.py vtab "$OUT/data" --tasks eurosat --n_train 24 --n_val 8 --n_test 32 --img_size 64

# ---------------------------------------------------------------------------------------------- CPU parts
if [[ -d "$FIXTURES" ]]; then
  step reference_cpu 300 "$PYTHON" tools/check_reference.py "$FIXTURES"/*
  step fixtures_cpu 300 fixtures cpu fp32,bf16 "$OUT/fixtures_cpu.json"
else
  echo "gpu_check: no reference fixtures at $FIXTURES (set FIXTURES=...); fixture checks skipped"
fi
step launcher_cpu 300 tiny_run cpu --device cpu --num_workers 0

if [[ "$HAS_CUDA" != "1" ]]; then
  echo "gpu_check: no CUDA device (torch.cuda.is_available() is False): the GPU checks were not run."
  "$PYTHON" - "$OUT" 0 <<'PY'
import json, os, sys
out = sys.argv[1]
steps = [dict(zip(("step", "rc", "seconds"), l.rstrip("\n").split("\t"))) for l in open(os.path.join(out, "steps.tsv"))]
json.dump({"cuda": False, "steps": steps}, open(os.path.join(out, "gpu_check.json"), "w"), indent=1)
md = ["# gpu_check (no CUDA device: CPU parts only)", "", "| step | exit | seconds |", "|---|---:|---:|"]
md += [f"| {s['step']} | {s['rc']} | {s['seconds']} |" for s in steps]
open(os.path.join(out, "gpu_check.md"), "w").write("\n".join(md) + "\n")
PY
  echo "gpu_check: wrote $OUT/gpu_check.json, $OUT/gpu_check.md"
  if awk -F'\t' '$2 != 0 {bad=1} END {exit !bad}' "$OUT/steps.tsv"; then
    echo "gpu_check: a CPU step FAILED (see above)"
    exit 1
  fi
  exit 0
fi

# ---------------------------------------------------------------------------------------------- GPU parts
if [[ -d "$FIXTURES" ]]; then
  step fixtures_cuda 300 fixtures cuda fp32,fp16,bf16 "$OUT/fixtures_cuda.json"
fi
step launcher_amp_fp16 300 tiny_run amp_fp16
step launcher_amp_bf16 300 tiny_run amp_bf16 --amp_dtype bfloat16
step torchrun_launcher 300 env NPROC=1 TORCHRUN_ARGS="--standalone" bash -c 'tiny_run torchrun'
# train.py starts no process group for one process, so NCCL itself gets a one-rank all-reduce under torchrun
cat > "$OUT/nccl_check.py" <<'PY'
import os, torch, torch.distributed as dist
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group("nccl")
t = torch.ones(4, device="cuda") * (dist.get_rank() + 1)
dist.all_reduce(t)
assert t.tolist() == [float(dist.get_world_size() * (dist.get_world_size() + 1) // 2)] * 4, t
print("nccl all_reduce ok, world size", dist.get_world_size(), "nccl", torch.cuda.nccl.version())
dist.destroy_process_group()
PY
step torchrun_nccl 120 "$PYTHON" -m torch.distributed.run --nproc_per_node 1 --standalone "$OUT/nccl_check.py"
step cache_prefix_device 300 tiny_run cache_device --cache_prefix --cache_storage device
step cache_prefix_host 300 tiny_run cache_host --cache_prefix --cache_storage host
step lean 300 tiny_run lean --lean
step cuda_checks 420 "$PYTHON" tools/cuda_checks.py --data_dir "$OUT/data" --json "$OUT/cuda_checks.json"
# the CPU run trained in fp32 (--amp is float16, CPU: fp32); resuming it with fp16 on the GPU must be refused
step resume_precision_refused 120 bash -c 'tiny_run refused --resume "$OUT/runs/cpu/last.pth" > "$OUT/logs/refused.out" 2>&1; rc=$?; tail -n 3 "$OUT/logs/refused.out"; [[ $rc == 2 ]] && grep -q "precision: the checkpoint trained in fp32, this run would train in fp16" "$OUT/logs/refused.out"'
if (( $("$PYTHON" -c "import torch; print(torch.cuda.device_count())") >= 2 )); then
  step torchrun_2gpu 300 env NPROC=2 TORCHRUN_ARGS="--standalone" bash -c 'tiny_run torchrun2'
fi
step run_records 60 "$PYTHON" - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
want = {"amp_fp16": "fp16", "amp_bf16": "bf16", "cache_device": "fp16", "cache_host": "fp16", "lean": "fp16",
        "cpu": "fp32"}
bad = []
for name, precision in want.items():
    r = json.load(open(os.path.join(out, "runs", name, "results.json")))
    if r["precision"] != precision:
        bad.append(f"{name}: precision {r['precision']} (expected {precision})")
    if name == "cpu":
        continue
    train, ev, run = r["peak_memory_mib"], r["peak_memory_eval_mib"], r["peak_memory_run_mib"]
    if None in (train, ev, run) or not (train <= run and ev <= run):
        bad.append(f"{name}: peaks train {train} eval {ev} run {run}")
    if r["cache_prefix"] and (r["peak_memory_cache_build_mib"] is None or r["peak_memory_cache_build_mib"] > run):
        bad.append(f"{name}: cache build peak {r['peak_memory_cache_build_mib']}")
    print(name, r["precision"], "train", train, "eval", ev, "cache build", r["peak_memory_cache_build_mib"],
          "run", run, "storage", r.get("cache_storage"))
print("\n".join(bad) or "precision and memory peaks recorded as expected")
sys.exit(1 if bad else 0)
PY
step bench_memory 420 "$PYTHON" tools/bench_memory.py --device cuda --precision fp16 --batch_size 32 \
  --methods dtl,dtl+,dtl-lean,full,lora,adaptformer --json "$OUT/bench_memory.json"
step bench_memory_in_process 300 "$PYTHON" tools/bench_memory.py --device cuda --precision fp16 --batch_size 32 \
  --methods dtl,full --in_process --json "$OUT/bench_memory_in_process.json"
step bench_train 420 "$PYTHON" tools/bench_train.py --device cuda --amp fp16 --batch_size 32 --make_synthetic 320 \
  --modes default,lean,cache --epochs 3 --json "$OUT/bench_train.json"

# ---------------------------------------------------------------------------------------------- summary
"$PYTHON" - "$OUT" "$((SECONDS - T_START))" <<'PY'
import json, os, sys
out, total_s = sys.argv[1], int(sys.argv[2])
steps = [dict(zip(("step", "rc", "seconds"), l.rstrip("\n").split("\t"))) for l in open(os.path.join(out, "steps.tsv"))]
def load(name):
    p = os.path.join(out, name)
    return json.load(open(p)) if os.path.isfile(p) else None
report = {"cuda": True, "total_s": total_s, "steps": steps, "fixtures_cuda": load("fixtures_cuda.json"),
          "bench_memory": load("bench_memory.json"), "bench_memory_in_process": load("bench_memory_in_process.json"),
          "bench_train": load("bench_train.json"), "cuda_checks": load("cuda_checks.json"), "runs": {}}
for name in ("amp_fp16", "amp_bf16", "torchrun", "torchrun2", "cache_device", "cache_host", "lean"):
    r = load(os.path.join("runs", name, "results.json"))
    if r:
        report["runs"][name] = {k: r.get(k) for k in (
            "top1", "precision", "peak_memory_mib", "peak_memory_eval_mib", "peak_memory_cache_build_mib",
            "peak_memory_run_mib", "images_per_s", "train_time_s", "cache_prefix", "cache_storage", "lean",
            "world_size")}
# The paper's training memory, ViT-B/16, batch 32, 224 px, fp16 (GB)
PAPER_GB = {"dtl": 1.61, "dtl+": 1.71, "full": 4.71, "lora": 3.00, "adaptformer": 2.80}
md = [f"# gpu_check ({total_s} s)", "", "| step | exit | seconds |", "|---|---:|---:|"]
md += [f"| {s['step']} | {s['rc']} | {s['seconds']} |" for s in steps]
if report["fixtures_cuda"]:
    md += ["", "## Reference fixtures on CUDA", "", "| fixture | precision | logits abs | loss abs | grads rel | tolerance | ok |",
           "|---|---|---:|---:|---:|---|---|"]
    for r in report["fixtures_cuda"]:
        g = f"{r['grads_rel']:.2e}" if "grads_rel" in r else ""
        md.append(f"| {r['fixture']} | {r['precision']} | {r['logits_abs']:.2e} | {r['loss_abs']:.2e} | {g} | "
                  f"{r['tolerance']} | {'yes' if r['ok'] else 'NO'} |")
if report["bench_memory"]:
    md += ["", "## Training memory, ViT-B/16, batch 32, 224 px, fp16 (tools/bench_memory.py)", "",
           "GiB = torch.cuda.max_memory_allocated / reserved over 2^30 bytes; the paper's GB as printed (ViT-B/16, "
           "batch 32, 224 px, fp16).", "",
           "| method | peak allocated GiB | peak reserved GiB | paper GB | img/s |", "|---|---:|---:|---:|---:|"]
    for r in report["bench_memory"]:
        pa, pr = r.get("peak_alloc_mib"), r.get("peak_reserved_mib")
        paper = PAPER_GB.get(r["method"])
        ips = r.get("images_per_s")
        md.append(f"| {r['method']} | {pa / 1024:.2f} | {pr / 1024:.2f} | {paper if paper is not None else ''} | "
                  f"{'' if ips is None else f'{ips:.0f}'} |" if pa is not None and pr is not None else
                  f"| {r['method']} | – | – | {paper if paper is not None else ''} | |")
if report["bench_train"]:
    md += ["", "## Training speed, ViT-B/16, fp16, batch 32 (tools/bench_train.py)", "",
           "| mode | epoch s | images/s | speed-up | peak MiB | cache build s |", "|---|---:|---:|---:|---:|---:|"]
    for r in report["bench_train"]:
        ips = r["n_images"] / r["epoch_s"] if r.get("epoch_s") else None
        sp = r.get("speedup")
        cb = r.get("cache_build_s")
        md.append(f"| {r['mode']} | {r['epoch_s']:.2f} | {ips:.0f} | {'' if sp is None else f'{sp:.2f}'} | "
                  f"{r['peak_mib']:.0f} | {'' if cb is None else f'{cb:.1f}'} |")
if report["bench_memory_in_process"]:
    md += ["", "## bench_memory in one process (empty_cache between methods) vs a process per method", "",
           "| method | peak alloc MiB (one process) | peak alloc MiB (own process) | reserved (one) | reserved (own) |",
           "|---|---:|---:|---:|---:|"]
    own = {r["method"]: r for r in report["bench_memory"] or []}
    for r in report["bench_memory_in_process"]:
        o = own.get(r["method"], {})
        md.append(f"| {r['method']} | {r.get('peak_alloc_mib')} | {o.get('peak_alloc_mib')} | "
                  f"{r.get('peak_reserved_mib')} | {o.get('peak_reserved_mib')} |")
if report["cuda_checks"]:
    md += ["", "## CUDA-only paths (tools/cuda_checks.py)", "", "| check | status | details |", "|---|---|---|"]
    for r in report["cuda_checks"]:
        details = {k: v for k, v in r.items() if k not in ("check", "status", "ok")}
        md.append(f"| {r['check']} | {r['status']} | {json.dumps(details, default=str)} |")
if report["runs"]:
    md += ["", "## Tiny launcher runs (vit_tiny, 64 px, generated data)", "",
           "peak MiB = torch.cuda.max_memory_allocated: training epochs / evaluation / cache build / whole run", "",
           "| run | precision | top-1 | train MiB | eval MiB | cache build MiB | run MiB | img/s |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for k, r in report["runs"].items():
        md.append(f"| {k} | {r.get('precision')} | {r.get('top1')} | {r.get('peak_memory_mib')} | "
                  f"{r.get('peak_memory_eval_mib')} | {r.get('peak_memory_cache_build_mib')} | "
                  f"{r.get('peak_memory_run_mib')} | {r.get('images_per_s')} |")
json.dump(report, open(os.path.join(out, "gpu_check.json"), "w"), indent=1)
open(os.path.join(out, "gpu_check.md"), "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY
echo "gpu_check: wrote $OUT/gpu_check.json, $OUT/gpu_check.md ($((SECONDS - T_START)) s)"
if awk -F'\t' '$2 != 0 {bad=1} END {exit !bad}' "$OUT/steps.tsv"; then
  echo "gpu_check: some steps FAILED (see above)"
  exit 1
fi
exit 0
