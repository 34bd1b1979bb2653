"""Configurations beyond the shipped fixtures, against a direct transcription of the original forward pass.

The oracle below is the rule of docs/method.md (sections 1.1/1.2) written out literally (one running sum, ``s = 0`` at the start and at every
Swin stage, taps on block inputs, ``x + phi(swish(s))`` after add-back blocks, PyTorch ``padding='same'``
depthwise convolution) using the model's own tensors. It shares no code with ``models/side_network.py``, so
it checks the wrappers' loops, the tap bookkeeping and the fusion reshapes on widths, depths, ranks, block
ranges, betas, even kernels and grids that the fixtures do not cover.
"""
import pytest
import torch
import torch.nn.functional as F
from timm.models import SwinTransformer, VisionTransformer

from models import DTLConfig, DTLVisionTransformer
from models.dtl_swin import DTLSwinTransformer


def _phi(side, conv_w, grid, prefix):
    if conv_w is None:
        return side
    b, n, c = side.shape
    h, w = grid
    patches = side[:, prefix:].transpose(1, 2).reshape(b, c, h, w)
    patches = F.conv2d(patches, conv_w, padding="same", groups=c).flatten(2).transpose(1, 2)
    return torch.cat([side[:, :prefix], patches], 1)


def vit_oracle(model: DTLVisionTransformer, x):
    cfg, bb = model.dtl_cfg, model.backbone
    taps = {int(k): (t.lora_A, t.lora_B) for k, t in model.side.taps.items()}
    conv_w = model.side.fusion.weight if model.side.fusion is not None else None
    grid = bb.patch_embed.grid_size
    h = bb._pos_embed(bb.patch_embed(x))
    s = torch.zeros_like(h)
    for i, blk in enumerate(bb.blocks):
        if i in cfg.csn_blocks and i in taps:  # taps after the last add-back cannot change the output
            a, b_ = taps[i]
            s = s + h @ a.t() @ b_.t()
        h = blk(h)
        if i in cfg.add_back_blocks:
            h = h + _phi(s * torch.sigmoid(cfg.beta * s), conv_w, grid, bb.num_prefix_tokens)
    return model.head(bb.norm(h[:, bb.num_prefix_tokens:].mean(1)))


def swin_oracle(model: DTLSwinTransformer, x):
    cfg, bb = model.dtl_cfg, model.backbone
    taps, convs = {}, {}
    for stage, side in model.side.items():
        taps.update({int(k): (t.lora_A, t.lora_B) for k, t in side.taps.items()})
        if side.fusion is not None:
            convs[int(stage)] = side.fusion.weight
    h = bb.patch_embed(x)
    g = 0
    for si, stage in enumerate(bb.layers):
        h = stage.downsample(h)
        s = torch.zeros_like(h)
        for blk in stage.blocks:
            if g in cfg.csn_blocks and g in taps:
                a, b_ = taps[g]
                s = s + h @ a.t() @ b_.t()
            h = blk(h)
            if g in cfg.add_back_blocks:
                side = s * torch.sigmoid(cfg.beta * s)
                if si in convs:
                    side = F.conv2d(side.permute(0, 3, 1, 2), convs[si], padding="same", groups=side.shape[-1]).permute(0, 2, 3, 1)
                h = h + side
            g += 1
    return model.head(bb.norm(h).mean((1, 2)))


def _check(model, oracle, x):
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith(("side.", "head.")):
                p.normal_(0, 0.2)
    model.eval()
    out = model(x)
    ref = oracle(model, x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    g1 = torch.autograd.grad(out.square().sum(), params)
    g2 = torch.autograd.grad(oracle(model, x).square().sum(), params)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


VIT_CASES = [
    # img, patch, dim, depth, heads, r, beta, k, csn, add
    ((40, 40), 8, 24, 5, 2, 3, 10.0, 4, "0-4", "2-4"),
    ((48, 32), 8, 16, 4, 2, 1, 100.0, 2, "1,3", "0-3"),      # non-square grid, add-back before first tap
    ((32, 32), 4, 40, 6, 4, 5, 1.0, 5, "0-5", "3"),           # single add-back block, taps after it dropped
    ((36, 36), 6, 32, 3, 2, 2, 100.0, 0, "2", "0-2"),
]


@pytest.mark.parametrize("img,patch,dim,depth,heads,r,beta,k,csn,add", VIT_CASES)
def test_vit_matches_literal_forward(img, patch, dim, depth, heads, r, beta, k, csn, add):
    torch.manual_seed(0)
    bb = VisionTransformer(img_size=img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, num_classes=0,
                           global_pool="token")
    model = DTLVisionTransformer(bb, 4, DTLConfig(r=r, beta=beta, fusion_size=k, csn_blocks=csn, add_back_blocks=add))
    _check(model, vit_oracle, torch.randn(2, 3, *img))


SWIN_CASES = [
    # img, patch, window, dim, depths, heads, r, beta, k, csn, add
    (32, 2, 4, 8, (2, 2, 2), (1, 2, 2), 2, 100.0, 4, "0-5", "1-5"),   # spans all stages, even kernel
    (32, 2, 2, 12, (1, 3, 2), (1, 2, 4), 3, 5.0, 3, "1-3,5", "3,5"),   # stage 1 tap 1..3 -> add 3; stage 2: 5
    (32, 4, 2, 8, (2, 2), (2, 2), 1, 100.0, 0, "0,2", "1,3"),
]


@pytest.mark.parametrize("img,patch,window,dim,depths,heads,r,beta,k,csn,add", SWIN_CASES)
def test_swin_matches_literal_forward(img, patch, window, dim, depths, heads, r, beta, k, csn, add):
    torch.manual_seed(0)
    bb = SwinTransformer(img_size=img, patch_size=patch, window_size=window, embed_dim=dim, depths=depths,
                         num_heads=heads, num_classes=0)
    model = DTLSwinTransformer(bb, 3, DTLConfig(r=r, beta=beta, fusion_size=k, csn_blocks=csn, add_back_blocks=add))
    _check(model, swin_oracle, torch.randn(2, 3, img, img))
