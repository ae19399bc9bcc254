"""Reading and writing MiniCPM-V-2 checkpoint folders in the official layout.

Layout: config.json, `model-0000K-of-0000N.safetensors` shards (the LLM first, then the vision tower and the
resampler, as the official checkpoint splits them), model.safetensors.index.json, the tokenizer files and
preprocessor_config.json. Before any weight is read, the folder's key and shape list is compared with the
model the config describes, and a mismatch is refused with the first offenders named.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.families.checkpoints import (
    MODEL_CONFIG,
    CheckpointError,
    check_safetensors_file,
    read_json_file,
)
from pipeline.utils.io import file_mode

from .configuration import MiniCPMVConfig
from .modeling import MiniCPMV

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files beside the weights that make a folder usable on its own (copied by merge/export).
SIDE_FILES = (
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "generation_config.json",
)


def resolve_model_path(path: str, allow_download: bool = False) -> Path:
    """Returns a local checkpoint folder for a folder path or a hub id (downloaded only when allowed)."""
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / MODEL_CONFIG).is_file():
            raise CheckpointError(f"{local}: no {MODEL_CONFIG}; expected a MiniCPM-V-2 checkpoint folder")
        return local
    if local.exists():
        raise CheckpointError(f"{local} is a file; model.path must be a checkpoint folder or a hub id")
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise CheckpointError(f"model folder {local} does not exist")
    if not allow_download or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise CheckpointError(
            f"model {path!r} is not a local folder and downloads are off. Download it on a machine with "
            f"network (`huggingface-cli download {path} --local-dir <folder>` or ModelScope's "
            f"`modelscope download --model OpenBMB/MiniCPM-V-2 --local_dir <folder>`), then set "
            f"model.path=<folder>; or set model.trust_hub=true to download from the hub"
        )
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.py"]))


def read_checkpoint_shapes(folder: Path) -> dict[str, tuple[list[int], Path]]:
    """Returns {key: (shape, shard file)} from the safetensors headers, without reading any tensor."""
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = read_json_file(index, "the weights' index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object; expected the safetensors index")
        shards = sorted(set(weight_map.values()))
    elif (folder / SINGLE_NAME).is_file():
        shards = [SINGLE_NAME]
    else:
        found = sorted(p.name for p in folder.glob("*.bin")) or "nothing"
        raise CheckpointError(
            f"{folder}: no {INDEX_NAME} or {SINGLE_NAME} (found {found}); only safetensors checkpoints are read"
        )
    shapes: dict[str, tuple[list[int], Path]] = {}
    for name in shards:
        shard = folder / name
        if not shard.is_file():
            raise CheckpointError(f"{folder}: shard {name} listed in {INDEX_NAME} is missing")
        check_safetensors_file(shard)
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                shapes[key] = (list(f.get_slice(key).get_shape()), shard)
    return shapes


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Returns every tensor of a checkpoint folder in the official layout, as stored (the model's own
    parameter names and dtypes), shard by shard as its index lists them."""
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted({p for _, p in read_checkpoint_shapes(folder).values()}):
        weights.update(load_file(str(shard)))
    return weights


def expected_shapes(config: MiniCPMVConfig) -> dict[str, list[int]]:
    """Returns {key: shape} of the model the config describes, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = MiniCPMV(config)
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def check_checkpoint(folder: Path, config: MiniCPMVConfig, limit: int = 10) -> None:
    """Raises CheckpointError naming the first missing, unexpected or mis-shaped keys of the folder."""
    found = read_checkpoint_shapes(folder)
    want = expected_shapes(config)
    missing = [k for k in want if k not in found]
    unexpected = [k for k in found if k not in want]
    wrong = [
        f"{k}: {found[k][0]} in {found[k][1].name}, expected {want[k]}"
        for k in want
        if k in found and found[k][0] != want[k]
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys, first: {missing[:limit]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, first: {unexpected[:limit]}")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches, first: {wrong[:limit]}")
        raise CheckpointError(f"{folder} does not match its {MODEL_CONFIG}: " + "; ".join(parts))


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    allow_download: bool = False,
) -> MiniCPMV:
    """Returns the model of a checkpoint folder (or hub id), checked key by key, in eval mode."""
    folder = resolve_model_path(str(path), allow_download)
    config = MiniCPMVConfig.from_pretrained(folder)
    check_checkpoint(folder, config)
    with torch.device("meta"):
        model = MiniCPMV(config)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted({p for _, p in read_checkpoint_shapes(folder).values()}):
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key).to(dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.resampler.pos_embed.requires_grad_(False)
    return model.to(device).eval()


def _shard_plan(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    # LLM tensors fill the first shard(s); vision tower and resampler start a new one, as officially.
    groups = [[k for k in state if k.startswith("llm.")], [k for k in state if not k.startswith("llm.")]]
    shards: list[list[str]] = []
    for keys in groups:
        current: list[str] = []
        size = 0
        for k in keys:
            nbytes = state[k].numel() * state[k].element_size()
            if current and size + nbytes > max_shard_bytes:
                shards.append(current)
                current, size = [], 0
            current.append(k)
            size += nbytes
        if current:
            shards.append(current)
    return shards


def save_checkpoint(
    model: MiniCPMV,
    folder: str | Path,
    max_shard_bytes: int = 5 * 1024**3,
    dtype: torch.dtype | None = None,
    source_folder: Path | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Writes the model into `folder` in the official layout, atomically; returns the folder.

    Side files (tokenizer, preprocessor config, remote-code .py files) are copied from `source_folder`.
    `state` replaces `model.state_dict()` (e.g. the full weights gathered from FSDP shards).
    """
    folder = Path(folder)
    tmp = folder.with_name(f".tmp-{folder.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    source = model.state_dict() if state is None else state
    state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in source.items()}
    plan = _shard_plan(state, max_shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    for i, keys in enumerate(plan, start=1):
        name = f"model-{i:05d}-of-{len(plan):05d}.safetensors"
        save_file({k: state[k] for k in keys}, str(tmp / name), metadata={"format": "pt"})
        os.chmod(tmp / name, file_mode())  # safetensors writes 0600 whatever the umask
        for k in keys:
            weight_map[k] = name
            total += state[k].numel() * state[k].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config = model.config.to_dict()
    config["architectures"] = ["MiniCPMV"]
    config["torch_dtype"] = str(dtype or next(iter(state.values())).dtype).replace("torch.", "")
    config.pop("dtype", None)
    (tmp / MODEL_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if source_folder is not None:
        for name in SIDE_FILES:
            if (source_folder / name).is_file():
                shutil.copyfile(source_folder / name, tmp / name)  # mode from the umask
        for py in source_folder.glob("*.py"):
            shutil.copyfile(py, tmp / py.name)
    if folder.exists():
        old = folder.with_name(f".old-{folder.name}")
        if old.exists():
            shutil.rmtree(old)
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    else:
        tmp.rename(folder)
    return folder
