"""The CUDA-only paths of issue 15, exercised on the CPU where they can be: the memory-peak bookkeeping (a fake
CUDA memory counter), the effective precision and the resume precision check, the GPU choice under torchrun
(LOCAL_RANK, CUDA mocked), the prefetcher's arithmetic, the host cache's pinning (pinned allocation mocked) and
its per-node budget, and --deterministic. tools/gpu_check.sh runs the same paths on a GPU."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from helpers_train import single_thread  # noqa: F401 - autouse fixture
from helpers_train import TINY, Killed, kill_after, read_results, read_summary, run_train, strip_timing, vtab_root

MIB = 1 << 20


@pytest.fixture(scope="session")
def vtab(tmp_path_factory):
    return vtab_root(tmp_path_factory)


def _argv(root, out, *extra):
    return ["--data_dir", root, "--dataset", "cifar_100", *TINY, "--epochs", "2", "--warmup_epochs", "1",
            "--batch_size", "8", "--lr", "1e-2", "--output_dir", out, *extra]


# ------------------------------------------------------------------------------------------------ memory peaks
class FakeCudaMemory:
    """torch.cuda's allocation counters: ``current`` bytes in use, ``peak`` since the last reset."""

    def __init__(self):
        self.current = 0
        self.peak = 0

    def spike(self, nbytes):  # a temporary allocation (activations) that is freed again
        self.peak = max(self.peak, self.current + nbytes)

    def read(self):
        return self.peak

    def reset(self):
        self.peak = self.current


def test_peak_memory_phases():
    from utils.metrics import PeakMemory

    mem = FakeCudaMemory()
    peaks = PeakMemory(torch.device("cpu"), read=mem.read, reset=mem.reset)
    mem.current = 10 * MIB  # the model
    mem.spike(900 * MIB)  # something before the first phase (e.g. loading)
    with peaks.phase("cache_build"):
        mem.spike(500 * MIB)
    mem.current += 50 * MIB  # the cache stays on the device
    for _ in range(2):
        with peaks.phase("train"):
            mem.spike(100 * MIB)
        with peaks.phase("eval"):
            mem.spike(300 * MIB)
            with peaks.phase("train"):  # nested: counted by the outer phase, no reset
                pass
    peaks.finish()
    mib = peaks.mib()
    assert mib["train"] == 160  # 10 + 50 resident + 100
    assert mib["eval"] == 360 and mib["cache_build"] == 510
    assert mib["run"] == 910  # everything, also what ran before the first phase
    # continued after a resume: the maxima carry over
    again = PeakMemory(torch.device("cpu"), read=mem.read, reset=mem.reset, initial=peaks.state())
    with again.phase("train"):
        mem.spike(1 * MIB)
    assert again.mib()["train"] == 160
    # off CUDA: nothing is read
    off = PeakMemory(torch.device("cpu"))
    with off.phase("train"):
        pass
    off.finish()
    assert set(off.mib().values()) == {None}


def test_results_report_the_training_peak(vtab, tmp_path, monkeypatch):
    """Through train.py: the training peak excludes evaluation and the cache build (CUDA's counter faked)."""
    import train
    from engine.trainer import Trainer
    from utils.metrics import PeakMemory

    mem = FakeCudaMemory()
    mem.current = 5 * MIB
    monkeypatch.setattr(train, "PeakMemory", lambda device, initial=None: PeakMemory(
        device, read=mem.read, reset=mem.reset, initial=initial))
    orig_train, orig_eval, orig_build = Trainer.train_one_epoch, Trainer.evaluate, train.build_prefix_cache

    def train_epoch(self, *a, **k):
        mem.spike(100 * MIB)
        return orig_train(self, *a, **k)

    def evaluate(self, *a, **k):
        mem.spike(300 * MIB)
        return orig_eval(self, *a, **k)

    def build(*a, **k):
        mem.spike(500 * MIB)
        return orig_build(*a, **k)

    monkeypatch.setattr(Trainer, "train_one_epoch", train_epoch)
    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    monkeypatch.setattr(train, "build_prefix_cache", build)
    out = tmp_path / "run"
    assert run_train(_argv(vtab, out, "--cache_prefix")) == 0
    res = read_results(out)
    assert res["peak_memory_mib"] == 105.0  # training only (the old single counter said 505)
    assert res["peak_memory_eval_mib"] == 305.0
    assert res["peak_memory_cache_build_mib"] == 505.0
    assert res["peak_memory_run_mib"] == 505.0
    assert "peak GPU memory: training 105 MiB" in open(out / "log.txt").read()
    # --eval_only: the main number is the evaluation peak
    ev = tmp_path / "eval"
    assert run_train(_argv(vtab, ev, "--eval_only", "--checkpoint", out / "delta.pth")) == 0
    res = read_results(ev)
    assert res["peak_memory_mib"] == 305.0 and res["peak_memory_cache_build_mib"] is None


