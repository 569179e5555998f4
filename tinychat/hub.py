"""Model names -> local directories: the embedded default, local paths, and Hugging Face Hub ids."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import TinychatError

DEFAULT_MODEL = "smollm2-135m-instruct"
# Files worth downloading from a Hub repo: never pickles, never remote code.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]


def models_dir() -> Path:
    """Where imported and quantized models live: $TINYCHAT_MODELS, else models/ of a source checkout,
    else the user's cache directory."""
    if os.environ.get("TINYCHAT_MODELS"):
        return Path(os.environ["TINYCHAT_MODELS"])
    checkout = Path(__file__).resolve().parent.parent / "models"
    if checkout.is_dir() and os.access(checkout, os.W_OK):
        return checkout
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "tinychat" / "models"


def resolve_model(name: str) -> Path:
    """A directory holding config.json for `name` (importing or downloading it on first use)."""
    if name == DEFAULT_MODEL:
        from .gguf_import import ensure_default_model

        return ensure_default_model(models_dir())
    path = Path(name).expanduser()
    if path.exists():
        return path
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return download(name)
    raise TinychatError(f"{name}: no such model directory (use a local directory, a Hub id like "
                        f"org/name, or {DEFAULT_MODEL})")


def download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError:
        raise TinychatError(f"{repo_id}: cannot download (offline?) and it is not in the Hugging Face cache; "
                            "connect to the network or pass a local model directory") from None
    except RepositoryNotFoundError:
        raise TinychatError(f"{repo_id}: no such model on the Hugging Face Hub (or it is gated/private; "
                            "run `huggingface-cli login`)") from None
    except (HfHubHTTPError, OSError) as e:
        raise TinychatError(f"{repo_id}: download failed ({e}); check the network or pass a local directory") from None
