"""What the workflow test modules share (test_workflow.py, test_workflow_reliability.py)."""
import pytest

from vit_fast.dispatch import FORCE_TORCH_ENV


@pytest.fixture(scope="module", autouse=True)
def torch_path():
    """The module's tests run the PyTorch path: conftest turns on Triton's interpreter, which would run
    every kernel of every training step at interpreter speed (the op and model tests prove the kernels)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FORCE_TORCH_ENV, "1")
        yield
