"""The bundled demo sets and the tiny twin's pre-training set: small generated images with short answers.

All are drawn from the same kind of image (one to four shapes of one kind and colour, or one digit) and ask
about what the image shows, so every answer depends on the image. They differ in what they ask and how the
answer is worded:

- pre-training (``generate_pretrain``): the colour as one word (``red``), and, from text alone, the sentence
  ``The colour is red.``;
- the demo set (``generate_demo``), the fine-tuning task: the colour of the image in that sentence;
- the preference demo set (``generate_demo_pairs``), for dpo: the same question, the sentence with the right
  colour chosen, and rejected either the bare colour (what the pre-trained twin answers) or the sentence with
  another colour (a hallucination).

Regenerate a demo folder with ``python -m pipeline.data.demo [--pairs] [--out DIR] [--n N] [--force]``.
Everything is drawn with PIL primitives and PIL's built-in bitmap font from a fixed seed, so every set is
identical on every machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from pipeline.utils.io import file_mode

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DEMO_DIR = REPO_ROOT / "data" / "demo"
DEFAULT_PAIRS_DIR = REPO_ROOT / "data" / "demo_pairs"
DEFAULT_ROWS = 240
SEED = 20240501
PAIRS_SEED = 20240502
VERSION = 3  # bump whenever the generated content changes, so old folders are regenerated

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
}
KINDS = ("circle", "square", "triangle")
MAX_COUNT = 4
SIZE = (112, 112)
# Every tenth image is larger than the tiny twin's 112x112 scale, so the image slicing code runs.
LARGE_SIZES = ((224, 224), (224, 112), (112, 224))

# pre-training: the colour, as one word
ASK_SHAPES = "What colour are the shapes?"
ASK_DIGIT = "What colour is the digit?"
# fine-tuning (the demo set): the same attribute, asked and answered in another wording
DESCRIBE = "Describe the colour in a sentence."
# pre-training also holds text-only rows in the demo's wording, so the twin can speak that sentence; it never
# sees that sentence asked about an image.
SAY = "Say that the colour is {color}."
# One cycle of 4 demo rows: 3 shapes images, 1 digit image; of pre-training rows: also 2 text-only rows.
CYCLE = ("shapes", "shapes", "digit", "shapes")
PRETRAIN_CYCLE = ("shapes", "say", "shapes", "digit", "say", "shapes")
# the preference demo's rejected answers: the bare colour (the pre-trained twin's style), or the sentence with
# another colour
REJECTED = ("bare", "wrong")


@dataclass(frozen=True)
class Scene:
    """What an image shows: `count` shapes of one kind and colour, or (kind "digit") one digit."""

    kind: str
    color: str
    count: int
    digit: int | None = None


def shape_name(kind: str, count: int) -> str:
    """Return 'circle' or 'circles' as the count requires."""
    return kind if count == 1 else f"{kind}s"


def _cells(size: tuple[int, int]) -> list[tuple[int, int, int]]:
    width, height = size
    cell = 56
    return [(x * cell, y * cell, cell) for y in range(height // cell) for x in range(width // cell)]


def _draw_shapes(rng: random.Random, size: tuple[int, int], scene: Scene) -> Image.Image:
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    fill = COLORS[scene.color]
    cells = _cells(size)
    for x, y, cell in rng.sample(cells, scene.count):  # non-overlapping: one shape per cell
        side = rng.randint(int(cell * 0.6), int(cell * 0.85))
        left = x + rng.randint(2, cell - side - 2)
        top = y + rng.randint(2, cell - side - 2)
        box = (left, top, left + side, top + side)
        if scene.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif scene.kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(left + side // 2, top), (left + side, top + side), (left, top + side)], fill=fill)
    return image


def _font() -> ImageFont.ImageFont:
    # The bitmap font is identical everywhere; load_default() may pick a FreeType font that varies by build.
    loader = getattr(ImageFont, "load_default_imagefont", None)
    return loader() if loader else ImageFont.load_default()


def _draw_digit(rng: random.Random, size: tuple[int, int], scene: Scene) -> Image.Image:
    font = _font()
    text = str(scene.digit)
    left, top, right, bottom = font.getbbox(text)
    small = Image.new("RGB", (right - left + 2, bottom - top + 2), "white")
    ImageDraw.Draw(small).text((1 - left, 1 - top), text, fill=COLORS[scene.color], font=font)
    # Nearest-neighbour upscaling keeps the bitmap glyph crisp: about half the image's height.
    scale = max(1, min(size) // (2 * small.height))
    big = small.resize((small.width * scale, small.height * scale), Image.Resampling.NEAREST)
    image = Image.new("RGB", size, "white")
    x = rng.randint(4, size[0] - big.width - 4)
    y = rng.randint(4, size[1] - big.height - 4)
    image.paste(big, (x, y))
    return image


def _size(rng: random.Random, index: int) -> tuple[int, int]:
    return rng.choice(LARGE_SIZES) if index % 10 == 7 else SIZE


def _shapes_scene(rng: random.Random, size: tuple[int, int]) -> Scene:
    count = rng.randint(1, min(MAX_COUNT, len(_cells(size))))
    return Scene(rng.choice(KINDS), rng.choice(list(COLORS)), count)


def _digit_scene(rng: random.Random) -> Scene:
    return Scene("digit", rng.choice(list(COLORS)), 1, rng.randint(0, 9))


def _shapes_row(query: str, answer: Callable[[Scene], str]):
    def make(rng: random.Random, index: int) -> tuple[dict, Image.Image]:
        size = _size(rng, index)
        scene = _shapes_scene(rng, size)
        return {"query": query, "response": answer(scene)}, _draw_shapes(rng, size, scene)

    return make


def _digit_row(query: str, answer: Callable[[Scene], str]):
    def make(rng: random.Random, index: int) -> tuple[dict, Image.Image]:
        size = _size(rng, index)
        scene = _digit_scene(rng)
        return {"query": query, "response": answer(scene)}, _draw_digit(rng, size, scene)

    return make


def _text_row(rng: random.Random, index: int) -> tuple[dict, None]:
    scene = Scene("text", rng.choice(list(COLORS)), 1)
    return {"query": SAY.format(color=scene.color), "response": describe_colour(scene)}, None


def describe_colour(scene: Scene) -> str:
    """Return the demo's answer for a scene, e.g. 'The colour is red.'."""
    return f"The colour is {scene.color}."


