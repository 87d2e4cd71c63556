"""Safe image decoding: every way a file can fail becomes a :class:`BadImage`
with a one-line reason, never an exception that stops a run."""

from __future__ import annotations

import io
import os
import stat
import warnings
from dataclasses import dataclass

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Refuse decompression bombs. A file whose decoded image would hold more than
# MAX_PIXELS is skipped. JPEGs decoded in draft mode count at their reduced size
# (up to 1/8 per side), so a 200-megapixel phone photo still indexes; nothing
# whose header claims more than MAX_HEADER_PIXELS is opened at all.
MAX_PIXELS = 89_478_485  # Pillow's own default warning threshold (~ 9459 x 9459)
MAX_HEADER_PIXELS = 64 * MAX_PIXELS  # what an 8x draft reduction brings under MAX_PIXELS
MAX_FILE_BYTES = 256 * 1024 * 1024

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif"})
# Photo formats Pillow cannot read: a folder scan reports them as skipped (so
# a user learns why their iPhone or camera-raw photos are missing) instead of
# passing over them in silence like other files.
UNSUPPORTED_PHOTO_EXTENSIONS = {
    ".heic": "HEIC", ".heif": "HEIF", ".jxl": "JPEG XL", ".dng": "camera raw", ".cr2": "camera raw",
    ".cr3": "camera raw", ".nef": "camera raw", ".arw": "camera raw", ".orf": "camera raw", ".rw2": "camera raw",
    ".raf": "camera raw",
}


class BadImage(Exception):
    """A file that is not a usable image; ``reason`` is a short category."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # crosses back from decoding worker processes
        return (type(self), (self.reason, self.detail))


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB, EXIF orientation applied
    width: int  # size of the original file's image
    height: int


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def unsupported_photo_kind(name: str) -> str | None:
    """"HEIC", "camera raw", ... for a photo format xmr cannot decode, else None."""
    return UNSUPPORTED_PHOTO_EXTENSIONS.get(os.path.splitext(name)[1].lower())


def decode_image(path: str | os.PathLike, draft_size: int | None = None, data: bytes | None = None) -> DecodedImage:
    """Open, verify and fully decode one image file to RGB.

    ``draft_size`` lets JPEGs decode at reduced scale (Pillow's draft mode) when
    the caller only needs about that many pixels on the short side. ``data``,
    when given, is the file's content already read (``path`` then only names it).
    """
    try:
        if data is None:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):  # a FIFO would block, a device never end
                kind = "folder" if stat.S_ISDIR(st.st_mode) else "FIFO, device or socket"
                raise BadImage("not a regular file", kind)
            size = st.st_size
        else:
            size = len(data)
    except FileNotFoundError:
        raise BadImage("vanished", "no such file") from None
    except OSError as exc:
        raise BadImage("unreadable", exc.strerror or str(exc)) from None
    if size == 0:
        raise BadImage("empty file", "zero bytes")
    if size > MAX_FILE_BYTES:
        raise BadImage("too large", f"{size} bytes (limit {MAX_FILE_BYTES})")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_HEADER_PIXELS:
        Image.MAX_IMAGE_PIXELS = MAX_HEADER_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path if data is None else io.BytesIO(data)) as im:
                width, height = im.size
                if width * height > MAX_HEADER_PIXELS:
                    raise BadImage("decompression bomb", f"{width}x{height} pixels (limit {MAX_HEADER_PIXELS})")
                if getattr(im, "n_frames", 1) > 1:
                    im.seek(0)
                if draft_size and im.format == "JPEG":
                    im.draft("RGB", (draft_size, draft_size))
                if im.size[0] * im.size[1] > MAX_PIXELS:
                    raise BadImage("decompression bomb", _too_many_pixels(im.format, (width, height), im.size))
                im.load()
                im = ImageOps.exif_transpose(im)
                if im.mode != "RGB":
                    im = _to_rgb(im)
                return DecodedImage(im, width, height)
    except BadImage:
        raise
    except UnidentifiedImageError:
        kind = unsupported_photo_kind(os.fspath(path))
        if kind:
            raise BadImage(f"unsupported format ({kind})", "Pillow cannot decode it; convert it to JPEG") from None
        raise BadImage("not an image", "unrecognised file format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage("decompression bomb", str(exc).split(".")[0]) from None
    except FileNotFoundError:
        raise BadImage("vanished", "deleted while it was being read") from None
    except OSError as exc:
        msg = str(exc) or type(exc).__name__
        if "truncated" in msg.lower():
            raise BadImage("truncated", msg) from None
        raise BadImage("corrupt", msg) from None
    except (ValueError, SyntaxError, EOFError, IndexError, TypeError) as exc:
        raise BadImage("corrupt", str(exc) or type(exc).__name__) from None
    except MemoryError:
        raise BadImage("too large", "out of memory while decoding") from None


def _too_many_pixels(fmt: str | None, header: tuple[int, int], decoded: tuple[int, int]) -> str:
    msg = f"{header[0]}x{header[1]} pixels"
    if decoded != header:
        msg += f", {decoded[0]}x{decoded[1]} at reduced size"
    msg += f", over the limit of {MAX_PIXELS:,} decoded pixels"
    if fmt != "JPEG":
        msg += "; only JPEGs decode at reduced size: save it as JPEG or scale it down"
    return msg


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any mode to RGB, compositing transparency onto white."""
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        im = im.point(lambda v: v * (1 / 256)).convert("L")
    return im.convert("RGB")
