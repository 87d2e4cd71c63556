"""Caption file parsers: Flickr8k token files, Karpathy-split JSON, CSV
(image,caption) and plain text (one caption a line).

Each parser yields ``(image_name_or_None, caption)`` and reports malformed
lines through ``on_bad(where, reason)`` instead of failing.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .errors import CaptionFileError

MAX_CAPTION_CHARS = 1000

BadLine = Callable[[str, str], None]  # (where: 'line 3' or 'images[2] (a.jpg)', reason)


def _ignore(where: str, reason: str) -> None:
    pass


def clean_caption(text: str) -> str | None:
    text = " ".join(text.split())
    if not text or len(text) > MAX_CAPTION_CHARS:
        return None
    return text


def caption_problem(text: str) -> str:
    """Why :func:`clean_caption` refused ``text``."""
    return "empty caption" if not text.strip() else f"caption longer than {MAX_CAPTION_CHARS} characters"


def parse_flickr_token_lines(lines: Iterable[str], on_bad: BadLine = _ignore) -> Iterator[tuple[str, str]]:
    """``<image>#<n>\\t<caption>`` lines."""
    for no, line in enumerate(lines, 1):
        line = line.rstrip("\n\r")
        if not line.strip():
            continue
        key, sep, caption = line.partition("\t")
        name, hash_, _n = key.partition("#")
        if not sep or not hash_ or not name.strip():
            on_bad(f"line {no}", "expected '<image>#<n><TAB><caption>'")
            continue
        cleaned = clean_caption(caption)
        if cleaned is None:
            on_bad(f"line {no}", caption_problem(caption))
            continue
        yield name.strip(), cleaned


def detect_format(path: Path, head: str) -> str:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "karpathy"
    if suffix == ".csv":
        return "csv"
    first = next((ln for ln in head.splitlines() if ln.strip()), "")
    if "\t" in first and "#" in first.split("\t", 1)[0]:
        return "flickr"
    return "text"


def read_caption_file(
    path: str | os.PathLike, fmt: str = "auto", on_bad: BadLine = _ignore
) -> list[tuple[str | None, str]]:
    """All captions of a file as ``(image name or None, caption)`` pairs."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CaptionFileError(f"{path}: cannot read ({exc.strerror or exc})") from None
    text = raw.decode("utf-8", errors="replace")
    if "\x00" in text:
        raise CaptionFileError(f"{path}: binary file, not captions (expected text, CSV or JSON)")
    if fmt == "auto":
        fmt = detect_format(path, text[:4096])
    if fmt == "flickr":
        return list(parse_flickr_token_lines(io.StringIO(text), on_bad))
    if fmt == "karpathy":
        return _parse_karpathy(path, text, on_bad)
    if fmt == "csv":
        return list(_parse_csv(text, on_bad))
    if fmt == "text":
        out = []
        for no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            cap = clean_caption(line)
            if cap is None:
                on_bad(f"line {no}", caption_problem(line))
                continue
            out.append((None, cap))
        return out
    raise CaptionFileError(f"unknown caption format {fmt!r}; choose auto, flickr, karpathy, csv or text")


def _parse_karpathy(path: Path, text: str, on_bad: BadLine) -> list[tuple[str | None, str]]:
    """Captions of a Karpathy-split JSON; a refused caption is reported by its
    image's entry in ``images``."""
    try:
        images = json.loads(text)["images"]
        out = []
        for no, item in enumerate(images):
            for s in item.get("sentences", []):
                raw = str(s.get("raw", ""))
                cap = clean_caption(raw)
                if cap:
                    out.append((str(item["filename"]), cap))
                else:
                    on_bad(f"images[{no}] ({item['filename']})", caption_problem(raw))
        return out
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CaptionFileError(
            f"{path}: not a Karpathy-split JSON (needs images[].filename and images[].sentences[].raw): {exc}"
        ) from None


def _parse_csv(text: str, on_bad: BadLine) -> Iterator[tuple[str | None, str]]:
    rows = csv.reader(io.StringIO(text))
    for no, row in enumerate(rows, 1):
        if not row or not any(c.strip() for c in row):
            continue
        if no == 1 and [c.strip().lower() for c in row[:2]] == ["image", "caption"]:
            continue
        if len(row) < 2:
            on_bad(f"line {no}", "expected two columns: image,caption")
            continue
        cap = clean_caption(row[1])
        if cap is None:
            on_bad(f"line {no}", caption_problem(row[1]))
            continue
        yield (row[0].strip() or None), cap