DEMO_TASKS = {
    "shapes": _shapes_row(DESCRIBE, describe_colour),
    "digit": _digit_row(DESCRIBE, describe_colour),
}
PRETRAIN_TASKS = {
    "shapes": _shapes_row(ASK_SHAPES, lambda scene: scene.color),
    "digit": _digit_row(ASK_DIGIT, lambda scene: scene.color),
    "say": _text_row,
}


def _pair_row(kind: str, rejected: str):
    """A demo question whose chosen answer is the sentence with the image's colour. The rejected one is the
    bare colour ("bare": the pre-trained twin's own style, what it answers before dpo) or the same sentence
    with another colour ("wrong": a hallucination, as RLAIF-V's rejected answers are)."""
    ask = DEMO_TASKS[kind]

    def make(rng: random.Random, index: int) -> tuple[dict, Image.Image]:
        row, image = ask(rng, index)
        color = row["response"].removeprefix("The colour is ").removesuffix(".")
        if rejected == "bare":
            return {**row, "rejected_response": color}, image
        other = rng.choice([name for name in COLORS if name != color])
        return {**row, "rejected_response": describe_colour(Scene("text", other, 1))}, image

    return make


PAIR_TASKS = {f"{kind}/{rejected}": _pair_row(kind, rejected) for kind in DEMO_TASKS for rejected in REJECTED}
# the demo's cycle of images, their pairs rejecting the bare colour and the wrong colour in turn
PAIR_CYCLE = tuple(f"{kind}/{REJECTED[index % len(REJECTED)]}" for index, kind in enumerate(CYCLE))


def _generate(
    n: int, seed: int, tasks: dict, cycle: tuple[str, ...]
) -> tuple[list[dict], dict[str, Image.Image]]:
    if n < 1:
        raise ValueError(f"a generated set needs n >= 1 rows, got {n}")
    rng = random.Random(seed)  # Mersenne Twister: the same stream on every platform and Python version
    rows, images = [], {}
    for index in range(n):
        row, image = tasks[cycle[index % len(cycle)]](rng, index)
        if image is not None:
            name = f"images/{index:05d}.png"
            row["images"] = [name]
            images[name] = image
        rows.append(row)
    return rows, images


def generate_demo(n: int = DEFAULT_ROWS, seed: int = SEED) -> tuple[list[dict], dict[str, Image.Image]]:
    """Return the demo rows (custom format, image paths relative to the folder) and their images by path."""
    return _generate(n, seed, DEMO_TASKS, CYCLE)


