"""Captions and GenEval metadata of the shapes world, and its fixed train / held-out split.

A prompt is a `Spec`: a GenEval tag plus the clauses it asks for. `caption(spec)` writes it with
GenEval's own templates ("a photo of two stars", "a photo of a red circle left of a blue square"
...) and `metadata(spec)` gives GenEval's JSON schema (`tag`, `prompt`, `include`, `exclude`).

The held-out split is fixed (it does not depend on the data seed), so every dataset and every run
is scored on the same prompts. Per tag it holds out: five (count, shape) pairs; three unordered shape pairs (both
orders); ten (colour, shape) pairs, one per colour and two per shape, everywhere a colour is named
(`colors`, and any `color_attr` caption naming one); and per unordered shape pair one spatial
configuration in both phrasings ("A left of B" and "B right of A"). Every word still occurs in
training, so the held-out set measures composition, as GenEval does. The single_object prompts
are no composition (GenEval's "a photo of a dog" is surely in any training set): all five are
trained on and all five are evaluated, so that tag is scored on every shape. Used by
`fluid shapes-data`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from itertools import combinations, permutations

from fluid_cli.shapes.render import COLOURS, PLURALS, RELATIONS, SHAPES

TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NUMBERS = {2: "two", 3: "three", 4: "four"}
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclass(frozen=True)
class Spec:
    """What a prompt asks for. `shapes`/`colours` follow the caption's word order; `count` is for
    counting; `relation` (position) says where shapes[0] is relative to shapes[1]."""

    tag: str
    shapes: tuple[str, ...]
    colours: tuple[str | None, ...] = ()
    count: int = 1
    relation: str | None = None


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _noun(shape: str, colour: str | None) -> str:
    return _a(f"{colour} {shape}" if colour else shape)


def caption(s: Spec) -> str:
    """GenEval's prompt templates, one per tag."""
    if s.tag == "counting":
        return f"a photo of {NUMBERS[s.count]} {PLURALS[s.shapes[0]]}"
    colours = s.colours or (None,) * len(s.shapes)
    nouns = [_noun(shape, c) for shape, c in zip(s.shapes, colours, strict=True)]
    if s.tag == "position":
        return f"a photo of {nouns[0]} {s.relation} {nouns[1]}"
    return "a photo of " + " and ".join(nouns)


def metadata(s: Spec) -> dict:
    """GenEval's metadata object. For position, include[0] is the reference object (B) and
    include[1] holds `position: [relation, 0]`, as in GenEval's own file."""
    if s.tag == "counting":
        clause = {"class": s.shapes[0], "count": s.count}
        exclude = [{"class": s.shapes[0], "count": s.count + 1}]
        return {"tag": s.tag, "include": [clause], "exclude": exclude, "prompt": caption(s)}
    if s.tag == "position":
        include = [
            {"class": s.shapes[1], "count": 1},
            {"class": s.shapes[0], "count": 1, "position": [s.relation, 0]},
        ]
        return {"tag": s.tag, "include": include, "prompt": caption(s)}
    include = []
    for i, shape in enumerate(s.shapes):
        clause: dict = {"class": shape, "count": 1}
        if s.colours and s.colours[i]:
            clause["color"] = s.colours[i]
        include.append(clause)
    return {"tag": s.tag, "include": include, "prompt": caption(s)}


# ---- the fixed held-out split ------------------------------------------------------------------

HELDOUT_COUNTS = {(2 + i % 3, shape) for i, shape in enumerate(SHAPES)}
HELDOUT_PAIRS = {frozenset(p) for p in [("circle", "triangle"), ("square", "star"), ("triangle", "cross")]}
# colour k with shape 3k mod 5: each colour once, each shape twice
HELDOUT_COLOURED = {(c, SHAPES[(3 * k) % len(SHAPES)]) for k, c in enumerate(COLOURS)}


def heldout_relation(a: str, b: str) -> str:
    """The relation of `a` to `b` that is held out: per unordered pair (in SHAPES order, index q)
    the first is held out at RELATIONS[q % 4] of the second, and the mirror phrasing with it."""
    for q, (first, second) in enumerate(combinations(SHAPES, 2)):
        if (a, b) == (first, second):
            return RELATIONS[q % len(RELATIONS)]
        if (a, b) == (second, first):
            return OPPOSITE[RELATIONS[q % len(RELATIONS)]]
    raise ValueError(f"not a pair of distinct shapes: {a}, {b}")


def is_heldout(s: Spec) -> bool:
    """Whether a spec's caption belongs to the held-out split."""
    if s.tag == "single_object":
        return False  # evaluated on every shape, trained on every shape (see the module doc)
    if s.tag == "counting":
        return (s.count, s.shapes[0]) in HELDOUT_COUNTS
    if s.tag == "two_object":
        return frozenset(s.shapes) in HELDOUT_PAIRS
    if s.tag == "position":
        return s.relation == heldout_relation(*s.shapes)
    return any((c, shape) in HELDOUT_COLOURED for c, shape in zip(s.colours, s.shapes, strict=True))


def all_specs(tag: str) -> list[Spec]:
    """Every prompt of a tag in the shapes world (colours in `color_attr` differ, as in GenEval)."""
    if tag == "single_object":
        return [Spec(tag, (s,)) for s in SHAPES]
    if tag == "counting":
        return [Spec(tag, (s,), count=n) for n in NUMBERS for s in SHAPES]
    if tag == "two_object":
        return [Spec(tag, p) for p in permutations(SHAPES, 2)]
    if tag == "colors":
        return [Spec(tag, (s,), (c,)) for c in COLOURS for s in SHAPES]
    if tag == "position":
        return [Spec(tag, p, relation=r) for p in permutations(SHAPES, 2) for r in RELATIONS]
    if tag == "color_attr":
        return [
            Spec(tag, (s1, s2), (c1, c2))
            for s1, s2 in permutations(SHAPES, 2)
            for c1, c2 in permutations(COLOURS, 2)
        ]
    raise ValueError(f"unknown tag {tag!r}; valid: {', '.join(TAGS)}")


@cache
def train_specs(tag: str) -> tuple[Spec, ...]:
    """The prompts of a tag that training may use (cached: the generator asks once per record)."""
    return tuple(s for s in all_specs(tag) if not is_heldout(s))


def heldout_specs(color_attr: int = 20) -> list[Spec]:
    """The evaluation prompts, in tag order: every single_object prompt, and the held-out prompts
    of the other tags. `color_attr`: how many of the color_attr prompts whose two (colour, shape)
    pairs are both held out to keep (every k-th, deterministic)."""
    out: list[Spec] = []
    for tag in TAGS:
        specs = [s for s in all_specs(tag) if is_heldout(s) or tag == "single_object"]
        if tag == "color_attr":
            both = [
                s for s in specs if all(p in HELDOUT_COLOURED for p in zip(s.colours, s.shapes, strict=True))
            ]
            specs = both[:: max(1, len(both) // color_attr)][:color_attr]
        out += specs
    return out
