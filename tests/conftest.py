"""Shared test setup: offline, quiet, one CPU thread (tiny models gain nothing from more, and lose much when
cores are shared), the `compose` fixture over the shipped conf/, and the tiny twins, each built once a session.
Plain helpers (configs, JSON lines, runs, ports) are in tests/helpers.py.

The twin fixtures hand out folders shared by every test of the session: read them, load them, train from
them, but write into a copy (`twin_copy`, or tests.helpers.copy_twin in a module's fixture). The session's
end checks that every shared twin still holds what it was built with.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

# before anything imports wandb, transformers or tokenizers
os.environ["WANDB_MODE"] = "offline"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# The pre-trained tiny twin comes from the checkout's cache (.cache/, or $PIPELINE_CACHE), as for `make run`:
# built once per checkout, under a lock, so concurrent test processes share it safely.

import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from tests.helpers import build_varied_twin, compose_config, copy_twin  # noqa: E402

torch.set_num_threads(1)
# (the pipeline's model code is imported by the twin fixtures when first asked for, not by every test)


@pytest.fixture(autouse=True)
def _fresh_compile_counters() -> None:
    """torch.compile counts graphs and graph breaks for the whole process: each test starts from zero, so a
    test that asserts no break (or reads the reasons the training log warns with) sees its own only."""
    utils = sys.modules.get("torch._dynamo.utils")
    if utils is not None:
        utils.counters.clear()


@pytest.fixture
def compose() -> Callable[..., DictConfig]:
    """Yield compose_config: compose(["lora=all", "lora.r=16"]) -> the composed DictConfig."""
    return compose_config


# ----- the tiny twins, shared by the whole session


def _contents(folder: Path) -> dict[str, str]:
    """Returns {file path inside `folder`: sha256 of its bytes}."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="session")
def _shared_twins() -> Iterator[dict[Path, dict[str, str]]]:
    """{folder: its contents when built} of every shared twin; at the session's end, an error names any that
    a test changed (that test must take a copy: sharing must not couple tests)."""
    shared: dict[Path, dict[str, str]] = {}
    yield shared
    changed = {}
    for folder, before in shared.items():
        after = _contents(folder)
        names = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
        if names:
            changed[str(folder)] = names
    if changed:
        pytest.fail(
            f"tests wrote into shared twins (write into twin_copy's copy instead): {changed}", pytrace=False
        )


def _share(shared: dict[Path, dict[str, str]], folder: Path) -> Path:
    shared[folder] = _contents(folder)
    return folder


@pytest.fixture(scope="session")
def family_twin(tmp_path_factory, _shared_twins) -> Callable[[str], Path]:
    """family_twin(name) -> the folder of family `name`'s tiny twin (seeded random weights, as
    `get_family(name).build_tiny` writes it), built on the first
    call for that family, once a session. Names: minicpm_v2, minicpm_v4_6, qwen2_5_vl, qwen3_vl."""
    from pipeline.families import get_family

    root = tmp_path_factory.mktemp("twins")
    built: dict[str, Path] = {}

    def twin(name: str) -> Path:
        if name not in built:
            folder = get_family(name).build_tiny(root / f"{name}_tiny")
            built[name] = _share(_shared_twins, Path(folder))
        return built[name]

    return twin


@pytest.fixture(scope="session")
def tiny_twin(family_twin) -> Path:
    """MiniCPM-V-2's tiny twin with random weights (builds in a second; enough for plumbing, scoring and
    comparing code paths, not for learning)."""
    return family_twin("minicpm_v2")


@pytest.fixture(scope="session")
def pretrained_twin(_shared_twins) -> Path:
    """The pipeline's default model: MiniCPM-V-2's tiny twin pre-trained on colour questions, from the
    checkout's cache (built there on first use, as by `make run`), so that fine-tuning has something to adapt."""
    from pipeline.training.twin import ensure_tiny_twin

    return _share(_shared_twins, ensure_tiny_twin())


@pytest.fixture(scope="session")
def briefly_pretrained_twin(tmp_path_factory, _shared_twins) -> Path:
    """MiniCPM-V-2's tiny twin after 20 steps of the pre-training (not the cached default's 150)."""
    from pipeline.training.twin import build_pretrained_twin

    folder = tmp_path_factory.mktemp("pretrained-20") / "minicpm_v2_tiny"
    return _share(_shared_twins, build_pretrained_twin(folder, steps=20))


@pytest.fixture(scope="session")
def varied_twin(tmp_path_factory, _shared_twins) -> Callable[[str], Path]:
    """varied_twin(name) -> family `name`'s tiny twin with its matrices redrawn larger (tests.helpers.
    build_varied_twin: greedy answers that differ per prompt and image), built once a session per family."""
    from pipeline.families import get_family

    root = tmp_path_factory.mktemp("varied-twins")
    built: dict[str, Path] = {}

    def twin(name: str) -> Path:
        if name not in built:
            built[name] = _share(_shared_twins, build_varied_twin(get_family(name), root / f"{name}_tiny"))
        return built[name]

    return twin


@pytest.fixture
def twin_copy(tmp_path) -> Callable[..., Path]:
    """twin_copy(twin, name=None) -> a copy of the twin folder `twin` at tmp_path/name (default: its own
    name), this test's to change."""

    def copy(twin: Path, name: str | None = None) -> Path:
        return copy_twin(twin, tmp_path / (name or twin.name))

    return copy
