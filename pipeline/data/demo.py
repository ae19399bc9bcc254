"""The bundled demo set: small generated images of shapes and sums with short, consistent answers.

Regenerate with ``python -m pipeline.data.demo [--out DIR] [--n N] [--force]``. Everything is drawn with PIL
primitives and PIL's built-in bitmap font from a fixed seed, so the set is identical on every machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DEMO_DIR = REPO_ROOT / "data" / "demo"
DEFAULT_ROWS = 240
SEED = 20240501
VERSION = 1  # bump whenever the generated content changes, so old folders are regenerated

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
}
KINDS = ("circle", "square", "triangle")
NUMBER_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
DESCRIBE = "Describe the image."
READ = "What is written in the image?"
COMPUTE = "What is the result?"
# Small sizes keep training cheap; the large ones exceed 448^2 pixels so the image slicing path runs.
SMALL_SIZES = ((112, 112), (224, 160), (160, 224), (224, 224))
WIDE_SIZES = ((224, 160), (224, 224))
LARGE_SIZES = ((896, 256), (256, 896), (672, 448))
# One cycle of 12 rows: 3 describe, 3 count, 3 compute, 2 multi-round, 1 text-only.
TASK_CYCLE = (
    "describe",
    "count",
    "compute",
    "describe",
    "count",
    "compute",
    "multi",
    "describe",
    "count",
    "compute",
    "multi",
    "text",
)


@dataclass(frozen=True)
class Shape:
    """A drawn shape: what it is and where (cell-aligned, so shapes never overlap)."""

    kind: str
    color: str
    box: tuple[int, int, int, int]


def shape_name(kind: str, count: int) -> str:
    """Return 'circle' or 'circles' as the count requires."""
    return kind if count == 1 else f"{kind}s"


def describe(groups: dict[tuple[str, str], int]) -> str:
    """Return the describe answer for shape groups, e.g. 'A red circle and two blue squares on ...'."""
    order = sorted(groups, key=lambda key: (KINDS.index(key[0]), list(COLORS).index(key[1])))
    parts = []
    for kind, color in order:
        count = groups[(kind, color)]
        article = ("an" if color[0] in "aeiou" else "a") if count == 1 else NUMBER_WORDS[count]
        parts.append(f"{article} {color} {shape_name(kind, count)}")
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{text[0].upper()}{text[1:]} on a white background."


def _cells(size: tuple[int, int]) -> list[tuple[int, int, int]]:
    width, height = size
    cell = 112 if min(size) >= 256 else 56
    return [(x * cell, y * cell, cell) for y in range(height // cell) for x in range(width // cell)]


def _place(rng: random.Random, size: tuple[int, int], specs: list[tuple[str, str]]) -> list[Shape]:
    cells = rng.sample(_cells(size), len(specs))
    shapes = []
    for (kind, color), (x, y, cell) in zip(specs, cells, strict=True):
        side = rng.randint(int(cell * 0.55), int(cell * 0.8))
        left = x + rng.randint(2, cell - side - 2)
        top = y + rng.randint(2, cell - side - 2)
        shapes.append(Shape(kind, color, (left, top, left + side, top + side)))
    return shapes


def _draw_shapes(size: tuple[int, int], shapes: list[Shape]) -> Image.Image:
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        fill = COLORS[shape.color]
        left, top, right, bottom = shape.box
        if shape.kind == "circle":
            draw.ellipse(shape.box, fill=fill)
        elif shape.kind == "square":
            draw.rectangle(shape.box, fill=fill)
        else:
            draw.polygon([((left + right) // 2, top), (right, bottom), (left, bottom)], fill=fill)
    return image


def _font() -> ImageFont.ImageFont:
    # The bitmap font is identical everywhere; load_default() may pick a FreeType font that varies by build.
    loader = getattr(ImageFont, "load_default_imagefont", None)
    return loader() if loader else ImageFont.load_default()


def _draw_text(rng: random.Random, size: tuple[int, int], text: str) -> Image.Image:
    font = _font()
    left, top, right, bottom = font.getbbox(text)
    small = Image.new("RGB", (right - left + 4, bottom - top + 4), "white")
    ImageDraw.Draw(small).text((2 - left, 2 - top), text, fill="black", font=font)
    # Nearest-neighbour upscaling keeps the bitmap glyphs crisp and exact.
    scale = max(1, min(4, (size[0] - 16) // small.width, (size[1] - 16) // small.height))
    big = small.resize((small.width * scale, small.height * scale), Image.Resampling.NEAREST)
    image = Image.new("RGB", size, "white")
    image.paste(big, (rng.randint(8, size[0] - big.width - 8), rng.randint(8, size[1] - big.height - 8)))
    return image


def _size(rng: random.Random, index: int, choices: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    return rng.choice(LARGE_SIZES) if index % 10 == 7 else rng.choice(choices)


def _groups_scene(
    rng: random.Random, size: tuple[int, int]
) -> tuple[dict[tuple[str, str], int], list[Shape]]:
    n_groups = rng.randint(1, 3)
    keys = rng.sample([(kind, color) for kind in KINDS for color in COLORS], n_groups)
    groups = {key: 1 for key in keys}
    room = min(len(_cells(size)), 6) - n_groups
    for key in keys:
        extra = rng.randint(0, min(1, room))
        groups[key] += extra
        room -= extra
    specs = [key for key, count in groups.items() for _ in range(count)]
    return groups, _place(rng, size, specs)


def _arithmetic(rng: random.Random, digits: tuple[int, int]) -> tuple[str, str]:
    low, high = 10 ** (digits[0] - 1), 10 ** digits[1] - 1
    a, b = rng.randint(low, high), rng.randint(low, high)
    if rng.random() < 0.5:
        return f"{a} + {b}", f"{a} + {b} = {a + b}"
    a, b = max(a, b), min(a, b)
    return f"{a} - {b}", f"{a} - {b} = {a - b}"


def _row_describe(rng: random.Random, index: int) -> tuple[dict, Image.Image]:
    size = _size(rng, index, SMALL_SIZES)
    groups, shapes = _groups_scene(rng, size)
    return {"query": DESCRIBE, "response": describe(groups)}, _draw_shapes(size, shapes)


def _row_count(rng: random.Random, index: int) -> tuple[dict, Image.Image]:
    size = _size(rng, index, WIDE_SIZES)
    kind = rng.choice(KINDS)
    count = rng.randint(1, 5)
    others = [k for k in KINDS if k != kind]
    specs = [(kind, rng.choice(list(COLORS))) for _ in range(count)]
    specs += [(rng.choice(others), rng.choice(list(COLORS))) for _ in range(rng.randint(0, 3))]
    query = f"How many {shape_name(kind, 2)}?"
    return {"query": query, "response": str(count)}, _draw_shapes(size, _place(rng, size, specs))


def _row_compute(rng: random.Random, index: int) -> tuple[dict, Image.Image]:
    size = _size(rng, index, WIDE_SIZES)
    shown, answer = _arithmetic(rng, (2, 4))
    return {"query": COMPUTE, "response": answer}, _draw_text(rng, size, shown)


def _row_multi(rng: random.Random, index: int) -> tuple[dict, Image.Image]:
    if rng.random() < 0.4:
        size = _size(rng, index, WIDE_SIZES)
        shown, answer = _arithmetic(rng, (2, 4))
        row = {"query": COMPUTE, "response": answer, "history": [[READ, shown]]}
        return row, _draw_text(rng, size, shown)
    size = _size(rng, index, WIDE_SIZES)
    groups, shapes = _groups_scene(rng, size)
    counts: dict[str, int] = {}
    for (kind, _color), count in groups.items():
        counts[kind] = counts.get(kind, 0) + count
    asked = rng.sample(sorted(counts, key=KINDS.index), min(len(counts), 2))
    rounds = [[DESCRIBE, describe(groups)]] + [
        [f"How many {shape_name(k, 2)}?", str(counts[k])] for k in asked
    ]
    row = {"query": rounds[-1][0], "response": rounds[-1][1], "history": rounds[:-1]}
    return row, _draw_shapes(size, shapes)


def _row_text(rng: random.Random, index: int) -> tuple[dict, None]:
    shown, answer = _arithmetic(rng, (2, 2))
    return {"query": f"What is {shown}?", "response": answer}, None


_TASKS = {
    "describe": _row_describe,
    "count": _row_count,
    "compute": _row_compute,
    "multi": _row_multi,
    "text": _row_text,
}


def generate_demo(n: int = DEFAULT_ROWS, seed: int = SEED) -> tuple[list[dict], dict[str, Image.Image]]:
    """Return the demo rows (custom format, image paths relative to the folder) and their images by path."""
    if n < 1:
        raise ValueError(f"the demo set needs n >= 1 rows, got {n}")
    rng = random.Random(seed)  # Mersenne Twister: the same stream on every platform and Python version
    rows, images = [], {}
    for index in range(n):
        row, image = _TASKS[TASK_CYCLE[index % len(TASK_CYCLE)]](rng, index)
        if image is not None:
            name = f"images/{index:05d}.png"
            row["images"] = [name]
            images[name] = image
        rows.append(row)
    return rows, images


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


def is_complete(folder: Path, n: int = DEFAULT_ROWS) -> bool:
    """Return True when folder holds a finished demo set of this version and size, every file intact."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if manifest.get("version") != VERSION or manifest.get("n") != n or manifest.get("seed") != SEED:
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
    if not force and is_complete(folder, n):
        return folder
    rows, images = generate_demo(n)
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
        "seed": SEED,
        "n": n,
        "content_hash": content_hash(rows, images),
        "files": files,
    }
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    _write_atomic(folder / "manifest.json", lambda handle: handle.write(text.encode()))
    return folder


def _write_atomic(path: Path, write) -> str:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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
        "--out", type=Path, default=DEFAULT_DEMO_DIR, help="folder to write (default: data/demo)"
    )
    parser.add_argument("--n", type=int, default=DEFAULT_ROWS, help="number of rows (default: 240)")
    parser.add_argument("--force", action="store_true", help="rewrite even when the folder is complete")
    args = parser.parse_args(argv)
    folder = ensure_demo(args.out, args.n, force=args.force)
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    print(f"demo set: {folder / 'train.jsonl'} ({args.n} rows, content hash {manifest['content_hash'][:16]})")


if __name__ == "__main__":
    main()
