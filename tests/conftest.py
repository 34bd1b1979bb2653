import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures" / "reference"
TRAINING_FIXTURES = SHARED / "fixtures" / "training"

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"reference fixtures not found at {FIXTURES} (the shared/ folder must sit beside the repository)")
    return FIXTURES


@pytest.fixture(scope="session")
def training_fixtures_dir() -> Path:
    if not TRAINING_FIXTURES.is_dir():
        pytest.fail(f"training fixtures not found at {TRAINING_FIXTURES} (the shared/ folder must sit beside the "
                    f"repository)")
    return TRAINING_FIXTURES
