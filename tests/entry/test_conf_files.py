"""Every shipped yaml under conf/ holds only what differs from the schema (pipeline/config.py): a key set to
its default says nothing, and goes stale when the default changes."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from pipeline.config import GROUP_SCHEMAS, Config
from tests.helpers import CONF_DIR

# Hydra's own settings (conf/hydra/, a file's `hydra:` node) extend Hydra's and its plugins' schemas, not
# ours.
HYDRA_DIR = CONF_DIR / "hydra"
NOT_KEYS = ("defaults", "hydra")


def _schema_files() -> list[Path]:
    """Returns every yaml under conf/ whose keys the schema in pipeline/config.py defines."""
    return sorted(p for p in CONF_DIR.rglob("*.yaml") if HYDRA_DIR not in p.parents)


def _is_global(path: Path) -> bool:
    """Returns whether the file's keys are top-level ones: config.yaml, or a `# @package _global_` file."""
    return path.parent == CONF_DIR or "# @package _global_" in path.read_text().splitlines()[0]


def _parents(raw: DictConfig) -> list[str]:
    """Returns the options of the same group that a group file's defaults list builds on (not its schema)."""
    names = [entry for entry in raw.get("defaults", []) if isinstance(entry, str)]
    return [name for name in names if name != "_self_" and not name.startswith("base_")]


def _baseline(path: Path) -> DictConfig:
    """Returns what a file's keys land on: the schema's defaults with the options it builds on merged in."""
    raw = OmegaConf.load(path)
    if _is_global(path):
        return OmegaConf.structured(Config)
    base = OmegaConf.structured(GROUP_SCHEMAS[path.parent.name])
    for parent in _parents(raw):
        parent_path = path.parent / f"{parent}.yaml"
        base = OmegaConf.merge(_baseline(parent_path), _own_keys(parent_path))
    return base


def _own_keys(path: Path) -> dict:
    """Returns the keys a yaml sets (not its defaults list nor Hydra's node), interpolations unresolved."""
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return {key: value for key, value in raw.items() if key not in NOT_KEYS}


def keys_at_their_default(path: Path) -> list[str]:
    """Returns the keys of a yaml whose value, once merged onto what it builds on, changes nothing."""
    base = _baseline(path)
    before = OmegaConf.to_container(base, resolve=False)  # ??? for a value the schema leaves unset
    same = []
    for key, value in _own_keys(path).items():
        merged = OmegaConf.merge(base, {key: value})  # in the schema's types: 1e-4 -> 0.0001, {} onto {}
        if OmegaConf.to_container(merged, resolve=False)[key] == before[key]:
            same.append(str(key))
    return same


def test_schema_files_are_found():
    found = {str(p.relative_to(CONF_DIR)) for p in _schema_files()}
    assert {"config.yaml", "trainer/default.yaml", "trainer/low_memory.yaml", "experiment/full.yaml"} <= found
    assert not any(name.startswith("hydra/") for name in found)


@pytest.mark.parametrize("path", _schema_files(), ids=lambda p: str(p.relative_to(CONF_DIR)))
def test_every_shipped_yaml_holds_only_what_differs_from_the_schema(path: Path):
    assert keys_at_their_default(path) == [], (
        f"{path.relative_to(CONF_DIR)} sets these keys to their schema default (pipeline/config.py), or to "
        "what it builds on; drop them (a comment explaining the value belongs beside the schema's default)"
    )


def test_the_check_sees_a_default_a_change_and_what_a_file_builds_on(tmp_path: Path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "parent.yaml").write_text("defaults:\n  - base_model\n  - _self_\n\nname: x\npath: /m\n")
    (model / "child.yaml").write_text(
        "defaults:\n  - parent\n  - _self_\n\nname: x\nlora_lr: 1e-4\nfull_lr: 2e-5\nprocessor_kwargs: {}\n"
    )
    assert keys_at_their_default(model / "parent.yaml") == []
    assert keys_at_their_default(model / "child.yaml") == ["name", "lora_lr", "processor_kwargs"]
