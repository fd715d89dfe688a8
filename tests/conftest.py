import os
import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("PYTORCH_LIGHTNING_DISABLE_TIPS", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny networks: as fast, and immune to OpenMP spin-waits on a busy 2-core
    machine. Modules take it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
