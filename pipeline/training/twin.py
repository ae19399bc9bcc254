"""The tiny twin's pre-training and its cache: built once per checkout, deterministically, then reused.

    python -m pipeline.training.twin                      # build (or confirm) the default twin, <project>/.cache/minicpm_v2_tiny
    python -m pipeline.training.twin --out DIR            # write one elsewhere (then model.path=DIR)

The random twin (pipeline/families/minicpm_v2/tiny.py) is pre-trained on generated images with the question "what
colour?" and a one-word answer, plus text-only rows that say the demo's sentence (pipeline/data/demo.py's
`generate_pretrain`), so that its vision tower and resampler carry the colour. The demo set asks about the
same kind of image for that sentence, which is what fine-tuning then teaches. This module sits above both the
model and the data code.

The cache is safe for many processes starting at once (a sweep on a fresh machine): one builds under a file
lock while the others wait, each build fills a folder of its own that is renamed into place, and a folder
that lacks any file the twin needs, or was built by an older recipe, is rebuilt.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pipeline.config import default_twin_path
from pipeline.data.demo import generate_pretrain
from pipeline.families.base import Family
from pipeline.families.minicpm_v2.collate import collate_for_training, encode_example
from pipeline.families.minicpm_v2.modeling import MiniCPMV
from pipeline.families.minicpm_v2.processor import MiniCPMVImageProcessor
from pipeline.families.minicpm_v2.tiny import build_tiny_twin, missing_twin_files
from pipeline.families.minicpm_v2.tokenizer import MiniCPMVTokenizer
from pipeline.utils.io import atomic_write_json

log = logging.getLogger(__name__)

MANIFEST = "tiny_twin.json"  # written last: the recipe the folder was built with
# Bump whenever the recipe below (or the pre-training data) changes: cached twins of older recipes are rebuilt.
RECIPE_VERSION = 3
PRETRAIN_SEED = 1234  # the pre-training rows' seed: other images than the demo set's
PRETRAIN_ROWS = 600
PRETRAIN_STEPS = 150
PRETRAIN_BATCH = 8
PRETRAIN_LR = 3e-3


def pretrain_twin(
    model: MiniCPMV,
    tokenizer: MiniCPMVTokenizer,
    processor: MiniCPMVImageProcessor,
    steps: int = PRETRAIN_STEPS,
    *,
    seed: int = 0,
    batch_size: int = PRETRAIN_BATCH,
    lr: float = PRETRAIN_LR,
) -> list[float]:
    """Returns the loss per step after full-training the twin on the generated image questions."""
    rows, images = generate_pretrain(PRETRAIN_ROWS, PRETRAIN_SEED)
    samples = []
    for row in rows:
        image = images[row["images"][0]] if row.get("images") else None
        sample = encode_example(tokenizer, processor, row["query"], row["response"], image=image)
        if sample is not None:
            samples.append(sample)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="pre-training the tiny twin (once)", unit="step")
    for _ in bar:
        pick = torch.randint(len(samples), (batch_size,), generator=generator).tolist()
        batch = collate_for_training([samples[i] for i in pick], tokenizer.pad_id)
        loss = model(**batch).loss
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


def _recipe(steps: int) -> dict:
    return {"recipe_version": RECIPE_VERSION, "pretrain_steps": steps, "pretrain_seed": PRETRAIN_SEED}


def build_pretrained_twin(folder: str | Path, steps: int = PRETRAIN_STEPS) -> Path:
    """Returns `folder` after writing the twin there, pre-trained for `steps` (0 = random weights)."""
    folder = Path(folder).absolute()
    losses: list[float] = []

    def pretrain(model, tokenizer, processor) -> None:
        losses.extend(pretrain_twin(model, tokenizer, processor, steps))

    log.info("building the tiny twin at %s (once: later runs reuse it)", folder)
    build_tiny_twin(folder, pretrain=pretrain if steps > 0 else None)
    if losses:
        tail = losses[-20:]
        log.info("tiny twin pre-training loss %.3f -> %.3f", losses[0], sum(tail) / len(tail))
    atomic_write_json(folder / MANIFEST, {**_recipe(steps), "final_loss": losses[-1] if losses else None})
    return folder


def twin_problem(folder: str | Path, steps: int = PRETRAIN_STEPS) -> str | None:
    """Returns why `folder` is not a finished twin of the current recipe, or None when it is one."""
    folder = Path(folder)
    if not folder.is_dir():
        return "it does not exist"
    missing = missing_twin_files(folder)
    if missing:
        return f"it lacks {', '.join(missing)}"
    try:
        recorded = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"it has no readable {MANIFEST} (an interrupted or older build)"
    expected = _recipe(steps)
    if not isinstance(recorded, dict) or any(recorded.get(k) != v for k, v in expected.items()):
        return f"it was built by another recipe ({MANIFEST} differs from {expected})"
    return None


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


def ensure_tiny_twin(folder: str | Path | None = None, steps: int = PRETRAIN_STEPS) -> Path:
    """Returns the twin's folder (default: its cache place), building it first unless finished and current."""
    folder = Path(folder if folder is not None else default_twin_path()).expanduser().absolute()
    if twin_problem(folder, steps) is None:
        return folder
    with _build_lock(folder):
        problem = twin_problem(folder, steps)  # another process may have finished it while we waited
        if problem is None:
            return folder
        if folder.exists():
            log.warning("rebuilding the tiny twin at %s: %s", folder, problem)
        # the build seeds torch itself: a run that builds the twin first then trains as one that found it
        with torch.random.fork_rng(devices=[]):
            return build_pretrained_twin(folder, steps)


def model_folder(path: str, build_if_missing: bool) -> str:
    """Returns `path` ready to load: the default twin's absolute folder, built first when asked and needed.

    Only the twin's own cache place is ever built; any other path is left as it is (a missing folder is
    reported by the config check and by the loader).
    """
    local = Path(path).expanduser().absolute()
    if build_if_missing and local == default_twin_path():
        return str(ensure_tiny_twin(local))
    return path


def twin_folder(family: Family, path: str, build_if_missing: bool) -> str:
    """Returns `path` ready to load: with build_if_missing, a missing twin is built there first (the default
    twin pre-trained at its cache place; another family's random twin wherever `path` points)."""
    if not build_if_missing:
        return path
    local = Path(path).expanduser().absolute()
    if local == default_twin_path():
        return str(ensure_tiny_twin(local))
    if not (local / "config.json").is_file():
        family.build_tiny(local)
    return str(local)


def main(argv: list[str] | None = None) -> None:
    """Build (or confirm) a pre-trained twin from the command line and print its folder."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.training.twin", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, default=None, help=f"folder (default: {default_twin_path()})")
    parser.add_argument("--steps", type=int, default=PRETRAIN_STEPS, help="pre-training steps (0 = random)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(ensure_tiny_twin(args.out, steps=args.steps))


if __name__ == "__main__":
    main()
