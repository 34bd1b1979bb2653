"""The suite's shared fixtures and its tiers.

Every test module has exactly one tier, assigned here and nowhere else (``TIERS``); the tier becomes a pytest
marker (registered in pytest.ini) on each of its tests:

- ``unit``: pure functions and single-module behaviour, in-process;
- ``integration``: in-process trainings (``train.main``) and flows across several modules;
- ``e2e``: subprocess entry points (train.py, the launchers, torchrun, tools/run_table.py and the other tools).

``slow`` comes on top of a module's tier, for whole modules or single tests (``SLOW``): the long ones (DDP and
torchrun, whole-table runs, the original's whole training recipe, torch.compile, the CLIs that train). ``--quick``
(``bash run_tests.sh --quick``) deselects them; tests/test_suite_tiers.py checks that what remains still imports
every project module.

A test module missing from ``TIERS`` is a collection error, so that a new file cannot go untiered.
"""
import os
from pathlib import Path
from typing import Dict, Tuple

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
FIXTURES = TESTS / "fixtures" / "reference"
TRAINING_FIXTURES = TESTS / "fixtures" / "training"

TIER_MARKERS = ("unit", "integration", "e2e")

# test module (path under tests/) -> tier
TIERS: Dict[str, str] = {
    "test_aggregate.py": "unit",
    "test_baselines.py": "unit",
    "test_check_data.py": "unit",
    "test_data.py": "unit",
    "test_dtl_vit.py": "unit",
    "test_lean.py": "unit",
    "test_predict.py": "unit",
    "test_prefix_cache.py": "unit",
    "test_rand_augment.py": "unit",
    "test_swin.py": "unit",
    "test_suite_tiers.py": "unit",
    "test_swin_lean.py": "unit",
    "test_timm_api.py": "unit",
    "test_unseen_configs.py": "unit",
    "test_delta.py": "unit",
    "test_families.py": "unit",
    "test_share_families.py": "unit",
    "test_layers.py": "unit",
    "test_pretrained_errors.py": "unit",
    "test_run_identity_utils.py": "unit",
    "test_shared_prefix.py": "unit",
    "test_specs.py": "unit",
    "test_tables.py": "unit",
    "test_trainer.py": "unit",
    "timm_models/test_dtl_backward.py": "unit",
    "timm_models/test_models.py": "unit",
    "test_bad_input.py": "integration",
    "test_baselines_train.py": "integration",
    "test_bench_memory.py": "integration",
    "test_benchmarks.py": "integration",
    "test_cuda_paths.py": "integration",
    "test_delta_folder_train.py": "integration",
    "test_hostile_inputs.py": "integration",
    "test_initial_checkpoint.py": "integration",
    "test_protocols.py": "integration",
    "test_reliability.py": "integration",
    "test_resume.py": "integration",
    "test_swin_train.py": "integration",
    "test_train.py": "integration",
    "test_train_lean_cache.py": "integration",
    "test_data_strict.py": "integration",
    "test_folder_data.py": "integration",
    "test_run_identity.py": "integration",
    "test_interrupt.py": "integration",
    "test_ddp.py": "e2e",
    "test_gpu_check.py": "e2e",
    "test_launch_ddp.py": "e2e",
    "test_launchers.py": "e2e",
    "test_run_table.py": "e2e",
    "test_training_fixtures.py": "e2e",
    "test_launcher_env.py": "e2e",
    "test_run_table_safety.py": "e2e",
}

