import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Dynamo caches compiled code per code object across tests; a test that compiles the same
    # sampler under other options would otherwise reuse (or be limited by) an earlier compile.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="session", autouse=True)
def single_thread():
    # The test models are tiny: intra-op threads only add overhead, and on a loaded 2-core
    # machine two OpenMP threads made small ops erratically slow (up to 10x).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
