"""Lean mode, the frozen-prefix cache and shared-prefix inference (tools/predict.py) on DTL Swin.

Same guarantees as for ViT (tests/test_lean.py, tests/test_prefix_cache.py, tests/test_predict.py): lean logits
bit-identical to the default path and gradients within GRAD_RTOL (summation order), also with drop-path in
train mode; the cache path bit-identical with float32 storage and within the storage precision with float16.
"""
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import SwinTransformer
from torch.utils.data import TensorDataset

from models import DTLConfig, create_dtl_model, delta_state_dict
from models.dtl_swin import DTLSwinTransformer
from models.pretrained import CheckpointError
from engine.prefix_cache import PrefixCache, PrefixCacheError
from utils.memory import SavedTensorMeter

# fp32 on the CPU: lean forward values are bit-identical; gradients differ only by floating-point summation order.
GRAD_RTOL = 1e-5
# Cache storage tolerances (relative = ||a - b|| / ||a||): float32 exact, float16 rounds each value by <= 2^-11.
CACHE_TOL = {torch.float32: 0.0, torch.float16: 2e-3}

# 32 px, patch 2, window 2: token grids 16, 8, 4, 2; widths 16, 32, 64, 128; blocks 0-1 | 2-3 | 4-9 | 10-11.
TINY = dict(img_size=32, patch_size=2, window_size=2, embed_dim=16, depths=(2, 2, 6, 2), num_heads=(1, 2, 4, 8))
# The reference fixtures' size (64 px, window 4): token grids 32, 16, 8, 4.
FIXTURE = dict(TINY, img_size=64, window_size=4)


def tiny(csn="4-11", add="8-11", fusion_size=0, drop_path=0.0, size=TINY, seed=0, **kw) -> DTLSwinTransformer:
    torch.manual_seed(seed)
    bb = SwinTransformer(**{**size, **kw}, num_classes=0, drop_path_rate=drop_path)
    model = DTLSwinTransformer(bb, 5, DTLConfig(r=2, fusion_size=fusion_size, csn_blocks=csn, add_back_blocks=add))
    with torch.no_grad():  # a trained-looking side network (B = 0 at init would hide errors)
        for n, p in model.named_parameters():
            if n.startswith(("side.", "head.")):
                p.normal_(0, 0.1)
    return model


def data(n=6, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 5, (n,), generator=g)


def run(model, fn, y, seed=1):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = fn()
    F.cross_entropy(out, y).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def rel(a, b):
    return ((a - b).norm() / a.norm().clamp_min(1e-30)).item()


def block_input_keys(model, x):
    """Storage key of the input of every block, of every stage's patch merging and of the final norm."""
    seen = {}
    bb = model.backbone
    hooks = [blk.register_forward_pre_hook(lambda m, a, i=i: seen.setdefault(f"x{i}", a[0]))
             for i, blk in enumerate(b for st in bb.layers for b in st.blocks)]
    hooks += [st.downsample.register_forward_pre_hook(lambda m, a, j=j: seen.setdefault(f"merge{j}", a[0]))
              for j, st in enumerate(bb.layers)]
    hooks.append(bb.norm.register_forward_pre_hook(lambda m, a: seen.setdefault("norm", a[0])))
    return seen, hooks


# ------------------------------------------------------------------------------------------------- lean mode


@pytest.mark.parametrize("csn,add,fusion_size,drop_path", [
    ("4-11", "8-11", 0, 0.0),    # the paper's rule on Swin-T depths
    ("4-11", "8-11", 5, 0.3),    # DTL+ (k = 5, as the paper's Swin), stochastic depth
    ("0-11", "1,5,10", 4, 0.3),  # side networks in stages 0, 2, 3: patch merging with a gradient, even kernel
    ("4-9", "6-8", 3, 0.2),      # stage 3 has no side network: its blocks are only checkpointed
])
def test_lean_matches_default(csn, add, fusion_size, drop_path):
    """Logits bit-identical, gradients within GRAD_RTOL, also with drop-path in train mode under the same seed
    (the checkpoints preserve the RNG state, so the masks are recomputed identically)."""
    model = tiny(csn, add, fusion_size, drop_path).train()
    x, y = data(3)
    default = run(model.set_lean(False), lambda: model(x), y)
    lean = run(model.set_lean(True), lambda: model(x), y)
    assert torch.equal(default[0], lean[0])
    assert sorted(default[1]) == sorted(lean[1]) and default[1]
    assert set(default[1]) == {n for n, p in model.named_parameters() if p.requires_grad}
    for k, g in default[1].items():
        assert rel(g, lean[1][k]) <= GRAD_RTOL, f"{k}: relative gradient difference {rel(g, lean[1][k]):.2e}"
    if drop_path:  # the masks really are random: another seed gives other logits
        assert not torch.equal(run(model, lambda: model(x), y, seed=2)[0], lean[0])


