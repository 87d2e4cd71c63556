"""Caption file parsers: Flickr8k token files, Karpathy-split JSON, CSV
(image,caption) and plain text (one caption a line).

Each parser yields ``(image_name_or_None, caption)`` and reports malformed
lines through ``on_bad(where, reason)`` instead of failing. Files are read
as a stream (:class:`CaptionFile`), so importing a large collection holds one
batch of captions in memory, not the file.
"""

from __future__ import annotations

import csv
import json
import os
import re
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


FORMATS = ("flickr", "karpathy", "csv", "text")
_READ_CHUNK = 1 << 20
MAX_JSON_ENTRY_CHARS = 64 << 20  # one entry of a JSON file's images list
MAX_LINE_CHARS = 16 << 20
# control characters and undecodable bytes: a text file has next to none (a
# legacy 8-bit encoding turns a few accented letters into U+FFFD); binary data
# has many, and a tenth of a piece of the file is refused as binary
_NOT_TEXT = re.compile("[\x00-\x08\x0e-\x1f\x7f\ufffd]")


class CaptionFile:
    """A caption file read as a stream: memory stays flat whatever its size.

    :meth:`count` reads it once to check it and count its captions;
    :meth:`entries` yields them, each call a new pass over the file. The
    format is detected from the name and the first lines unless given.
    """

    def __init__(self, path: str | os.PathLike, fmt: str = "auto"):
        self.path = Path(path)
        if fmt != "auto" and fmt not in FORMATS:
            raise CaptionFileError(f"unknown caption format {fmt!r}; choose auto, {', '.join(FORMATS)}")
        with self._open() as f:
            head = f.read(4096)
        self.format = detect_format(self.path, head) if fmt == "auto" else fmt

    def _open(self):
        try:
            return self.path.open(encoding="utf-8-sig", errors="replace", newline="")
        except OSError as exc:
            raise CaptionFileError(f"{self.path}: cannot read ({exc.strerror or exc})") from None

    def _chunks(self, f) -> Iterator[str]:
        """The file's text in pieces, refusing a binary file."""
        while True:
            try:
                piece = f.read(_READ_CHUNK)
            except OSError as exc:
                raise CaptionFileError(f"{self.path}: cannot read ({exc.strerror or exc})") from None
            if not piece:
                return
            if "\x00" in piece or (len(piece) >= 64 and len(_NOT_TEXT.findall(piece)) > 0.1 * len(piece)):
                raise CaptionFileError(f"{self.path}: binary file, not captions (expected text, CSV or JSON)")
            yield piece

    def _lines(self, f) -> Iterator[str]:
        """Lines split at "\\n" and kept whole (a CSV field may hold a "\\r")."""
        rest = ""
        for piece in self._chunks(f):
            lines = (rest + piece).split("\n")
            rest = lines.pop()
            if len(rest) > MAX_LINE_CHARS:
                raise CaptionFileError(f"{self.path}: a line longer than {MAX_LINE_CHARS >> 20} M characters; "
                                       "not a caption file")
            yield from (ln + "\n" for ln in lines)
        if rest:
            yield rest

    def count(self) -> tuple[int, int]:
        """(captions, malformed entries) in the file; raises
        :class:`CaptionFileError` when it cannot be read as its format. Also
        sets ``not_utf8``: the captions holding bytes that are not UTF-8
        (read as U+FFFD, as a file in a legacy encoding gives)."""
        bad = [0]

        def note(where, reason):
            bad[0] += 1

        good = 0
        self.not_utf8 = 0
        for _name, caption in self.entries(note):
            good += 1
            self.not_utf8 += "\ufffd" in caption
        return good, bad[0]

    def entries(self, on_bad: BadLine = _ignore) -> Iterator[tuple[str | None, str]]:
        """``(image name or None, caption)`` of each good entry, in file order;
        malformed ones are reported through ``on_bad``."""
        with self._open() as f:
            if self.format == "flickr":
                yield from parse_flickr_token_lines(self._lines(f), on_bad)
            elif self.format == "karpathy":
                yield from _parse_karpathy(self.path, self._chunks(f), on_bad)
            elif self.format == "csv":
                yield from _parse_csv(self._lines(f), on_bad)
            else:
                # any line break ends a line of plain text, "\\r" alone too
                yield from _parse_text((part for ln in self._lines(f) for part in ln.splitlines()), on_bad)


def read_caption_file(
    path: str | os.PathLike, fmt: str = "auto", on_bad: BadLine = _ignore
) -> list[tuple[str | None, str]]:
    """All captions of a file as ``(image name or None, caption)`` pairs (in
    memory; :class:`CaptionFile` streams them)."""
    return list(CaptionFile(path, fmt).entries(on_bad))


