"""Calibration text -> token blocks [n_samples, seqlen] for the AWQ search.

Sources: a local file (plain text, one document per line, or JSONL with a "text" field per line) or
`pileval` (mit-han-lab/pile-val-backup, the set llm-awq and AutoAWQ calibrate on, via huggingface_hub).

Documents are shuffled with the seed, tokenized one by one until n_samples * seqlen tokens are in hand,
concatenated (no separator, as AutoAWQ does) and cut into blocks. Unlike llm-awq no long document is
dropped, so a small file still yields the full token budget.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Iterable

import torch

from ..errors import TinychatError

PILEVAL = "pileval"
PILEVAL_REPO = "mit-han-lab/pile-val-backup"
PILEVAL_FILE = "val.jsonl.zst"
# Documents of the (214k-document) pile validation set that are read and shuffled; plenty for 128 x 512.
PILEVAL_DOCS = 4000


def read_documents(path: str | Path) -> list[str]:
    """Non-empty documents of a text file: JSONL ("text" field) when every line is a JSON object with one,
    else one document per line."""
    path = Path(path)
    if not path.is_file():
        raise TinychatError(f"--calib {path}: no such file; give a text or JSONL file (or --calib {PILEVAL})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TinychatError(f"--calib {path}: not UTF-8 text; give a plain text or JSONL file") from None
    except OSError as e:  # unreadable: permissions, an I/O error, a file that vanished after the check
        raise TinychatError(f"--calib {path}: cannot read it ({e.strerror or e}); check the file and its "
                            "permissions, or give another file") from None
    lines = [line for line in text.splitlines() if line.strip()]
    docs = _jsonl_documents(lines, path) if lines and lines[0].lstrip().startswith("{") else lines
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise TinychatError(f"--calib {path}: the file has no text; give a file with one document per line")
    return docs


def _jsonl_documents(lines: list[str], path: Path) -> list[str]:
    docs = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise TinychatError(f"--calib {path}: line {number} is not valid JSON; a JSONL file needs one "
                                "object with a \"text\" field per line") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise TinychatError(f"--calib {path}: line {number} has no string \"text\" field; "
                                "each JSONL line must look like {\"text\": \"...\"}")
        docs.append(record["text"])
    return docs


def pileval_documents(limit: int = PILEVAL_DOCS) -> list[str]:
    """The first `limit` documents of the pile validation backup (downloaded once into the HF cache)."""
    try:
        import zstandard
    except ImportError:
        raise TinychatError(f"--calib {PILEVAL} needs the zstandard package (pip install zstandard); "
                            "or pass a local text file with --calib FILE") from None
    from huggingface_hub import hf_hub_download

    try:
        file = hf_hub_download(PILEVAL_REPO, PILEVAL_FILE, repo_type="dataset")
    except Exception as e:  # offline, proxy, auth: all end the same way for the user
        raise TinychatError(f"--calib {PILEVAL}: cannot download {PILEVAL_REPO} ({type(e).__name__}); "
                            "you may be offline: pass a local text file with --calib FILE") from None
    docs: list[str] = []
    with open(file, "rb") as raw:
        import io

        stream = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8")
        for line in stream:
            text = json.loads(line).get("text", "")
            if text.strip():
                docs.append(text)
            if len(docs) >= limit:
                break
    return docs


def calibration_blocks(documents: Iterable[str], tokenizer, n_samples: int = 128, seqlen: int = 512,
                       seed: int = 0, source: str = "calibration data") -> torch.Tensor:
    """Token ids [n, seqlen] (int64), n = n_samples unless the text is too short (then fewer, with a
    warning). `tokenizer` needs `encode(text, add_special_tokens=False) -> list[int]`."""
    if n_samples <= 0 or seqlen <= 0:
        raise TinychatError(f"--n-samples and --seqlen must be positive, got {n_samples} and {seqlen}")
    docs = list(documents)
    random.Random(seed).shuffle(docs)
    need = n_samples * seqlen
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer.encode(doc, add_special_tokens=False))
        if len(ids) >= need:
            break
    n = min(n_samples, len(ids) // seqlen)
    if n == 0:
        raise TinychatError(f"{source}: only {len(ids)} tokens, fewer than one block of --seqlen {seqlen}; "
                            "give more calibration text or a smaller --seqlen")
    if n < n_samples:
        print(f"warning: {source} holds {len(ids)} tokens: using {n} blocks of {seqlen} instead of "
              f"{n_samples}", file=sys.stderr)
    return torch.tensor(ids[: n * seqlen], dtype=torch.int64).view(n, seqlen)


def load_calibration(source: str | Path, tokenizer, n_samples: int = 128, seqlen: int = 512,
                     seed: int = 0) -> torch.Tensor:
    """`--calib` value (a file path or "pileval") -> token blocks [n, seqlen]."""
    if str(source) == PILEVAL and not Path(source).exists():
        docs, name = pileval_documents(), PILEVAL
    else:
        docs, name = read_documents(source), f"--calib {source}"
    return calibration_blocks(docs, tokenizer, n_samples, seqlen, seed, source=name)


def calibration_ids(calib, tokenizer_dir: Path, n_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Token blocks of `--calib`, tokenized with the model's own tokenizer (it feeds the embedding)."""
    from ..tokenizer import Tokenizer

    return load_calibration(calib, Tokenizer.from_dir(tokenizer_dir), n_samples, seqlen, seed)


def calibration_record(calib, ids: torch.Tensor, seed: int) -> dict:
    """What a search file says about its calibration."""
    return {"source": Path(str(calib)).name, "n_samples": int(ids.shape[0]), "seqlen": int(ids.shape[1]),
            "seed": seed}
