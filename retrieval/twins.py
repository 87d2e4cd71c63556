"""Edited twins of captions: the diagnostic set of what a matcher sees.

Each twin changes one thing a photo can confirm or refute and leaves every
other word in place: a colour, a number, who does what to whom (the two
participants swapped), or the action. A model that reads a caption as a bag
of words cannot tell a swapped-participant twin from its original; one that
aligns words with regions can. A matcher gets a twin right when it scores the
original caption above the twin for the original's photo.

Pure text rules over a fixed vocabulary (the words Flickr8k captions use
most); a caption none of a kind's rules fits gets no twin of that kind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KINDS = ("colour", "number", "swap", "action")

COLOURS = ("black", "white", "brown", "red", "blue", "green", "yellow", "pink", "orange", "purple", "grey")
# each number to the one it becomes: always a different count
NUMBERS = {"two": "three", "three": "two", "four": "two", "five": "three", "one": "two", "several": "two"}
# participants that can do something to each other (swapping them keeps the words, changes the meaning)
PARTICIPANTS = ("man", "woman", "boy", "girl", "child", "baby", "dog", "puppy", "cat", "horse", "person",
                "player", "lady", "guy", "cow", "sheep", "bird", "biker", "skier", "surfer")
PEOPLE = ("man", "woman", "boy", "girl", "child", "baby", "person", "lady", "guy", "men", "women", "people",
          "children", "boys", "girls", "player", "players")
# the action each one becomes: one that a photo of the first plainly is not
ACTION_SWAP = {"running": "sleeping", "jumping": "lying", "sitting": "running", "standing": "swimming",
               "swimming": "sitting", "walking": "lying", "climbing": "sleeping", "riding": "eating",
               "eating": "climbing", "sleeping": "jumping", "lying": "jumping", "dancing": "sleeping",
               "smiling": "crying", "skiing": "swimming", "surfing": "climbing"}

_WORD = re.compile(r"[A-Za-z]+")


@dataclass(frozen=True)
class Twin:
    image: int  # index of the caption's photo
    kind: str  # one of KINDS
    original: str
    edited: str


def _words(text: str) -> list[tuple[int, int, str]]:
    return [(m.start(), m.end(), m.group().lower()) for m in _WORD.finditer(text)]


def _replace(text: str, spans: list[tuple[int, int, str]]) -> str:
    """``text`` with each ``(start, end, new)`` span replaced (spans do not
    overlap); a replaced word that began with a capital keeps one."""
    out, last = [], 0
    for start, end, new in sorted(spans):
        if text[start].isupper():
            new = new[:1].upper() + new[1:]
        out += [text[last:start], new]
        last = end
    return "".join(out + [text[last:]])


def colour_twin(text: str) -> str | None:
    """The first colour word becomes the next colour of :data:`COLOURS`
    (not one that describes a person: "a black man" is left alone)."""
    words = _words(text)
    for n, (start, end, w) in enumerate(words):
        if w in COLOURS and not (n + 1 < len(words) and words[n + 1][2] in PEOPLE):
            new = COLOURS[(COLOURS.index(w) + 1) % len(COLOURS)]
            return _replace(text, [(start, end, new)])
    return None


def _first_listed(text: str, table: dict[str, str]) -> str | None:
    """The first word that is a key of ``table`` replaced by its value."""
    for start, end, w in _words(text):
        if w in table:
            return _replace(text, [(start, end, table[w])])
    return None


def number_twin(text: str) -> str | None:
    return _first_listed(text, NUMBERS)


def swap_twin(text: str) -> str | None:
    """The first two different participants trade places ("a dog chases a
    boy" -> "a boy chases a dog")."""
    found = [(s, e, w) for s, e, w in _words(text) if w in PARTICIPANTS]
    for s2, e2, w2 in found[1:]:
        s1, e1, w1 = found[0]
        if w2 != w1:
            return _replace(text, [(s1, e1, w2), (s2, e2, w1)])
    return None


def action_twin(text: str) -> str | None:
    return _first_listed(text, ACTION_SWAP)


RULES = {"colour": colour_twin, "number": number_twin, "swap": swap_twin, "action": action_twin}


def make_twins(captions: list[list[str]], per_kind: int | None = None) -> list[Twin]:
    """Twins of every kind for the captions of each photo (``captions[i]``:
    the captions of photo ``i``), at most one per photo and kind (its first
    caption a rule fits), at most ``per_kind`` of each kind, photos in order."""
    twins: list[Twin] = []
    for kind, rule in RULES.items():
        n = 0
        for image, caps in enumerate(captions):
            if per_kind is not None and n >= per_kind:
                break
            for cap in caps:
                edited = rule(cap)
                if edited is not None and edited != cap:
                    twins.append(Twin(image, kind, cap, edited))
                    n += 1
                    break
    return twins


def preference_table(twins: list[Twin], scorers: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Share (percent) of twins each scorer gets right, per kind and overall.

    ``scorers[name]``: for each twin, score(original) - score(edited) under
    that scorer; right means strictly positive."""
    table: dict[str, dict[str, float]] = {}
    for name, margins in scorers.items():
        if len(margins) != len(twins):
            raise ValueError(f"{name}: {len(margins)} margins for {len(twins)} twins")
        row = {}
        for kind in KINDS + ("all",):
            picked = [m for t, m in zip(twins, margins) if kind in ("all", t.kind)]
            if picked:
                row[kind] = round(100.0 * sum(m > 0 for m in picked) / len(picked), 1)
        table[name] = row
    return table
