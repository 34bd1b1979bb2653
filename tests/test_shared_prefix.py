"""models/shared_prefix.py: DTL tasks on one backbone, the common prefix run once, each task's logits exactly
those of its model alone (ViT and Swin)."""
import pytest
import torch

from models import DTLConfig, create_dtl_model
from models.delta import delta_from_model, read_delta, write_pth
from models.shared_prefix import SharedPrefixDTL, shared_model_from_deltas
from utils.errors import BackboneMismatchError, CheckpointError

VIT, VIT_KW = "vit_tiny_patch16_224", dict(patch_size=8, embed_dim=32, num_heads=2, depth=6)
SWIN, SWIN_KW = "swin_tiny_patch4_window7_224", dict(embed_dim=16, depths=(2, 2, 6, 2), num_heads=(1, 2, 4, 8),
                                                     window_size=2, patch_size=2)
CASES = {
    # name: (backbone, kwargs, tasks (classes, DTL), resume, recorded blocks)
    "vit": (VIT, VIT_KW, [(5, DTLConfig(r=2, fusion_size=0, csn_blocks="0-5", add_back_blocks="3-5")),
                          (3, DTLConfig(r=4, fusion_size=3, csn_blocks="1,3-5", add_back_blocks="2,4"))],
            2, [0, 1, 2, 3]),
    # Swin: taps of the first add-back's stage only; stage 1 (blocks 2-3), stage 2 (4-9)
    "swin": (SWIN, SWIN_KW, [(5, DTLConfig(r=2, fusion_size=0, csn_blocks="4-11", add_back_blocks="8-11")),
                             (3, DTLConfig(r=4, fusion_size=5, csn_blocks="2-11", add_back_blocks="3,6,9-11")),
                             (4, DTLConfig(r=2, fusion_size=3, csn_blocks="4-7", add_back_blocks="5,7"))],
             3, [2, 3, 4, 5, 6, 7, 8]),
}


def _trained_like(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    name, kw, tasks, resume, record = CASES[request.param]
    d = tmp_path_factory.mktemp(f"shared_{request.param}")
    torch.manual_seed(0)
    torch.save(create_dtl_model(name, 2, img_size=32, **kw).backbone.state_dict(), d / "bb.pth")
    models, deltas = [], []
    for k, (nc, cfg) in enumerate(tasks):
        m = _trained_like(create_dtl_model(name, nc, cfg, load_path=str(d / "bb.pth"), img_size=32, **kw), k)
        models.append(m)
        deltas.append(read_delta(write_pth(delta_from_model(m, dataset=f"t{k}"), d / f"t{k}.pth")))
    return d, models, deltas, resume, record, (name, kw)


def test_predictions_identical_to_each_model_alone(case):
    d, models, deltas, resume, record, _ = case
    shared = shared_model_from_deltas(deltas, load_path=str(d / "bb.pth"))
    assert (shared.resume, shared.record, shared.names) == (resume, record, [f"t{k}" for k in range(len(models))])
    assert all(t.backbone is shared.backbone for t in shared.tasks)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = shared(x)
    with torch.no_grad():
        for k, (logits, model) in enumerate(zip(out, models)):
            assert torch.equal(logits, model(x)), k  # independent full models: bit-identical
    assert all(torch.equal(a, b) for a, b in zip(out, shared.forward_separately(x)))
    # any subset shares its own prefix, with the same results
    sub = shared_model_from_deltas(deltas[:1], load_path=str(d / "bb.pth"))
    with torch.no_grad():
        assert torch.equal(sub(x)[0], models[0](x))


def test_refusals(case, tmp_path):
    d, models, deltas, resume, record, (name, kw) = case
    a, b = models[0], models[1]
    with pytest.raises(ValueError, match="same backbone"):
        SharedPrefixDTL([a, b])  # two models, two backbone modules
    other = deltas[1].__class__(deltas[1].spec.replace(img_size=64), deltas[1].tensors, deltas[1].trained_on,
                                source="other")
    with pytest.raises(CheckpointError, match="do not share one backbone"):
        shared_model_from_deltas([deltas[0], other], load_path=str(d / "bb.pth"))
    torch.manual_seed(5)
    torch.save(create_dtl_model(name, 2, img_size=32, **kw).backbone.state_dict(), tmp_path / "other.pth")
    with pytest.raises(BackboneMismatchError, match="bb.pth"):
        shared_model_from_deltas(deltas, load_path=str(tmp_path / "other.pth"))