def test_cpu_run_has_no_cuda_peaks(vtab, tmp_path):
    out = tmp_path / "run"
    assert run_train(_argv(vtab, out, "--epochs", "1", "--warmup_epochs", "0")) == 0
    res = read_results(out)
    for k in ("peak_memory_mib", "peak_memory_eval_mib", "peak_memory_cache_build_mib", "peak_memory_run_mib"):
        assert res[k] is None, k
    assert res["peak_rss_mib"] > 0 and res["precision"] == "fp32"


# --------------------------------------------------------------------------------------------------- precision
def test_effective_precision():
    from engine.trainer import effective_precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert effective_precision(False, "float16", cuda) == "fp32"
    assert effective_precision(True, "float16", cuda) == "fp16"
    assert effective_precision(True, "float16", cpu) == "fp32"
    assert effective_precision(True, "bfloat16", cpu) == "bf16"
    assert effective_precision(True, "bfloat16", cuda) == "bf16"


def test_amp_on_the_cpu_is_recorded_as_fp32(vtab, tmp_path, caplog):
    out = tmp_path / "run"
    assert run_train(_argv(vtab, out, "--epochs", "1", "--warmup_epochs", "0", "--amp")) == 0
    res = read_results(out)
    assert res["precision"] == "fp32" and res["args"]["amp"] is False
    text = open(out / "config.yaml").read()
    assert "# effective precision: fp32" in text and yaml.safe_load(text)["amp"] is False
    assert caplog.text.count("--amp with float16 needs CUDA") == 1
    bf = tmp_path / "bf16"
    assert run_train(_argv(vtab, bf, "--epochs", "1", "--warmup_epochs", "0", "--amp", "--amp_dtype",
                           "bfloat16")) == 0
    assert read_results(bf)["precision"] == "bf16" and read_results(bf)["args"]["amp"] is True


def test_resume_refuses_another_precision(vtab, tmp_path, caplog):
    """A run trained in bf16 cannot be continued in fp32 (or a CPU fp32 run with fp16 on a GPU): a clear
    refusal naming both precisions, before any training; the same precision resumes exactly."""
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    bf16 = ["--amp", "--amp_dtype", "bfloat16"]
    assert run_train(_argv(vtab, ref, *bf16)) == 0
    with kill_after(0, 1), pytest.raises(Killed):
        run_train(_argv(vtab, cut, *bf16))
    caplog.clear()
    assert run_train(_argv(vtab, cut, "--resume", cut / "last.pth")) == 2
    assert "precision: the checkpoint trained in bf16, this run would train in fp32" in caplog.text
    assert "Traceback" not in caplog.text
    assert run_train(_argv(vtab, cut, *bf16, "--resume", cut / "last.pth")) == 0
    assert strip_timing(read_summary(cut)) == strip_timing(read_summary(ref))


def _fake_enabled_scaler():
    """An enabled GradScaler (the CPU's: CPU-only machines cannot enable the CUDA one; same state handling)."""
    s = torch.amp.GradScaler("cpu", enabled=True)
    with pytest.raises(RuntimeError):  # what an unguarded resume hit: a disabled scaler's {} state
        s.load_state_dict({})
    return s


