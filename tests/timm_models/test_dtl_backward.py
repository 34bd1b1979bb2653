"""The DTL variants of timm's ``test_model_backward`` / ``test_model_backward_fx``.

timm's tests assert that *every* parameter receives a gradient. In a DTL model the backbone is frozen, so the
right property is: every trainable tensor (side network and head, by the model's trainable rule) receives a
finite gradient, no frozen tensor receives one, and the output has the requested classes. Otherwise these follow
timm's tests (same model selection, input size, batch, loss).
"""
from __future__ import annotations

import pytest
import torch
from timm import create_model, get_pretrained_cfg_value

from models.trainable import is_trainable, trainable_names
from timm_dtl_selection import dtl_list_models

try:
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names, NodePathTracer  # noqa: F401
    has_fx = True
except ImportError:  # pragma: no cover
    has_fx = False

MODELS = dtl_list_models(name_matches_cfg=True)


def _input_size(model_name: str):
    size = get_pretrained_cfg_value(model_name, "input_size")
    assert size is not None and get_pretrained_cfg_value(model_name, "fixed_input_size")
    return size


def _check_grads(model, named_params, outputs, num_classes):
    trainable = set(trainable_names(model))
    assert trainable, "a DTL model has trainable tensors"
    seen = set()
    for n, p in named_params:
        seen.add(n)
        if n in trainable:
            assert p.grad is not None, f"No gradient for trainable {n}"
            assert torch.isfinite(p.grad).all(), f"non-finite gradient for {n}"
            if n.startswith("head."):  # side gradients may be exactly zero at init (zero ViT head, zero lora_B)
                assert not p.grad.eq(0).all(), f"all-zero gradient for {n}"
        else:
            assert p.grad is None, f"frozen {n} received a gradient"
    assert trainable <= seen
    assert outputs.shape[-1] == num_classes
    assert not torch.isnan(outputs).any(), "Output included NaNs"


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("batch_size", [2])
def test_model_backward_dtl(model_name, batch_size):
    input_size = _input_size(model_name)
    model = create_model(model_name, pretrained=False, num_classes=42)
    model.train()
    outputs = model(torch.randn((batch_size, *input_size)))
    outputs.mean().backward()
    _check_grads(model, list(model.named_parameters()), outputs, 42)
    num_trainable = sum(p.numel() for n, p in model.named_parameters() if is_trainable(model, n))
    assert sum(p.grad.numel() for p in model.parameters() if p.grad is not None) == num_trainable


@pytest.mark.skipif(not has_fx, reason="torchvision's FX feature extraction is required")
@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("batch_size", [2])
def test_model_backward_fx_dtl(model_name, batch_size):
    from test_models import _create_fx_model

    input_size = _input_size(model_name)
    model = create_model(model_name, pretrained=False, num_classes=42)
    model.train()
    fx_model = _create_fx_model(model, train=True)
    outputs = torch.cat(tuple(fx_model(torch.randn((batch_size, *input_size))).values()))
    outputs.mean().backward()
    # the GraphModule shares the model's parameters: names are the model's
    _check_grads(model, list(model.named_parameters()), outputs, 42)
    assert sum(p.grad.numel() for p in fx_model.parameters() if p.grad is not None) == \
        sum(p.numel() for n, p in model.named_parameters() if is_trainable(model, n))
