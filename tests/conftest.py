"""Shared fixtures: tiny tokenizer models on CPU."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/official_layout.py helper
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(autouse=True)
def _jobs_allowed(monkeypatch):
    """Each test starts with runtime.launch's jobs allowed: a test interrupting the ablation grid calls stop_jobs(),
    after which run_logged starts no job in the process (JobsStopped)."""
    import threading

    import runtime.launch

    monkeypatch.setattr(runtime.launch, "_stopped", threading.Event())


@pytest.fixture
def debug_model():
    """A randomly initialised debug-preset tokenizer in eval mode, fixed seed."""
    from unitok import UniTok, preset

    torch.manual_seed(0)
    return UniTok(preset("debug")).eval()


@pytest.fixture
def images():
    """Two random 32x32 images in [-1, 1]."""
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