def _parse_text(lines: Iterable[str], on_bad: BadLine) -> Iterator[tuple[None, str]]:
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        cap = clean_caption(line)
        if cap is None:
            on_bad(f"line {no}", caption_problem(line))
            continue
        yield None, cap


def _json_list_items(chunks: Iterator[str], key: str) -> Iterator:
    """The items of the list under ``key`` of a JSON object read piece by piece,
    one item in memory at a time (the object's other values are parsed and
    dropped). Raises ``ValueError`` on malformed JSON, ``KeyError`` without ``key``."""
    decoder = json.JSONDecoder()
    state = {"buf": "", "pos": 0, "eof": False}

    def more() -> bool:
        piece = next(chunks, "")
        if not piece:
            state["eof"] = True
            return False
        state["buf"] = state["buf"][state["pos"] :] + piece
        state["pos"] = 0
        return True

    def peek() -> str:
        """The next character that is not whitespace ('' at the end), not consumed."""
        while True:
            buf, pos = state["buf"], state["pos"]
            while pos < len(buf) and buf[pos] in " \t\n\r":
                pos += 1
            state["pos"] = pos
            if pos < len(buf) or not more():
                return state["buf"][state["pos"] : state["pos"] + 1]

    def take(allowed: str) -> str:
        c = peek()
        if not c or c not in allowed:
            raise ValueError(f"expected one of {allowed!r}, found {c or 'the end of the file'!r}")
        state["pos"] += 1
        return c

    def value():
        peek()
        while True:
            try:
                obj, end = decoder.raw_decode(state["buf"], state["pos"])
            except json.JSONDecodeError as exc:
                obj, end, error = None, None, exc
            # a number may go on past the text read so far ("1" of "12", "1" of "1.5")
            cut = (end is not None and not state["eof"] and isinstance(obj, (int, float))
                   and not state["buf"][end:].lstrip("0123456789.eE+-"))
            if end is not None and not cut:
                state["pos"] = end
                return obj
            if len(state["buf"]) - state["pos"] > MAX_JSON_ENTRY_CHARS:
                raise ValueError(f"an entry longer than {MAX_JSON_ENTRY_CHARS >> 20} M characters")
            if not more():
                if end is None:
                    raise error
                state["pos"] = end
                return obj

    take("{")
    found = False
    if peek() == "}":
        state["pos"] += 1
    else:
        while True:
            name = value()
            if not isinstance(name, str):
                raise ValueError("object keys must be strings")
            take(":")
            if name == key:
                found = True
                take("[")
                if peek() == "]":
                    state["pos"] += 1
                else:
                    while True:
                        yield value()
                        if take(",]") == "]":
                            break
            else:
                value()
            if take(",}") == "}":
                break
    if peek():
        raise ValueError("extra data after the JSON object")
    if not found:
        raise KeyError(key)


def _parse_karpathy(path: Path, chunks: Iterator[str], on_bad: BadLine) -> Iterator[tuple[str | None, str]]:
    """Captions of a Karpathy-split JSON; a refused caption is reported by its
    image's entry in ``images``."""
    try:
        for no, item in enumerate(_json_list_items(chunks, "images")):
            for s in item.get("sentences", []):
                raw = str(s.get("raw", ""))
                cap = clean_caption(raw)
                if cap:
                    yield str(item["filename"]), cap
                else:
                    on_bad(f"images[{no}] ({item['filename']})", caption_problem(raw))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CaptionFileError(
            f"{path}: not a Karpathy-split JSON (needs images[].filename and images[].sentences[].raw): {exc}"
        ) from None


# A first CSV row naming its columns with these words is a header, not a caption.
CSV_IMAGE_HEADERS = {"image", "images", "filename", "file_name", "file", "image_name", "image_file", "name",
                     "path", "image_path", "image_id", "img", "id", "url"}
CSV_CAPTION_HEADERS = {"caption", "captions", "text", "sentence", "description", "raw", "comment", "title",
                       "alt", "alt_text"}


def _parse_csv(lines: Iterable[str], on_bad: BadLine) -> Iterator[tuple[str | None, str]]:
    rows = csv.reader(lines)
    first = True
    for no, row in enumerate(rows, 1):
        if not row or not any(c.strip() for c in row):
            continue
        names = [c.strip().lower().replace(" ", "_") for c in row]
        if first and len(row) == 2 and names[0] in CSV_IMAGE_HEADERS and names[1] in CSV_CAPTION_HEADERS:
            first = False
            continue
        first = False
        if len(row) != 2:
            on_bad(f"line {no}", f"expected two columns, image,caption, found {len(row)} "
                                 "(put a caption that holds commas in double quotes)")
            continue
        cap = clean_caption(row[1])
        if cap is None:
            on_bad(f"line {no}", caption_problem(row[1]))
            continue
        yield (row[0].strip() or None), cap