def test_scaler_state_of_another_precision_starts_fresh(caplog):
    """last.pth files that do not record their precision: an fp16 resume of a scaler-less run starts the scaler
    fresh with a warning (no traceback); an fp32 resume of an fp16 run ignores the scaler state."""
    from engine.trainer import load_scaler_state

    scaler = _fake_enabled_scaler()
    load_scaler_state(scaler, {}, "fp16", "old/last.pth")
    assert "has no fp16 gradient-scaler state" in caplog.text and "starts fresh" in caplog.text
    load_scaler_state(scaler, {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                               "_growth_tracker": 3}, "fp16", "new/last.pth")
    assert scaler.get_scale() == 1024.0
    caplog.clear()
    load_scaler_state(torch.amp.GradScaler("cuda", enabled=False), {"scale": 1024.0}, "fp32", "fp16/last.pth")
    assert "holds fp16 gradient-scaler state, but this run trains in fp32: ignored" in caplog.text


# ------------------------------------------------------------------------------------------------ GPU choice
@pytest.fixture
def four_gpus(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(torch.device(d)))
    return chosen


def test_each_rank_gets_its_own_gpu(four_gpus, monkeypatch):
    from utils.errors import UsageError
    from utils.distributed import init_distributed, resolve_device

    assert resolve_device("cuda", 0) == torch.device("cuda", 0)
    assert resolve_device("cuda", 3) == torch.device("cuda", 3)
    assert resolve_device("auto", 2) == torch.device("cuda", 2)
    assert resolve_device("cuda:1", 0) == torch.device("cuda", 1)
    assert resolve_device("cuda:1", 2) == torch.device("cuda", 3)  # GPU N + LOCAL_RANK
    assert four_gpus[-1] == torch.device("cuda", 3)
    with pytest.raises(UsageError, match=r"GPU 2 \+ LOCAL_RANK 2 = 4, but only 4 GPU\(s\) are visible"):
        resolve_device("cuda:2", 2)
    with pytest.raises(UsageError, match="not a device"):
        resolve_device("gpu0", 0)
    assert resolve_device("cpu", 3) == torch.device("cpu")
    # under torchrun: LOCAL_RANK from the environment (one process here, so no process group is started)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    info = init_distributed("cuda:2")
    assert info.device == torch.device("cuda", 3) and info.local_world_size == 2


def test_no_cuda_is_a_usage_error(monkeypatch, vtab, tmp_path, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_train(_argv(vtab, tmp_path / "run", "--device", "cuda:0")) == 2
    assert "CUDA is not available" in caplog.text and "Traceback" not in caplog.text


# ------------------------------------------------------------------------------------------------- prefetcher
def test_normaliser_divides_like_to_tensor(monkeypatch):
    from torchvision import transforms as T

    from data.transforms import DTL_MEAN, DTL_STD, Uint8Normalizer
    from utils.loader import CudaPrefetcher

    every = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16).contiguous()
    norm = Uint8Normalizer((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    exact = every.float() / 255
    assert torch.equal(norm(every), exact)
    # what a reciprocal multiplication (CUDA's x.div(255) with a Python number) gives instead: not bitwise equal
    assert not torch.equal(every.float() * (1.0 / 255), exact)

    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (20, 20, 3), dtype=np.uint8))
    ref = T.Compose([T.ToTensor(), T.Normalize(mean=torch.tensor(DTL_MEAN), std=torch.tensor(DTL_STD))])(img)
    u = T.PILToTensor()(img).unsqueeze(0)
    pre = CudaPrefetcher([], torch.device("cpu"), Uint8Normalizer(DTL_MEAN, DTL_STD, torch.device("cpu")))  # CUDA's arithmetic
    # the constants exist once: no tensor is made from Python numbers per batch (a blocking copy on CUDA)
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: pytest.fail("torch.tensor called per batch"))
    monkeypatch.setattr(torch, "full", lambda *a, **k: pytest.fail("torch.full called per batch"))
    labels = torch.ones(1, dtype=torch.int64)
    x, y = pre._to_device((u, labels))
    assert torch.equal(x[0], ref) and y.tolist() == [1]
    assert norm(u.clone(), dtype=torch.float16).dtype == torch.float16