def generate_demo_pairs(
    n: int = DEFAULT_ROWS, seed: int = PAIRS_SEED
) -> tuple[list[dict], dict[str, Image.Image]]:
    """Return the preference demo rows (ms-swift's pair format: query, response = the chosen answer,
    rejected_response, images) and their images by path."""
    return _generate(n, seed, PAIR_TASKS, PAIR_CYCLE)


def generate_pretrain(n: int, seed: int) -> tuple[list[dict], dict[str, Image.Image]]:
    """Return pre-training rows (the colour as one word) and their images, drawn like the demo's."""
    return _generate(n, seed, PRETRAIN_TASKS, PRETRAIN_CYCLE)


def content_hash(rows: list[dict], images: dict[str, Image.Image]) -> str:
    """Return a sha256 over the rows and the images' pixels (independent of the PNG encoder's bytes)."""
    digest = hashlib.sha256(_jsonl(rows).encode())
    for name in sorted(images):
        image = images[name]
        digest.update(f"{name}:{image.mode}:{image.size}".encode())
        digest.update(image.tobytes())
    return digest.hexdigest()


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def is_complete(folder: Path, n: int = DEFAULT_ROWS, seed: int = SEED) -> bool:
    """Return True when folder holds a finished demo set of this version, seed and size, every file intact."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if manifest.get("version") != VERSION or manifest.get("n") != n or manifest.get("seed") != seed:
        return False
    files = manifest.get("files") or {}
    return "train.jsonl" in files and all(
        (folder / name).is_file() and _file_sha256(folder / name) == sha for name, sha in files.items()
    )


def ensure_demo(folder: Path | None = None, n: int = DEFAULT_ROWS, *, force: bool = False) -> Path:
    """Return the demo folder, writing images/*.png, train.jsonl and manifest.json first unless complete.

    Every file is written atomically and the manifest last, so an interrupted run is redone next time.
    """
    folder = Path(folder) if folder is not None else DEFAULT_DEMO_DIR
    return _ensure(folder, n, force, SEED, generate_demo)


def ensure_demo_pairs(folder: Path | None = None, n: int = DEFAULT_ROWS, *, force: bool = False) -> Path:
    """Return the preference demo folder (data/demo_pairs), written like ensure_demo's unless complete."""
    folder = Path(folder) if folder is not None else DEFAULT_PAIRS_DIR
    return _ensure(folder, n, force, PAIRS_SEED, generate_demo_pairs)


def _ensure(folder: Path, n: int, force: bool, seed: int, generate: Callable[[int], tuple]) -> Path:
    if not force and is_complete(folder, n, seed):
        return folder
    rows, images = generate(n)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    files = {}
    for name, image in images.items():
        files[name] = _write_atomic(
            folder / name, lambda handle, image=image: image.save(handle, format="PNG")
        )
    files["train.jsonl"] = _write_atomic(
        folder / "train.jsonl", lambda handle: handle.write(_jsonl(rows).encode())
    )
    for stale in (folder / "images").glob("*.png"):
        if f"images/{stale.name}" not in images:
            stale.unlink()  # left by an earlier, larger set
    manifest = {
        "version": VERSION,
        "seed": seed,
        "n": n,
        "content_hash": content_hash(rows, images),
        "files": files,
    }
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    _write_atomic(folder / "manifest.json", lambda handle: handle.write(text.encode()))
    return folder


def _write_atomic(path: Path, write) -> str:
    """Returns the sha256 of `path` after writing it through a temp file and a rename; the file gets the mode
    a plain open() gives (0666 less the umask), not mkstemp's 0600."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return _file_sha256(path)


def main(argv: list[str] | None = None) -> None:
    """Generate (or confirm) the demo set from the command line."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.data.demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="folder to write (default: data/demo, or data/demo_pairs)"
    )
    parser.add_argument("--pairs", action="store_true", help="the preference demo set (dpo) instead")
    parser.add_argument("--n", type=int, default=DEFAULT_ROWS, help="number of rows (default: 240)")
    parser.add_argument("--force", action="store_true", help="rewrite even when the folder is complete")
    args = parser.parse_args(argv)
    ensure = ensure_demo_pairs if args.pairs else ensure_demo
    folder = ensure(args.out, args.n, force=args.force)
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    what = "preference demo set" if args.pairs else "demo set"
    print(f"{what}: {folder / 'train.jsonl'} ({args.n} rows, content hash {manifest['content_hash'][:16]})")


if __name__ == "__main__":
    main()
