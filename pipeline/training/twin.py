"""Every family's tiny twin, pre-trained by one recipe, and its cache: built once per checkout and family,
deterministically, then reused.

    python -m pipeline.training.twin                          # the default family's twin at <cache>/<family>_tiny
    python -m pipeline.training.twin --family qwen2_5_vl      # Qwen2.5-VL's at <cache>/qwen2_5_vl_tiny
    python -m pipeline.training.twin --family NAME --out DIR  # one elsewhere (then model.path=DIR)

A family's random twin (`family.build_tiny`) is pre-trained on generated images with the question "what
colour?" and a one-word answer, plus text-only rows that say the demo's sentence (pipeline/data/demo.py's
`generate_pretrain`), so that its vision tower and projector carry the colour. The demo set asks about the
same kind of image for that sentence, which is what fine-tuning then teaches. The recipe is written over the
family interface alone (build_tiny, load, encode, collate_for_training, loss_outputs, save), so it is the
same for every family; a family whose twin needs another peak learning rate states it
(`Family.twin_pretrain_lr`). This module sits above both the families and the data code.

The cache is safe for many processes starting at once (a sweep on a fresh machine): one builds under a file
lock while the others wait, each build fills a folder of its own that is renamed into place, and a folder
that lacks any file its manifest lists, or was built by an older recipe, is rebuilt. The manifest is
written last.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.config import DEFAULT_FAMILY, default_twin_path, twin_name
from pipeline.data.demo import generate_pretrain
from pipeline.families import FAMILIES, get_family
from pipeline.families.base import EncodedSample, Family, messages_from_row
from pipeline.utils.io import atomic_write_json

log = logging.getLogger(__name__)

MANIFEST = "tiny_twin.json"  # written last: the recipe the folder was built with and the files it holds
# Bump whenever the recipe below (or the pre-training data) changes: cached twins of older recipes are rebuilt.
RECIPE_VERSION = 4
TWIN_SEED = 0  # the random weights' seed (family.build_tiny) and the pre-training's batch draws
PRETRAIN_SEED = 1234  # the pre-training rows' seed: other images than the demo set's
PRETRAIN_ROWS = 600
PRETRAIN_STEPS = 150
PRETRAIN_BATCH = 8


def _family(family: Family | str) -> Family:
    return get_family(family) if isinstance(family, str) else family


def pretrain_samples(family: Family, processor: Any) -> list[EncodedSample]:
    """Returns the pre-training rows encoded for `family` (each image question with its image)."""
    rows, images = generate_pretrain(PRETRAIN_ROWS, PRETRAIN_SEED)
    return [
        family.encode(
            processor,
            messages_from_row(row["query"], row["response"]),
            [images[name] for name in row.get("images", [])],
        )
        for row in rows
    ]


def pretrain(
    family: Family,
    model: nn.Module,
    processor: Any,
    steps: int = PRETRAIN_STEPS,
    *,
    seed: int = TWIN_SEED,
    batch_size: int = PRETRAIN_BATCH,
    lr: float | None = None,
) -> list[float]:
    """Full-trains the twin on the generated image questions; returns the loss per step.

    The loss of a step is the mean over the batch's supervised tokens (loss_sum / num_tokens); AdamW at
    `lr` (default: the family's `twin_pretrain_lr`) under a one-cycle schedule, gradients clipped at 1."""
    lr = family.twin_pretrain_lr if lr is None else lr
    samples = pretrain_samples(family, processor)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # whatever the forward might draw (no twin has dropout today)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=f"pre-training the {family.name} tiny twin (once)", unit="step")
    for _ in bar:
        pick = torch.randint(len(samples), (batch_size,), generator=generator).tolist()
        batch = family.collate_for_training(processor, [samples[i] for i in pick])
        sums = family.loss_outputs(model, batch)
        loss = sums.loss_sum / sums.num_tokens.clamp(min=1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    bar.close()
    model.eval()
    return losses


def _recipe(family: Family, steps: int) -> dict:
    recipe = {"recipe_version": RECIPE_VERSION, "family": family.name, "pretrain_steps": steps}
    if steps > 0:
        recipe |= {"pretrain_seed": PRETRAIN_SEED, "pretrain_lr": family.twin_pretrain_lr}
    return recipe


def _files(folder: Path) -> dict[str, int]:
    """Returns every file under `folder` (relative path -> bytes), the manifest aside."""
    return {
        path.relative_to(folder).as_posix(): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def _move_into_place(built: Path, folder: Path) -> None:
    """Renames the finished `built` folder to `folder`, replacing (then deleting) any folder there."""
    if folder.exists():
        old = Path(tempfile.mkdtemp(prefix=f".old-{folder.name}-", dir=folder.parent))
        os.replace(folder, old / folder.name)
        os.replace(built, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(built, folder)


def build_twin(family: Family | str, folder: str | Path, steps: int = PRETRAIN_STEPS) -> Path:
    """Returns `folder` after writing `family`'s twin there, pre-trained for `steps` (0 = random weights).

    Everything is written in a folder of this build's own next to `folder` and renamed into place at the
    end, the manifest last: a reader never sees a half-written twin and two builders never share a folder.
    """
    family = _family(family)
    folder = Path(folder).expanduser().absolute()
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".build-{folder.name}-", dir=folder.parent))
    losses: list[float] = []
    try:
        log.info("building the %s tiny twin at %s (once: later runs reuse it)", family.name, folder)
        built = family.build_tiny(work / "random", seed=TWIN_SEED)
        if steps > 0:
            model, processor = family.load(built)
            start = time.perf_counter()
            losses = pretrain(family, model, processor, steps)
            built = family.save(model, processor, work / "pretrained")
            tail = losses[-20:]
            log.info(
                "%s tiny twin pre-training loss %.3f -> %.3f (%d steps, %.0f s)",
                family.name,
                losses[0],
                sum(tail) / len(tail),
                steps,
                time.perf_counter() - start,
            )
        first, final = (losses[0], losses[-1]) if losses else (None, None)
        manifest = {**_recipe(family, steps), "first_loss": first, "final_loss": final}
        atomic_write_json(built / MANIFEST, {**manifest, "files": _files(built)})
        _move_into_place(built, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


def build_pretrained_twin(folder: str | Path, steps: int = PRETRAIN_STEPS) -> Path:
    """Returns `folder` after writing the default (MiniCPM-V-2) twin there; see `build_twin`."""
    return build_twin(DEFAULT_FAMILY, folder, steps)


def twin_problem(
    folder: str | Path, steps: int = PRETRAIN_STEPS, family: Family | str = DEFAULT_FAMILY
) -> str | None:
    """Returns why `folder` is not a finished twin of `family` by the current recipe, or None when it is."""
    folder = Path(folder)
    if not folder.is_dir():
        return "it does not exist"
    try:
        recorded = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"it has no readable {MANIFEST} (an interrupted or older build)"
    expected = _recipe(_family(family), steps)
    if not isinstance(recorded, dict) or any(recorded.get(k) != v for k, v in expected.items()):
        return f"it was built by another recipe ({MANIFEST} differs from {expected})"
    files = recorded.get("files")
    if not isinstance(files, dict) or not files:
        return f"its {MANIFEST} lists no files"
    missing = [name for name, size in files.items() if not _has_file(folder / name, size)]
    if missing:
        return f"it lacks {', '.join(missing)} (or holds another size of it)"
    return None


def _has_file(path: Path, size: Any) -> bool:
    try:
        return path.is_file() and path.stat().st_size == size
    except OSError:
        return False


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """Holds an exclusive lock next to `folder` (released when the process ends, however it ends)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process that is building the tiny twin at %s", folder)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def twin_cache_path(family: Family | str) -> Path:
    """Returns the family's twin's own cache place, <cache>/<family>_tiny (absolute)."""
    return default_twin_path(twin_name(family.name if isinstance(family, Family) else family))


def ensure_twin(family: Family | str, folder: str | Path | None = None, steps: int = PRETRAIN_STEPS) -> Path:
    """Returns `family`'s twin folder (default: its cache place), building it first unless it is finished
    and of the current recipe."""
    family = _family(family)
    folder = Path(folder if folder is not None else twin_cache_path(family)).expanduser().absolute()
    if twin_problem(folder, steps, family) is None:
        return folder
    with _build_lock(folder):
        problem = twin_problem(folder, steps, family)  # another process may have finished it while we waited
        if problem is None:
            return folder
        if folder.exists():
            log.warning("rebuilding the %s tiny twin at %s: %s", family.name, folder, problem)
        # the build seeds torch itself: a run that builds the twin first then trains as one that found it
        with torch.random.fork_rng(devices=[]):
            return build_twin(family, folder, steps)


def ensure_tiny_twin(folder: str | Path | None = None, steps: int = PRETRAIN_STEPS) -> Path:
    """Returns the default (MiniCPM-V-2) twin's folder; see `ensure_twin`."""
    return ensure_twin(DEFAULT_FAMILY, folder, steps)


def twin_folder(family: Family | str, path: str | Path, build_if_missing: bool) -> Path:
    """Returns `path` ready to load: with `build_if_missing` and `path` the family's own cache place, the
    pre-trained twin there (built first when missing, unfinished or of an older recipe).

    Only a twin's own cache place is ever built; any other path is returned as it is (a missing folder is
    reported by the config check and by the loader)."""
    local = Path(path).expanduser()
    if build_if_missing and local.absolute() == twin_cache_path(family):
        return ensure_twin(family, local.absolute())
    return local


def main(argv: list[str] | None = None) -> None:
    """Build (or confirm) a pre-trained twin from the command line and print its folder."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.training.twin", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--family", default=DEFAULT_FAMILY, choices=list(FAMILIES), help=f"(default: {DEFAULT_FAMILY})"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder (default: the family's cache place, <cache>/<family>_tiny)",
    )
    parser.add_argument("--steps", type=int, default=PRETRAIN_STEPS, help="pre-training steps (0 = random)")
    args = parser.parse_args(argv)
    if args.steps < 0:
        parser.error(f"--steps must be >= 0, got {args.steps}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(ensure_twin(args.family, args.out, steps=args.steps))


if __name__ == "__main__":
    main()
