import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Dynamo caches compiled code per code object across tests; a test that compiles the same
    # sampler under other options would otherwise reuse (or be limited by) an earlier compile.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
