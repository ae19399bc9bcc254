"""The built-in English corpus every tiny twin's offline tokenizer is trained on: shapes, colours, counting
and arithmetic, deterministic."""

from __future__ import annotations

_COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "pink", "brown", "grey"]
_SHAPES = ["circle", "square", "triangle", "star", "heart", "rectangle", "diamond", "line", "dot", "cross"]
_SIZES = ["small", "large", "tiny", "big", "little", "huge"]
_PLACES = ["left of", "right of", "above", "below", "next to", "inside", "behind", "in front of", "near"]
_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_WORDS_TEXT = (
    "a an the this that these those there here is are was were be been has have had do does did can could "
    "will would should may might must and or but not no yes with without for from to of in on at by over under "
    "image picture photo scene background foreground object objects shape shapes colour color count how many "
    "what where which who why when describe please answer question the image shows contains a man woman child "
    "people person dog cat bird horse car bus train plane boat bicycle street road table chair bed room kitchen "
    "window door tree grass sky water sea beach mountain snow field park city building house food plate pizza "
    "sandwich cake fruit apple banana orange ball game player sitting standing walking running holding looking "
    "playing eating riding wearing carrying top bottom middle corner edge side group pair several some all each "
    "other another very quite more most less few many much total sum equals plus minus times divided result"
)
_WORDS = _WORDS_TEXT.split()


def tiny_corpus() -> list[str]:
    """Returns a deterministic English corpus about shapes, colours, counting and arithmetic."""
    lines: list[str] = []
    for ci, colour in enumerate(_COLOURS):
        for si, shape in enumerate(_SHAPES):
            size = _SIZES[(ci + si) % len(_SIZES)]
            place = _PLACES[(ci * 3 + si) % len(_PLACES)]
            other = _SHAPES[(si + 1 + ci) % len(_SHAPES)]
            n = (ci * 7 + si * 3) % 10
            lines.append(f"There is a {size} {colour} {shape} {place} the {other}.")
            lines.append(f"How many {colour} {shape}s are there?\nThere are {n} {colour} {shape}s.")
            lines.append(f"The image shows {_NUMBER_WORDS[n]} {shape}s and a {colour} {other}.")
    for a in range(13):
        for b in range(13):
            lines.append(f"{a} + {b} = {a + b}. {a} times {b} equals {a * b}.")
    for i in range(0, len(_WORDS) - 7, 3):
        lines.append(" ".join(_WORDS[i : i + 8]).capitalize() + ".")
    lines.append(" ".join(_WORDS))
    lines.append("0 1 2 3 4 5 6 7 8 9, 10 20 30 40 50 60 70 80 90 100: digits and numbers!")
    return lines
