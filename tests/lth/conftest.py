"""Fixtures of the lth tests."""
import pytest


@pytest.fixture(autouse=True)
def _no_torchrun_env(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on 2 shared cores: one thread is faster and immune to a busy neighbour."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
