"""Lean mode: same values as the default path, and only the side taps' inputs kept for backward."""
import pytest
import torch
import torch.nn.functional as F
from timm.models import VisionTransformer

from models import DTLConfig, DTLVisionTransformer, create_dtl_model
from models.lean import LowRankSideSum, lean_block
from utils.memory import SavedTensorMeter

# fp32 on the CPU: the lean forward is bit-identical; gradients differ only by summation order.
GRAD_RTOL = 1e-5


def tiny(fusion_size=0, csn="0-5", add="3-5", drop_path=0.0, depth=6, seed=0) -> DTLVisionTransformer:
    torch.manual_seed(seed)
    bb = VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=depth, num_heads=2, num_classes=0,
                           global_pool="token", drop_path_rate=drop_path)
    model = DTLVisionTransformer(bb, 5, DTLConfig(r=2, fusion_size=fusion_size, csn_blocks=csn, add_back_blocks=add))
    with torch.no_grad():  # a trained-looking side network (B = 0 at init would hide errors)
        for n, p in model.named_parameters():
            if n.startswith(("side.", "head.")):
                p.normal_(0, 0.1)
    return model


def run(model, x, y, seed=1):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x)
    F.cross_entropy(out, y).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b):
    (out_a, g_a), (out_b, g_b) = a, b
    assert torch.equal(out_a, out_b)
    assert sorted(g_a) == sorted(g_b) and g_a
    for k in g_a:
        rel = ((g_a[k] - g_b[k]).norm() / g_a[k].norm().clamp_min(1e-30)).item()
        assert rel <= GRAD_RTOL, f"{k}: relative gradient difference {rel:.2e}"


@pytest.mark.parametrize(
    "fusion_size,csn,add,drop_path",
    [(0, "0-5", "3-5", 0.0), (3, "0-5", "3-5", 0.3), (4, "0,2,3,5", "2,4", 0.3), (0, "1,4", "1,4,5", 0.0)],
)
def test_lean_matches_default(fusion_size, csn, add, drop_path):
    """Logits bit-identical, gradients within GRAD_RTOL, also with stochastic depth in train mode (same seed):
    checkpointing preserves the RNG state so the drop-path masks are recomputed identically."""
    model = tiny(fusion_size, csn, add, drop_path).train()
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 3, 4])
    default = run(model, x, y)
    lean = run(model.set_lean(True), x, y)
    assert_same(default, lean)
    if drop_path:  # the masks really are random: another seed gives other logits
        other = run(model, x, y, seed=2)
        assert not torch.equal(other[0], lean[0])


def test_lean_eval_and_no_grad_identical():
    model = tiny(3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(model.set_lean(True)(x), ref)
    assert torch.equal(model(x).detach(), ref)


def test_lean_keeps_only_block_inputs():
    """Lean keeps, of activation size, exactly the inputs of the tapped prefix blocks and of every block whose
    input needs a gradient -- each stored once -- and nothing else bigger than the rank-r products."""
    model = tiny(3, csn="0-5", add="3-5").train()
    x = torch.randn(2, 3, 32, 32)
    block_inputs = {}
    hooks = [blk.register_forward_pre_hook(lambda m, a, i=i: block_inputs.setdefault(i, a[0]))
             for i, blk in enumerate(model.backbone.blocks)]
    unit = 2 * 65 * 32 * 4  # one B x N x d fp32 activation
    saved = {}
    for lean in (False, True):
        block_inputs.clear()
        with SavedTensorMeter(model.set_lean(lean)) as meter:
            model(x).sum()
            big = {k for k, nbytes in meter.by_size.items() if nbytes >= unit}
            keys = {i: (str(t.device), t.untyped_storage().data_ptr()) for i, t in block_inputs.items()}
        saved[lean] = meter.nbytes
    for h in hooks:
        h.remove()
    # taps 0-5; blocks 0-3 see inputs without gradient; blocks 4, 5 are after add-back 3.
    assert big == {keys[i] for i in range(6)}
    small = saved[True] - 6 * unit
    assert 0 <= small < unit  # rank-2 factors, head
    assert saved[False] > 3 * saved[True]


def test_lean_vit_saved_memory_fraction():
    """A 12-block ViT/16 at 224 (ViT-Ti: the count per block input is the same for ViT-B), batch 1, DTL defaults
    (taps 0-11, add-back 6-11): lean keeps 12 block inputs against the default's 69 (ViT-B/16 at batch 8:
    55.6 MiB against 319.3 MiB)."""
    model = create_dtl_model("vit_tiny_patch16_224", 10, DTLConfig()).train()
    x = torch.randn(1, 3, 224, 224)
    mib = {}
    for lean in (False, True):
        with SavedTensorMeter(model.set_lean(lean)) as meter:
            model(x)
        mib[lean] = meter.mib
    unit = 197 * 192 * 4 / 2**20
    assert 68 * unit < mib[False] < 70 * unit
    assert 12 * unit < mib[True] < 12.5 * unit
    assert mib[True] <= 0.25 * mib[False]


def test_factory_and_set_lean():
    kw = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
    model = create_dtl_model("vit_tiny_patch16_224", 3, DTLConfig(add_back_blocks="1"), lean=True, **kw)
    assert model.lean
    assert model.set_lean(False) is model and not model.lean
    assert not create_dtl_model("vit_tiny_patch16_224", 3, **kw).lean


def test_lean_block_without_side_is_checkpointed_block():
    blk = tiny().backbone.blocks[0]
    x = torch.randn(2, 65, 32, requires_grad=True)
    y = lean_block(blk, x, None, None, 0)
    ref = blk(x)
    assert torch.equal(y, ref)
    (g,) = torch.autograd.grad(y.sum(), x)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    assert torch.allclose(g, g_ref, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="LowRankSideSum"):
        lean_block(blk, x, tiny().side, None, 0)


def test_low_rank_side_sum_equals_running_sum():
    model = tiny()
    xs = [torch.randn(2, 65, 32) for _ in range(4)]
    state, s = LowRankSideSum(model.side), None
    for i, x in enumerate(xs):
        state.tap(i, x)
        s = model.side.tap(s, i, x)
    assert torch.equal(state.dense(), s)
    assert LowRankSideSum(model.side).dense() is None


def test_lean_under_autocast_keeps_one_copy_per_block_input():
    """Under autocast the taps before the first add-back keep their low-precision copy of x (half a block
    input each); a tail block keeps only its fp32 input (its tap's copy is recomputed in backward)."""
    model = tiny(0, csn="0-5", add="3-5").train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    unit = 2 * 65 * 32 * 4
    res = {}
    for lean in (False, True):
        model.set_lean(lean).zero_grad(set_to_none=True)
        with SavedTensorMeter(model) as meter, torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
        res[lean] = out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, meter
    assert torch.equal(res[False][0], res[True][0])
    for k, g in res[False][1].items():
        assert ((g - res[True][1][k]).norm() / g.norm()).item() <= 1e-2, k  # bf16 summation-order noise
    big = sorted(v for v in res[True][2].by_size.values() if v >= unit // 2)
    assert big == [unit // 2] * 4 + [unit] * 2  # bf16 copies of x_0..x_3, fp32 x_4, x_5
