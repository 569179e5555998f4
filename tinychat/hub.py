"""Model names -> local directories: the embedded default, packaged and local GGUF files, local paths, and
Hugging Face Hub ids."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import TinychatError

DEFAULT_MODEL = "smollm2-135m-instruct"
# Models whose GGUF an optional package ships (tinychat.gguf_import.PACKAGED_MODELS), by name.
PACKAGED_MODELS = ("gemma3-270m",)
PRECISIONS = ("w4a16", "fp16", "bf16", "fp32")
# The committed AWQ search results that quantize the default model on first use, with no data.
DEFAULT_W_BIT, DEFAULT_GROUP = 4, 64
# The model zoo lives in the source checkout's models/zoo (the README's set-up installs from the checkout).
ZOO_DIR = Path(__file__).resolve().parent.parent / "models" / "zoo"
DEFAULT_SEARCH = ZOO_DIR / f"{DEFAULT_MODEL}-w{DEFAULT_W_BIT}-g{DEFAULT_GROUP}.safetensors"
# Files worth downloading from a Hub repo: never pickles, never remote code.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]


def zoo_search_path(model_name: str, w_bit: int = 4, group_size: int = 64) -> Path | None:
    """The committed AWQ search results of a model and setting, if the zoo has them."""
    path = ZOO_DIR / f"{model_name}-w{w_bit}-g{group_size}.safetensors"
    return path if path.is_file() else None


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


def resolve_model(name: str, precision: str = "fp16") -> Path:
    """A directory holding config.json for `name` (importing, quantizing or downloading it on first use).

    `name`: the default model, a packaged GGUF model (gemma3-270m), a GGUF file (imported once into
    models_dir()/<its stem>), a model directory, or a Hub id. `precision` picks the variant of the default
    model: "w4a16" is its AWQ 4-bit checkpoint; other models are returned as they are.
    """
    if name == DEFAULT_MODEL:
        from .gguf_import import ensure_default_model

        source = ensure_default_model(models_dir())
        return ensure_default_awq(source) if precision == "w4a16" else source
    if name in PACKAGED_MODELS:
        from .gguf_import import ensure_packaged_model

        return ensure_packaged_model(name, models_dir())
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf" and not path.is_dir():
        if not path.is_file():
            raise TinychatError(f"{name}: no such GGUF file; check the path")
        from .gguf_import import ensure_gguf_import

        return ensure_gguf_import(path, models_dir() / path.stem)
    if path.exists():
        return path
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return download(name)
    raise TinychatError(f"{name}: no such model directory (use a local directory, a .gguf file, a Hub id like "
                        f"org/name, {DEFAULT_MODEL} or {', '.join(PACKAGED_MODELS)})")


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


def ensure_default_awq(source: Path) -> Path:
    """The default model's AWQ checkpoint, quantized on first use from the committed search results."""
    out = models_dir() / f"{DEFAULT_MODEL}-awq-w{DEFAULT_W_BIT}-g{DEFAULT_GROUP}"
    if (out / "config.json").is_file():
        return out
    from .quant.quantize import quantize_from_search

    if not DEFAULT_SEARCH.is_file():
        raise TinychatError(f"{DEFAULT_SEARCH}: the default model's AWQ search results are missing from this "
                            "installation; reinstall tinychat or use --precision fp16")
    from .atomic import write_errors, write_failed

    try:
        quantize_from_search(source, DEFAULT_SEARCH, out, DEFAULT_W_BIT, DEFAULT_GROUP)
    except write_errors() as e:  # written to a temporary directory first: `out` is not left half-done
        raise write_failed(e, out, "free disk space, or set TINYCHAT_MODELS to a writable directory") from None
    return out
