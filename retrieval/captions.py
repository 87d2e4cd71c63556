"""Caption file parsers: Flickr8k token files, Karpathy-split JSON, CSV
(image,caption) and plain text (one caption a line).

Each parser yields ``(image_name_or_None, caption)`` and reports malformed
lines through ``on_bad(line_no, reason)`` instead of failing.
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

BadLine = Callable[[int, str], None]


def _ignore(line_no: int, reason: str) -> None:
    pass


def clean_caption(text: str) -> str | None:
    text = " ".join(text.split())
    if not text or len(text) > MAX_CAPTION_CHARS:
        return None
    return text


def parse_flickr_token_lines(lines: Iterable[str], on_bad: BadLine = _ignore) -> Iterator[tuple[str, str]]:
    """``<image>#<n>\\t<caption>`` lines."""
    for no, line in enumerate(lines, 1):
        line = line.rstrip("\n\r")
        if not line.strip():
            continue
        key, sep, caption = line.partition("\t")
        name, hash_, _n = key.partition("#")
        caption = clean_caption(caption) if sep else None
        if not sep or not hash_ or not name.strip() or caption is None:
            on_bad(no, "expected '<image>#<n><TAB><caption>'")
            continue
        yield name.strip(), caption


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
        return _parse_karpathy(path, text)
    if fmt == "csv":
        return list(_parse_csv(text, on_bad))
    if fmt == "text":
        out = []
        for no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            cap = clean_caption(line)
            if cap is None:
                on_bad(no, f"caption longer than {MAX_CAPTION_CHARS} characters")
                continue
            out.append((None, cap))
        return out
    raise CaptionFileError(f"unknown caption format {fmt!r}; choose auto, flickr, karpathy, csv or text")


def _parse_karpathy(path: Path, text: str) -> list[tuple[str | None, str]]:
    try:
        images = json.loads(text)["images"]
        out = []
        for item in images:
            for s in item.get("sentences", []):
                cap = clean_caption(str(s.get("raw", "")))
                if cap:
                    out.append((str(item["filename"]), cap))
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
            on_bad(no, "expected two columns: image,caption")
            continue
        cap = clean_caption(row[1])
        if cap is None:
            on_bad(no, "empty or over-long caption")
            continue
        yield (row[0].strip() or None), cap