# `slow` on top of the tier: a whole module ("test_x.py") or one test ("test_x.py::test_name", every
# parametrisation of it). Seconds measured on 2 shared CPU cores.
SLOW: Tuple[str, ...] = (
    "test_ddp.py",  # two gloo processes against one (9 s)
    "test_gpu_check.py",  # tools/gpu_check.sh's CPU branch (18 s)
    "test_launch_ddp.py",  # torchrun through the launchers, kill -9 of the launcher (43 s)
    "test_run_table.py",  # whole tables, interrupted and resumed, a stand-in SLURM (46 s)
    "test_training_fixtures.py",  # the original's whole VTAB recipe through the launchers (10 s)
    "test_baselines_train.py::test_launcher_command_and_eval_only_round_trip",  # 5 s
    "test_bench_memory.py::test_cli_writes_the_documented_json",  # 13 s
    "test_cuda_paths.py::test_cuda_checks_script_on_the_cpu",  # 7 s
    "test_dtl_vit.py::test_check_reference_cli_passes_and_fails",  # 8 s
    "test_prefix_cache.py::test_bench_train_cache_trains_like_default",  # 17 s
    "test_reliability.py::test_atomic_writers_report_the_os_reason",  # 4 s
    "test_reliability.py::test_cuda_without_a_gpu_is_one_error_line",  # 4 s
    "test_reliability.py::test_failed_write_names_the_file_and_the_reason",  # 4 s
    "test_reliability.py::test_two_train_processes_in_one_folder",  # 7 s
    "test_swin.py::test_check_reference_cli_passes_on_swin",  # 4 s
    "test_swin_train.py::test_eval_only_reproduces_the_accuracy",  # with the next: a launcher run (5 s)
    "test_swin_train.py::test_launcher_trains_a_tiny_swin",
    "test_timm_api.py::test_trace_fx_export_compile",  # torch.compile (6 s)
    "test_train.py::test_demo_pipeline_pretrain_export_npz_and_launcher",  # 6 s
    "test_train_lean_cache.py::test_two_processes_train_from_the_cache",  # 8 s
    "test_interrupt.py::test_signal_ends_with_one_line_and_a_resumable_folder",  # SIGINT, SIGTERM on real runs
    "test_interrupt.py::test_group_signal_with_dataloader_workers",  # 4 runs with workers, killpg (~20 s)
    "test_folder_data.py::test_custom_launcher",  # train_scripts/custom through bash and train.py (8 s)
)

# run_tests.sh gives each parallel worker its share of the cores through OMP_NUM_THREADS (torch reads it at
# import); run on its own, pytest uses at most 2 threads: tiny models are slower on more.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def module_key(path) -> str:
    """The key of a test module in ``TIERS``: its path under tests/, with '/'."""
    return Path(path).resolve().relative_to(TESTS).as_posix()


def is_slow(key: str, test_name: str) -> bool:
    return key in SLOW or f"{key}::{test_name}" in SLOW


class UntieredModule(pytest.Module):
    """A test module without a tier: collecting it is an error that says how to fix it."""

    def collect(self):
        raise self.CollectError(
            f"{module_key(self.path)} has no tier: add it to TIERS in tests/conftest.py as "
            f"'{module_key(self.path)}': one of {', '.join(TIER_MARKERS)} (and its long tests to SLOW)")


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true",
                     help="the quick selection: every test not marked slow (it imports every project module)")


def pytest_pycollect_makemodule(module_path, parent):
    if module_key(module_path) not in TIERS:
        return UntieredModule.from_parent(parent, path=module_path)
    return None


@pytest.hookimpl(tryfirst=True)  # before -m selects on the markers added here
def pytest_collection_modifyitems(config, items):
    quick = config.getoption("quick")
    kept, dropped = [], []
    for item in items:
        key = module_key(item.path)
        item.add_marker(TIERS[key])
        slow = is_slow(key, getattr(item, "originalname", item.name))
        if slow:
            item.add_marker("slow")
        (dropped if quick and slow else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """tests/fixtures/reference/: one forward and backward of the original code per folder (fixtures/README.md)."""
    return FIXTURES


@pytest.fixture(scope="session")
def training_fixtures_dir() -> Path:
    """tests/fixtures/training/: two training runs of the original VTAB-1k recipe (tests/fixtures/README.md)."""
    return TRAINING_FIXTURES