def test_lean_eval_and_no_grad_identical():
    model = tiny(fusion_size=5).eval()
    x, _ = data(2)
    with torch.no_grad():
        ref = model.set_lean(False)(x)
        assert torch.equal(model.set_lean(True)(x), ref)
    assert torch.equal(model(x).detach(), ref)


def test_lean_keeps_only_block_inputs():
    """Fixture-sized Swin (64 px), DTL+ taps 4-11 / add-back 8-11: lean keeps, of activation size, exactly the
    inputs of blocks 4-11 (taps 4-8 on inputs without gradient, blocks 9-11 whose input needs one), the input
    of stage 3's patch merging and of the final norm, each once: 278.5 KiB against the default's 1147 KiB."""
    model = tiny(fusion_size=5, size=FIXTURE).train()
    x, _ = data(2, 64)
    seen, hooks = block_input_keys(model, x)
    saved, big = {}, {}
    for lean in (False, True):
        seen.clear()
        with SavedTensorMeter(model.set_lean(lean)) as meter:
            model(x)
            names = {(str(t.device), t.untyped_storage().data_ptr()): k for k, t in seen.items()}
            big[lean] = sorted(names.get(k, "?") for k, nbytes in meter.by_size.items() if nbytes >= 16384)
        saved[lean] = meter.nbytes
    for h in hooks:
        h.remove()
    assert big[True] == sorted([f"x{i}" for i in range(4, 12)] + ["merge3", "norm"])
    unit = 2 * 8 * 8 * 64 * 4  # the input of a stage-2 block (B x 8 x 8 x 64, fp32) = 32 KiB
    assert 8.5 * unit <= saved[True] <= 8.75 * unit  # 6 + 1 + 3 x 0.5 units + the rank-2 factors and the head
    assert 1100 * 1024 < saved[False] < 1200 * 1024 and saved[True] <= 0.25 * saved[False]


def test_lean_under_autocast_same_logits():
    model = tiny(fusion_size=5).train()
    x, y = data(2)
    res = {}
    for lean in (False, True):
        model.set_lean(lean).zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
        res[lean] = out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert torch.equal(res[False][0], res[True][0])
    for k, g in res[False][1].items():
        assert rel(g, res[True][1][k]) <= 1e-2, k  # bf16 summation-order noise