# ------------------------------------------------------------------------------------------------- host cache
def _tiny_cache(storage, **kw):
    from engine.prefix_cache import PrefixCache
    from models import DTLConfig, create_dtl_model

    torch.manual_seed(0)
    model = create_dtl_model("vit_tiny_patch16_224", 5, DTLConfig(), img_size=32, embed_dim=32, depth=4,
                             num_heads=2)
    ds = torch.utils.data.TensorDataset(torch.randn(10, 3, 32, 32), torch.arange(10) % 5)
    return PrefixCache.build(model, ds, batch_size=4, storage=storage, deterministic=True, log=None, **kw)


def test_host_cache_is_unpinned_and_batches_are_pinned(monkeypatch):
    import engine.prefix_cache as pc
    from utils.distributed import DistInfo
    from utils.loader import build_cache_train_loader

    # building must not pin the stored tensors (torch's pinned allocator rounds blocks up to powers of two)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a: pytest.fail("the cache was pinned"))
    cache = _tiny_cache("host")
    assert cache.storage == "host"
    pinned = []

    def fake_pinned_empty(shape, dtype):
        t = torch.empty(tuple(shape), dtype=dtype)
        pinned.append(t)
        return t

    monkeypatch.setattr(pc, "_pinned_empty", fake_pinned_empty)
    idx = torch.tensor([7, 2, 5])
    plain_x, plain_y = cache.gather(idx)
    assert pinned == []
    x, y = cache.gather(idx, pin_memory=True)
    # every cached tensor and the labels were gathered straight into (what would be) pinned buffers
    assert len(pinned) == len(cache.tensors) + 1
    assert all(any(v.data_ptr() == p.data_ptr() for p in pinned) for v in x.values())
    assert any(y.data_ptr() == p.data_ptr() for p in pinned)
    assert all(torch.equal(x[k], plain_x[k]) for k in x) and torch.equal(y, plain_y)
    # the training loader passes it on
    pinned.clear()
    loader = build_cache_train_loader(cache, 4, DistInfo(), seed=0, pin_memory=True)
    batches = list(loader)
    assert len(batches) == 2 and len(pinned) == 2 * (len(cache.tensors) + 1)


def test_cache_budget_is_shared_by_the_processes_of_a_node(monkeypatch, tmp_path):
    import engine.prefix_cache as pc
    from engine.prefix_cache import PrefixCacheError

    monkeypatch.setattr(pc, "available_host_bytes", lambda: 1000 * MIB)
    cpu = torch.device("cpu")
    assert pc._choose_storage("auto", 400 * MIB, cpu, str(tmp_path), 1)[0] == "host"
    # two processes on the node, each with a 400 MiB cache: 500 MiB of RAM each, auto uses at most half -> disk
    assert pc._choose_storage("auto", 400 * MIB, cpu, str(tmp_path), 2)[0] == "mmap"
    assert pc._choose_storage("host", 460 * MIB, cpu, str(tmp_path), 1)[0] == "host"
    with pytest.raises(PrefixCacheError, match="per process .2 processes on this node"):
        pc._choose_storage("host", 460 * MIB, cpu, str(tmp_path), 2)


def test_train_passes_the_local_world_size(monkeypatch):
    import engine.setup as setup
    from data.spec import DataSpec
    from engine.spec import Experiment, OptimSpec, RunSpec
    from models.spec import ModelSpec
    from utils.distributed import DistInfo

    seen = {}

    def fake_build(model, dataset, **kw):
        seen.update(kw)
        raise setup.PrefixCacheError("stop here")

    monkeypatch.setattr(setup.PrefixCache, "build", staticmethod(fake_build))
    exp = Experiment(ModelSpec("vit_tiny_patch16_224", "dtl", 2), DataSpec("vtab", "dtd"), OptimSpec(batch_size_test=4),
                     RunSpec(cache_prefix=True, cache_storage="host", num_workers=0))
    with pytest.raises(setup.UsageError, match="stop here"):
        setup.build_prefix_cache(exp, None, None, DistInfo(local_world_size=3), False, None, {})
    assert seen["budget_share"] == 3 and seen["device"] == torch.device("cpu")


