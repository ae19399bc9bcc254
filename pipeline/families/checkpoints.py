"""What every family's checkpoints share: adapter folders (PEFT), the base pointer, whole-file checks.

A checkpoint folder is either a LoRA adapter (adapter_config.json + adapter_model.safetensors, in PEFT's
layout) or a full model folder (config.json + weights in the family's native layout). Every checkpoint the
pipeline writes also records the base folder it was trained on (base_model.json).
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

log = logging.getLogger(__name__)

BASE_POINTER = "base_model.json"  # written into every checkpoint: which base folder it was trained on
ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"  # a full model folder's settings (transformers' CONFIG_NAME)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_DAMAGED = "the file is damaged (an interrupted copy or write?)"
# A full model's shards (merge.shard_size's default): MiniCPM-V-2's bf16 LLM (6.0 GB) in one shard, its vision
# tower and resampler in another, as the official checkpoint
DEFAULT_SHARD_SIZE = "10GB"
SIZE_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)\s*$")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the folder and the offending keys."""


def parse_size(text: str | int, key: str = "merge.shard_size") -> int:
    """Returns a byte count from a size like 5GB (10^9), 500MB or 2GiB (2^30); a bare int is bytes.

    Raises ValueError naming `key` (the setting the size came from) for anything else or a size of 0."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match or match.group(2) not in SIZE_UNITS:
        raise ValueError(f"{key}={text} is not a size; use e.g. 5GB, 500MB or 2GiB")
    size = int(float(match.group(1)) * SIZE_UNITS[match.group(2)])
    if size <= 0:
        raise ValueError(f"{key}={text} must be larger than 0 bytes")
    return size


DEFAULT_SHARD_BYTES = parse_size(DEFAULT_SHARD_SIZE)


def check_safetensors_file(path: Path) -> None:
    """Raise CheckpointError naming `path` when it is not a whole safetensors file (header and data).

    Reads only the header: its length prefix, its JSON, and the end of the last tensor's bytes, which must
    be the end of the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors header; {_DAMAGED}")
        header_len = int.from_bytes(prefix, "little")
        if header_len > size - 8:
            raise CheckpointError(
                f"{path}: truncated: {size} bytes, but its header alone claims {header_len}; {_DAMAGED}"
            )
        try:
            header = json.loads(handle.read(header_len))
            ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise CheckpointError(f"{path}: unreadable safetensors header ({err}); {_DAMAGED}") from None
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        state = "truncated" if size < expected else "longer than its header says"
        raise CheckpointError(f"{path}: {state}: {size} bytes, its header says {expected}; {_DAMAGED}")


def read_json_file(path: Path, what: str) -> dict:
    """Return the JSON object in `path`; raise CheckpointError naming the file, the line and the problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing ({what})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path}: not UTF-8 text ({err}); {_DAMAGED}") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg} ({what})"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object ({what}), got {type(data).__name__}")
    return data


def check_adapter_folder(folder: Path) -> dict:
    """Return the adapter config of a LoRA checkpoint folder after checking that its files are whole.

    Without this a missing weights file sends PEFT to the hub with the folder as a repository id.
    """
    folder = Path(folder)
    config = read_json_file(folder / ADAPTER_CONFIG, "the LoRA adapter's settings")
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        found = sorted(p.name for p in folder.glob("adapter_model*")) or "no adapter weights"
        raise CheckpointError(
            f"{folder}: {ADAPTER_WEIGHTS} is missing (found {found}); the checkpoint is incomplete: use "
            "another checkpoint of the run (sft/last, sft/best, sft/checkpoint-N)"
        )
    check_safetensors_file(weights)
    return config


def checkpoint_kind(path: Path) -> str:
    """Returns "adapter" for a PEFT folder, "full" for a model folder; raises for anything else."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if (path / ADAPTER_CONFIG).is_file():
        return "adapter"
    if (path / MODEL_CONFIG).is_file():
        return "full"
    raise CheckpointError(
        f"{path} is neither a LoRA checkpoint ({ADAPTER_CONFIG}) nor a model folder ({MODEL_CONFIG})"
    )


def adapter_base(ckpt: Path, fallback: Path) -> Path:
    """Returns the base folder an adapter checkpoint records (its base_model.json), else `fallback`."""
    pointer = ckpt / BASE_POINTER
    if pointer.is_file():
        recorded = Path(json.loads(pointer.read_text())["base_model_path"])
        if recorded.is_dir():
            return recorded
        log.warning("base model %s recorded in %s is gone; using %s", recorded, pointer, fallback)
    return fallback


def parameters_in_folder(path: str | Path) -> int | None:
    """Returns how many parameters the safetensors files of a model folder hold, read from their headers (no
    tensor is loaded); None for a hub id not yet downloaded, a folder without safetensors files or one whose
    headers cannot be read (the caller then does without the count)."""
    folder = Path(path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    try:
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                total += sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
    except Exception as err:  # a damaged file is named when the model loads; the plan does without
        log.debug("cannot count the parameters of %s: %s", folder, err)
        return None
    return total