def test_factory_and_timm_entry_point_lean():
    kw = dict(img_size=32, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=2)
    model = create_dtl_model("swin_tiny_patch4_window7_224", 3, lean=True, **kw)
    assert isinstance(model, DTLSwinTransformer) and model.lean
    assert model.dtl_cfg.csn_blocks == [4, 5, 6, 7] and model.dtl_cfg.add_back_blocks == [5, 6, 7]
    assert model.set_lean(False) is model and not model.lean
    assert not create_dtl_model("swin_tiny_patch4_window7_224", 3, **kw).lean
    m = timm.create_model("dtl_swin_tiny_patch4_window7_224", num_classes=3, lean=True, fusion_size=5, **kw)
    assert m.lean and m(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    assert DTLSwinTransformer(m.backbone, 3, lean=True).lean


# ------------------------------------------------------------------------------------------- frozen prefix


@pytest.mark.parametrize("csn,add", [("4-11", "8-11"), ("0-11", "1,5,10"), ("2-11", "4,8-11"), ("4-9", "10-11")])
def test_prefix_plan_and_recorded_inputs(csn, add):
    """The plan records the taps of the first add-back block's stage before it (no earlier stage has a side
    network: its taps could only reach an add-back block before the first one), and the recorded tensors are
    the block inputs (for a stage's first block: after its patch merging)."""
    model = tiny(csn, add).eval()
    record, resume = model.prefix_plan()
    assert resume == min(model.dtl_cfg.add_back_blocks) == record[-1]
    stage = model.stage_of(resume)
    assert all(int(j) >= stage for j in model.side)
    side_taps = model.side[str(stage)].taps if str(stage) in model.side else {}
    assert record[:-1] == sorted(int(k) for k in side_taps if int(k) < resume)
    x, _ = data(2)
    seen, hooks = block_input_keys(model, x)
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    rec = model.record_block_inputs(x, list(range(resume + 1)))
    assert sorted(rec) == list(range(resume + 1))
    for i, t in rec.items():
        assert torch.equal(t, seen[f"x{i}"]), i
    with pytest.raises(ValueError, match="depend on the side network"):
        model.record_block_inputs(x, [resume + 1])


def test_plan_for_the_four_configurations():
    assert tiny("4-11", "8-11").prefix_plan() == ([4, 5, 6, 7, 8], 8)
    assert tiny("0-11", "1,5,10").prefix_plan() == ([0, 1], 1)
    assert tiny("2-11", "4,8-11").prefix_plan() == ([4], 4)  # stage 1's taps (no add-back there) do not exist
    assert tiny("4-9", "10-11").prefix_plan() == ([10], 10)  # no side network at all
    with pytest.raises(ValueError, match="no add-back block"):
        tiny("4-11", "").prefix_plan()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("csn,add,fusion_size,storage", [
    ("4-11", "8-11", 5, "host"), ("0-11", "1,5,10", 3, "mmap"), ("2-11", "4,8-11", 4, "host"),
])
def test_cached_equals_uncached(dtype, csn, add, fusion_size, storage):
    model = tiny(csn, add, fusion_size).train()
    x, y = data()
    cache = PrefixCache.build(model, TensorDataset(x, y), batch_size=4, deterministic=True, dtype=dtype,
                              storage=storage, log=None)
    record, resume = model.prefix_plan()
    assert cache.blocks == record and cache.resume == resume and not cache.approximate and len(cache) == 6
    cached, labels = cache.gather(torch.arange(6))
    assert torch.equal(labels, y) and all(t.dtype == dtype for t in cached.values())
    for lean in (False, True):
        model.set_lean(lean)
        ref = run(model, lambda: model(x), y)
        got = run(model, lambda: model.forward_from_prefix(cached), y)
        assert sorted(ref[1]) == sorted(got[1])
        with torch.no_grad():  # model(cached) dispatches to forward_from_prefix (DDP calls forward)
            assert torch.equal(model(cached), model.forward_from_prefix(cached))
        if dtype == torch.float32:
            assert torch.equal(ref[0], got[0])
            assert all(torch.equal(ref[1][k], got[1][k]) for k in ref[1])
        else:
            assert 0 < rel(ref[0], got[0]) <= CACHE_TOL[dtype]
            for k in ref[1]:
                assert rel(ref[1][k], got[1][k]) <= CACHE_TOL[dtype], k
    with pytest.raises(KeyError, match="no recorded input"):
        model.forward_from_prefix({resume: cached[resume]} if len(record) > 1 else {})


def test_refuses_prefix_drop_path_unless_approximate():
    x, y = data()
    model = tiny(drop_path=0.2)  # timm's per-block rates: block i gets 0.2 * i / 11
    with pytest.raises(PrefixCacheError, match=r"layers\.0\.blocks\.1\.drop_path1 \(p=0\.0181818\).*cache_prefix_approx"):
        PrefixCache.build(model, TensorDataset(x, y), deterministic=True, log=None)
    ops = model.prefix_random_ops()
    assert len(ops) == 2 * 7 and ops[-1].startswith("layers.2.blocks.3.drop_path2")  # blocks 1-7, before 8
    cache = PrefixCache.build(model, TensorDataset(x, y), deterministic=True, allow_approximate=True,
                              dtype=torch.float32, log=None)
    assert cache.approximate
    model.train()  # the approximation: prefix as in eval mode; the tail keeps its drop-path
    cached = cache.gather(torch.arange(6))[0]
    assert not torch.equal(model.forward_from_prefix(cached), model.forward_from_prefix(cached))
    # dropout inside a prefix block is named too
    assert any("attn_drop" in op for op in tiny(attn_drop_rate=0.1).prefix_random_ops())
    # drop-path only at or after the first add-back block: exact
    tail_only = tiny()
    for blk in list(tail_only.backbone.layers[2].blocks)[4:] + list(tail_only.backbone.layers[3].blocks):
        blk.drop_path1 = blk.drop_path2 = timm.layers.DropPath(0.2)
    assert tail_only.prefix_random_ops() == []
    assert not PrefixCache.build(tail_only, TensorDataset(x, y), deterministic=True, log=None).approximate


# ------------------------------------------------------------------------------------ tools/predict.py on Swin

MODEL = "swin_tiny_patch4_window7_224"
KW = dict(embed_dim=16, depths=(2, 2, 6, 2), num_heads=(1, 2, 4, 8), window_size=2, patch_size=2)
TASKS = {  # differ in first add-back (stage 2 vs stage 1), rank, taps and fusion
    "taskA": (5, DTLConfig(r=2, fusion_size=0, csn_blocks="4-11", add_back_blocks="8-11")),
    "taskB": (3, DTLConfig(r=4, fusion_size=5, csn_blocks="2-11", add_back_blocks="3,6,9-11")),
    "taskC": (4, DTLConfig(r=2, fusion_size=3, csn_blocks="4-7", add_back_blocks="5,7")),
}


@pytest.fixture(scope="module")
def swin_deltas(tmp_path_factory):
    from models.delta import delta_from_model, write_pth

    d = tmp_path_factory.mktemp("predict_swin")
    torch.manual_seed(0)
    backbone = d / "backbone.pth"
    torch.save(create_dtl_model(MODEL, 5, img_size=32, **KW).backbone.state_dict(), backbone)
    models, paths = {}, []
    for k, (name, (nc, cfg)) in enumerate(TASKS.items()):
        m = create_dtl_model(MODEL, nc, cfg, load_path=str(backbone), img_size=32, drop_path_rate=0.1, **KW)
        g = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.startswith(("side.", "head.")):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        paths.append(write_pth(delta_from_model(m, dataset=name), d / f"{name}.pth"))
        models[name] = m.eval()
    return d, str(backbone), paths, models


def test_predict_shared_prefix_equals_separate_swin_models(swin_deltas):
    from models.delta import read_delta
    from models.shared_prefix import shared_model_from_deltas

    d, backbone, paths, models = swin_deltas
    shared = shared_model_from_deltas([read_delta(p) for p in paths], load_path=backbone)
    assert shared.resume == 3  # taskB's add-back 3 (stage 1)
    # every task's own prefix plan: taskB's tap 2 and block 3, taskA's stage-2 taps 4-7 and block 8, taskC's 4, 5
    assert shared.record == [2, 3, 4, 5, 6, 7, 8]
    assert all(t.backbone is shared.backbone for t in shared.tasks)
    x, _ = data(3)
    out = shared(x)
    with torch.no_grad():
        for logits, (task, model) in zip(out, models.items()):
            assert torch.equal(logits, model(x)), task  # independent full models: bit-identical
    # without taskB the shared prefix reaches stage 2: taskC's add-back 5
    shared2 = shared_model_from_deltas([read_delta(p) for p in (paths[0], paths[2])], load_path=backbone)
    assert shared2.resume == 5 and shared2.record == [4, 5, 6, 7, 8]
    with torch.no_grad():
        for logits, task in zip(shared2(x), ("taskA", "taskC")):
            assert torch.equal(logits, models[task](x)), task


def test_predict_cli_and_plain_swin_delta(swin_deltas, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from models.shared_prefix import shared_model_from_deltas
    from tools import predict

    d, backbone, paths, models = swin_deltas
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(img_dir / f"im{i}.png")
    out = tmp_path / "pred.csv"
    assert predict.main(["--load_path", backbone, "--deltas", *paths, "--images", str(img_dir), "--output", str(out),
                         "--compare", "--repeats", "1"]) == 0
    err = capsys.readouterr().err
    assert "predictions identical: yes" in err and "shared prefix: blocks 0-2" in err
    assert out.read_text().splitlines()[0].startswith("image,taskA_class,taskA_prob,taskB_class")
    # a plain tensor dict of a Swin delta (side.<stage>.taps.<block>...): rank, taps, fusion from the tensors
    plain = tmp_path / "plain.pth"
    torch.save(delta_state_dict(models["taskB"]), plain)
    args = predict.parse_args(["--load_path", backbone, "--model", MODEL, "--img_size", "32", "--add_back_blocks",
                               "3,6,9-11", "--deltas", str(plain), "--images", str(img_dir)])
    (td,) = predict.read_task_deltas(args)
    assert (td.spec.num_classes, td.dtl_config().r, td.dtl_config().fusion_size) == (3, 4, 5)
    td = td.__class__(td.spec.replace(backbone_kwargs=KW), td.tensors, source=td.source, kind=td.kind)
    shared = shared_model_from_deltas([td], load_path=backbone)
    x = predict.load_images(predict.collect_images([str(img_dir)]), 32, "vtab")
    with torch.no_grad():
        assert torch.equal(shared(x)[0], models["taskB"](x))
    # a Swin delta given a ViT backbone name is refused before any model is built
    args.model = "vit_tiny_patch16_224"
    with pytest.raises(CheckpointError, match="are not those of a DTL model on vit_tiny_patch16_224"):
        predict.read_task_deltas(args)
