import pyro
import pytest
import torch

# One intra-op thread for the whole session, set once: the suite's networks and batches are small,
# and on a shared 2-core machine two threads per process oversubscribe the cores (a busy CI box ran
# far slower with 2 than with 1).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _pyro_state():
    """Each test starts from an empty param store, validation on, and a fixed seed."""
    pyro.clear_param_store()
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()
