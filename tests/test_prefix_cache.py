"""Frozen-prefix cache: same logits/gradients as the uncached path up to the storage precision; refusals."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from timm.models import VisionTransformer
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset

import engine.prefix_cache as pc
from models import DTLConfig, DTLVisionTransformer
from engine.prefix_cache import PrefixCache, PrefixCacheError, transform_looks_random

# Tolerances (fp32 CPU model; relative = ||a - b|| / ||a||). float32 storage is exact (bit-identical values);
# float16 rounds each cached value by <= 2^-11 relative, bfloat16 by <= 2^-8.
TOL = {torch.float32: 0.0, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def tiny(fusion_size=0, csn="0-5", add="3-5", drop_path=0.0, seed=0) -> DTLVisionTransformer:
    torch.manual_seed(seed)
    bb = VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=6, num_heads=2, num_classes=0,
                           global_pool="token", drop_path_rate=drop_path)
    model = DTLVisionTransformer(bb, 5, DTLConfig(r=2, fusion_size=fusion_size, csn_blocks=csn, add_back_blocks=add))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith(("side.", "head.")):
                p.normal_(0, 0.1)
    return model


def data(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 5, (n,), generator=g)


def logits_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    out, y = fn()
    F.cross_entropy(out, y).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def rel(a, b):
    return ((a - b).norm() / a.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fusion_size,csn,add,storage", [(0, "0-5", "3-5", "host"), (3, "0,1,3,4", "2,4-5", "mmap")])
def test_cached_equals_uncached(dtype, fusion_size, csn, add, storage):
    model = tiny(fusion_size, csn, add).train()
    x, y = data()
    cache = PrefixCache.build(model, TensorDataset(x, y), batch_size=4, deterministic=True, dtype=dtype,
                              storage=storage, log=None)
    assert cache.storage == storage and not cache.approximate and len(cache) == 6
    record, resume = model.prefix_plan()
    assert cache.blocks == record and record[-1] == resume == min(model.dtl_cfg.add_back_blocks)
    assert all(t.dtype == dtype for t in cache.tensors.values())
    for lean in (False, True):
        model.set_lean(lean)
        ref = logits_and_grads(model, lambda: (model(x), y))
        got = logits_and_grads(model, lambda: (model.forward_from_prefix(cache.gather(torch.arange(6))[0]),
                                               cache.gather(torch.arange(6))[1]))
        assert sorted(ref[1]) == sorted(got[1])
        with torch.no_grad():  # model(cached) dispatches to forward_from_prefix (DDP calls forward)
            assert torch.equal(model(cache.gather(torch.arange(6))[0]), model.forward_from_prefix(cache.gather(torch.arange(6))[0]))
        if dtype == torch.float32:
            assert torch.equal(ref[0], got[0])
            assert all(torch.equal(ref[1][k], got[1][k]) for k in ref[1])
        else:
            assert 0 < rel(ref[0], got[0]) <= TOL[dtype]
            for k in ref[1]:
                assert rel(ref[1][k], got[1][k]) <= TOL[dtype], k


def test_batches_follow_a_random_sampler_and_dataset_view():
    model = tiny()
    x, y = data(10)
    ds = TensorDataset(x, y)
    cache = PrefixCache.build(model, ds, batch_size=3, deterministic=True, dtype=torch.float32, log=None)
    order = list(RandomSampler(ds, generator=torch.Generator().manual_seed(5)))
    batches = list(cache.batches(4, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(5)))
    assert len(batches) == 2
    for k, (cached, labels) in enumerate(batches):
        idx = order[4 * k:4 * k + 4]
        assert torch.equal(labels, y[idx])
        assert torch.equal(cached[3], model.record_block_inputs(x[idx], [3])[3])
    loader = DataLoader(cache.dataset(), batch_size=4)
    cached, labels = next(iter(loader))
    assert sorted(cached) == cache.blocks and torch.equal(labels, y[:4]) and cached[0].shape == (4, 65, 32)
    # a DataLoader over the cache view draws the same batches as the same DataLoader over the images
    ids = TensorDataset(x, torch.arange(10))
    by_id = PrefixCache.build(model, ids, deterministic=True, log=None).dataset()
    a = [t for _, t in DataLoader(ids, 4, shuffle=True, generator=torch.Generator().manual_seed(3))]
    b = [t for _, t in DataLoader(by_id, 4, shuffle=True, generator=torch.Generator().manual_seed(3))]
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and len(a) == len(b) == 3


class ImageList(Dataset):
    def __init__(self, transform):
        torch.manual_seed(0)
        self.images = [T.functional.to_pil_image(torch.rand(3, 32, 32)) for _ in range(4)]
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), i % 5


def test_refuses_random_transform_unless_approximate():
    model = tiny()
    ds = ImageList(T.Compose([T.RandomHorizontalFlip(), T.ToTensor()]))
    with pytest.raises(PrefixCacheError, match="random.*--cache_prefix_approx"):
        PrefixCache.build(model, ds, log=None)
    with pytest.raises(PrefixCacheError, match="random"):
        PrefixCache.build(model, ds, deterministic=False, log=None)
    cache = PrefixCache.build(model, ds, allow_approximate=True, log=None)
    assert cache.approximate
    # deterministic transform: inferred from the transform, built exactly
    assert not PrefixCache.build(model, ImageList(T.Compose([T.Resize(32), T.ToTensor()])), log=None).approximate


def test_refuses_unknown_or_lying_transform():
    model = tiny()
    noisy = ImageList(lambda im: T.functional.to_tensor(im) + torch.rand(1))
    with pytest.raises(PrefixCacheError, match="cannot tell"):
        PrefixCache.build(model, noisy, log=None)
    with pytest.raises(PrefixCacheError, match="came out differently"):
        PrefixCache.build(model, noisy, deterministic=True, log=None)


def test_refuses_prefix_drop_path_unless_approximate():
    x, y = data()
    model = tiny(drop_path=0.2)
    with pytest.raises(PrefixCacheError, match=r"blocks\.1\.drop_path1 \(p=0\.04\)"):
        PrefixCache.build(model, TensorDataset(x, y), deterministic=True, log=None)
    cache = PrefixCache.build(model, TensorDataset(x, y), deterministic=True, allow_approximate=True,
                              dtype=torch.float32, log=None)
    assert cache.approximate
    # the approximation: prefix as in eval mode; the tail keeps its drop-path (train-mode outputs vary)
    model.train()
    a = model.forward_from_prefix(cache.gather(torch.arange(6))[0])
    b = model.forward_from_prefix(cache.gather(torch.arange(6))[0])
    assert not torch.equal(a, b)
    # drop-path only in the tail: exact
    tail_only = tiny(csn="0-5", add="1-5", drop_path=0.2)
    assert tail_only.prefix_random_ops() == []
    assert not PrefixCache.build(tail_only, TensorDataset(x, y), deterministic=True, log=None).approximate


def test_refuses_overflow_and_models_without_prefix():
    model = tiny()
    with torch.no_grad():
        model.backbone.patch_embed.proj.weight.mul_(1e5)
    x, y = data()
    with pytest.raises(PrefixCacheError, match="overflows.*bfloat16"):
        PrefixCache.build(model, TensorDataset(x, y), deterministic=True, log=None)
    assert PrefixCache.build(model, TensorDataset(x, y), deterministic=True, dtype=torch.bfloat16, log=None)
    with pytest.raises(PrefixCacheError, match="does not support the prefix cache"):
        PrefixCache.build(nn.Linear(3, 3), TensorDataset(x, y), deterministic=True, log=None)
    # a NaN image (e.g. a corrupt float input) names the block and the images of its batch
    x[4] = float("nan")
    with pytest.raises(PrefixCacheError, match=r"input of block 0 is not finite for images 4\.\.5"):
        PrefixCache.build(tiny(), TensorDataset(x, y), deterministic=True, batch_size=2, log=None)


def test_storage_choice_and_size_refusals(monkeypatch, tmp_path):
    model = tiny()
    x, y = data()
    ds = TensorDataset(x, y)
    lines = []
    nbytes = 6 * 4 * 65 * 32 * 2  # 6 images, taps 0-2 + block 3, float16
    cache = PrefixCache.build(model, ds, deterministic=True, log=lines.append)
    assert cache.storage == "host" and cache.nbytes == nbytes
    assert "6 images" in lines[0] and "blocks [0, 1, 2, 3]" in lines[0] and "-> host" in lines[0]
    # not enough RAM: auto falls back to a memory-mapped file, explicit 'host' refuses
    monkeypatch.setattr(pc, "available_host_bytes", lambda: nbytes)
    assert PrefixCache.build(model, ds, deterministic=True, dir=str(tmp_path), log=None).storage == "mmap"
    assert list(tmp_path.iterdir()) == []  # the mapped file is unlinked right away
    with pytest.raises(PrefixCacheError, match="needs 97.5 KiB but only"):
        PrefixCache.build(model, ds, deterministic=True, storage="host", log=None)
    # nothing fits anywhere
    monkeypatch.setattr(pc.shutil, "disk_usage", lambda p: type("U", (), {"free": 1024})())
    with pytest.raises(PrefixCacheError, match="fits nowhere"):
        PrefixCache.build(model, ds, deterministic=True, log=None)
    with pytest.raises(PrefixCacheError, match="unknown cache storage"):
        PrefixCache.build(model, ds, deterministic=True, storage="disk", log=None)


def test_transform_looks_random():
    assert transform_looks_random(T.Compose([T.Resize((32, 32)), T.CenterCrop(32), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])) is False
    assert transform_looks_random(T.Compose([T.RandomResizedCrop(32), T.ToTensor()])) is True
    assert transform_looks_random(T.Compose([T.Resize(32), T.RandAugment()])) is True
    assert transform_looks_random(lambda im: im) is None


def test_bench_train_cache_trains_like_default(tmp_path):
    """tools/bench_train.py end to end on a generated VTAB root; with a float32 cache (also in lean mode) the
    training losses after two epochs are those of the default path (same batches, same values)."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    out = tmp_path / "bench.json"
    cmd = [sys.executable, "tools/bench_train.py", "--model", "vit_tiny_patch16_224", "--make_synthetic", "8",
           "--synthetic_img_size", "32", "--img_size", "32", "--modes", "default,cache,cache+lean", "--epochs", "2",
           "--batch_size", "4", "--cache_dtype", "float32", "--threads", "1", "--json", str(out)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "NOT included in epoch_s" in res.stdout and "prefix cache: 8 images" in res.stdout
    rows = json.loads(out.read_text())
    assert [r["mode"] for r in rows] == ["default", "cache", "cache+lean"]
    assert all({"mode", "epoch_s", "peak_mib", "speedup"} <= set(r) for r in rows)
    assert rows[0]["speedup"] == 1.0 and rows[1]["cache_build_s"] > 0 and rows[0]["cache_build_s"] is None
    # exact here; a tolerance because BLAS kernels may round differently for the cache build's batch size
    assert abs(rows[0]["final_loss"] - rows[1]["final_loss"]) <= 1e-4
    assert abs(rows[0]["final_loss"] - rows[2]["final_loss"]) <= 1e-4