# ----------------------------------------------------------------------------------------------- deterministic
@pytest.fixture
def restore_backends():
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
              torch.backends.cudnn.deterministic, torch.backends.cuda.flash_sdp_enabled(),
              torch.backends.cuda.mem_efficient_sdp_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[1], before[2]
    torch.backends.cuda.enable_flash_sdp(before[3])
    torch.backends.cuda.enable_mem_efficient_sdp(before[4])
    if before[5] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = before[5]


def test_deterministic_flag(vtab, tmp_path, monkeypatch, restore_backends):
    from utils.determinism import configure_backends

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    configure_backends(False, torch.device("cpu"))
    assert not torch.are_deterministic_algorithms_enabled()
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_train(_argv(vtab, a, "--deterministic")) == 0
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    assert torch.backends.cudnn.deterministic and not torch.backends.cuda.flash_sdp_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert run_train(_argv(vtab, b)) == 0
    assert strip_timing(read_summary(a)) == strip_timing(read_summary(b))  # the CPU is deterministic anyway
    assert read_results(a)["args"]["deterministic"] is True


# ------------------------------------------------------------------------------------------------ bench tools
def test_bench_memory_empties_the_cuda_cache_between_in_process_methods(monkeypatch):
    import sys

    from tests.conftest import REPO

    sys.path.insert(0, str(REPO / "tools"))
    import bench_memory

    released = []
    with monkeypatch.context() as m:
        m.setattr(bench_memory, "release_memory", released.append)
        res = bench_memory.main(["--model", "vit_tiny_patch16_224", "--model_kwargs",
                                 "embed_dim=32,depth=2,num_heads=2", "--img_size", "32", "--batch_size", "2",
                                 "--num_classes", "4", "--steps", "1", "--in_process", "--methods", "dtl,lora"])
    assert [r["method"] for r in res] == ["dtl", "lora"] and released == ["cpu", "cpu"]
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, n=name: calls.append(n))
    bench_memory.release_memory("cuda")
    assert calls == ["synchronize", "empty_cache", "reset_peak_memory_stats"]


def test_bench_train_loads_like_train_py(monkeypatch):
    """bench_train's loader settings: train.py's worker count and pinned memory on CUDA (CUDA mocked), the cache
    batches gathered lazily into pinned buffers, cudnn.benchmark set through train.py's helper."""
    import sys

    from tests.conftest import REPO

    sys.path.insert(0, str(REPO / "tools"))
    import bench_train

    args = bench_train.parse_args(["--make_synthetic", "8", "--device", "cuda"])
    assert args.num_workers is None  # resolved per device in the worker: 4 on CUDA, 0 on the CPU
    seen = {}
    monkeypatch.setattr(bench_train, "configure_backends", lambda det, dev: seen.setdefault("backends", (det, dev)))
    monkeypatch.setattr(bench_train, "get_vtab_task", lambda name: (_ for _ in ()).throw(RuntimeError("stop")))
    with pytest.raises(RuntimeError, match="stop"):
        bench_train.run_worker(args, "default")
    assert seen["backends"] == (False, torch.device("cuda"))


def test_cuda_checks_script_on_the_cpu(vtab, tmp_path):
    """tools/cuda_checks.py (run by gpu_check.sh on a GPU): on the CPU its device-independent checks pass, the
    CUDA-only ones are skipped, and the --deterministic kill-and-resume harness finds the runs equal."""
    import json
    import subprocess
    import sys

    from data.synthetic import make_vtab_root
    from tests.conftest import REPO

    data = make_vtab_root(str(tmp_path / "data"), tasks=("eurosat",), n_train=16, n_val=8, n_test=8, img_size=32)
    out = tmp_path / "checks.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "tools/cuda_checks.py", "--device", "cpu", "--data_dir", data,
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status = {r["check"]: r["status"] for r in json.loads(out.read_text())}
    assert status == {"normaliser": "PASS", "prefetcher": "SKIP", "peaks": "SKIP", "host_cache": "PASS",
                      "scaler": "SKIP", "devices": "SKIP", "deterministic_resume": "PASS"}
