"""Run timm's own ``test_models.py`` (an unmodified copy, see README.md) against the ``dtl_*`` models.

- while pytest imports ``test_models.py``, ``timm.list_models`` is narrowed to the selected ``dtl_*`` models,
  classified as their backbones (``timm_dtl_selection``); every test of another model is deselected;
- the Hugging Face Hub is offline (``HF_HUB_OFFLINE=1``); the backbone weights that the pretrained tests load
  come from a hub cache written here (random weights of the real architectures, in the real layout);
- tests that cannot apply are skipped with the reason (see ``SKIP``), never silently.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
HERE = Path(__file__).resolve().parent
for p in (str(HERE), str(HERE.parent)):
    if p not in sys.path:
        sys.path.insert(0, p)

import huggingface_hub.constants as hf_constants  # noqa: E402
import timm  # noqa: E402

hf_constants.HF_HUB_OFFLINE = True  # read at call time by huggingface_hub

import timm_dtl_selection as sel  # noqa: E402  (imports models: registers dtl_*)

TIMM_TESTS = HERE / "test_models.py"

SKIP = {
    "test_model_backward": "asserts that every parameter gets a gradient; a DTL backbone is frozen and must not: "
                           "the DTL variant is test_dtl_backward.py::test_model_backward_dtl",
    "test_model_backward_fx": "asserts that every parameter gets a gradient; a DTL backbone is frozen and must not: "
                              "the DTL variant is test_dtl_backward.py::test_model_backward_fx_dtl",
    "test_model_forward_torchscript": "torch.jit.script is not supported by the DTL wrappers (README; trace, FX, "
                                      "torch.export and torch.compile are, test_timm_api.py)",
    "test_model_forward_fx_torchscript": "torch.jit.script is not supported by the DTL wrappers (README; trace, FX, "
                                         "torch.export and torch.compile are, test_timm_api.py)",
}
PRETRAINED_TESTS = ("test_model_load_pretrained", "test_model_features_pretrained")
_MARKERS = ("base", "cfg", "features", "fxforward", "fxbackward", "torchscript", "timeout(seconds)")


def pytest_configure(config):
    for m in _MARKERS:
        config.addinivalue_line("markers", f"{m}: timm test_models.py marker")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """Narrow timm.list_models while test_models.py is imported (its parametrize lists call it then)."""
    target = isinstance(collector, pytest.Module) and Path(str(collector.path)).resolve() == TIMM_TESTS
    if target:
        timm.list_models = sel.dtl_list_models
    try:
        yield
    finally:
        if target:
            timm.list_models = sel.REAL_LIST_MODELS


def pytest_collection_modifyitems(config, items):
    kept, dropped = [], []
    for item in items:
        if Path(str(item.path)).resolve() != TIMM_TESTS:
            kept.append(item)
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        name = params.get("model_name")
        if not (isinstance(name, str) and name.startswith("dtl_")):
            dropped.append(item)
            continue
        reason = SKIP.get(getattr(item, "originalname", item.name))
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
        kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(scope="session")
def dtl_hub_cache(tmp_path_factory):
    """A hub cache holding (random) weights for the backbone tag of every selected pretrained dtl_* cfg."""
    from helpers_hub import write_timm_weights

    from models.timm_api import backbone_tag_of

    cache = tmp_path_factory.mktemp("hf_hub_cache")
    for name in sel.dtl_list_models(pretrained=True):
        arch, tag = name.split(".", 1)
        write_timm_weights(cache, backbone_tag_of(arch, tag))
    return cache


@pytest.fixture(autouse=True)
def _offline_hub_for_pretrained_tests(request, monkeypatch):
    if getattr(request.node, "originalname", "") in PRETRAINED_TESTS:
        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(request.getfixturevalue("dtl_hub_cache")))
    yield
