"""Reading images safely, and the resizing the method uses.

`inspect_image` decides whether a file is a usable photo and what converting it to RGB takes;
`load_rgb` applies exactly that (EXIF orientation, mode conversion), so every stage sees the
same pixels for an anchor.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import UltracurateError, reason_text

# Larger than any real photo dataset's images, far smaller than a decompression bomb.
MAX_PIXELS = 64_000_000


class BadImage(UltracurateError):
    pass


@dataclass
class ImageInfo:
    width: int
    height: int
    format: str
    mode: str
    conversion: str   # '' when the file is plain RGB with no orientation tag


def _open(data: bytes, name: str, max_pixels: int) -> Image.Image:
    if not data:
        raise BadImage(f"{name}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise BadImage(f"{name}: {w}x{h} is over the pixel limit ({max_pixels})")
            im.load()  # full decode: catches truncated files
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage(f"{name}: image is over the pixel limit (decompression bomb)") from None
    except Exception as e:
        raise BadImage(f"{name}: not a readable image ({reason_text(e)})") from None
    return im


def _to_rgb(im: Image.Image) -> tuple[Image.Image, list[str]]:
    steps = []
    orientation = im.getexif().get(0x0112, 1)
    if orientation not in (1, None):
        im = ImageOps.exif_transpose(im)
        steps.append(f"exif_transpose:{orientation}")
    mode = im.mode
    if mode == "RGB":
        return im, steps
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        im = Image.fromarray(arr, "L").convert("RGB")
        steps.append(f"{mode.lower()}->rgb")
    elif mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba).convert("RGB")
        steps.append(f"{mode.lower()}->rgb:alpha_on_white")
    else:  # CMYK, P, L, 1, YCbCr, LAB, HSV, F
        im = im.convert("RGB")
        steps.append(f"{mode.lower()}->rgb")
    return im, steps


def inspect_image(data: bytes, name: str = "image", max_pixels: int = MAX_PIXELS
                  ) -> tuple[ImageInfo, Image.Image]:
    """Decode fully; return its facts and the RGB image. Raises BadImage with a one-line
    reason naming the file."""
    im = _open(data, name, max_pixels)
    fmt, mode = im.format or "", im.mode
    rgb, steps = _to_rgb(im)
    return ImageInfo(rgb.width, rgb.height, fmt, mode, ",".join(steps)), rgb


def read_bytes(path: str | Path) -> bytes:
    """A file's bytes, or BadImage with a one-line reason naming it (a missing file, a broken
    symbolic link, a folder, a file the OS will not read)."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        why = "broken symbolic link" if path.is_symlink() else "file not found"
        raise BadImage(f"{path}: {why}") from None
    except IsADirectoryError:
        raise BadImage(f"{path}: is a folder") from None
    except OSError as e:
        raise BadImage(f"{path}: cannot read ({e.strerror or reason_text(e)})") from None


def load_rgb(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    return inspect_image(read_bytes(path), str(path), max_pixels)[1]


def resize_center_crop(im: Image.Image, size: int = 512,
                       resample: int | None = None) -> Image.Image:
    """Short side to `size`, then a centre crop to size x size (the method's input). PIL's
    default resampling (bicubic) unless resample is given, as the released code does."""
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh)) if resample is None else im.resize((nw, nh), resample)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def to_jpeg_bytes(im: Image.Image, quality: int = 100) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def to_png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def to_data_url(im: Image.Image, max_side: int | None = 1024, quality: int = 90) -> str:
    """An RGB image as a `data:image/jpeg;base64,...` URL, the form OpenAI-compatible vision
    endpoints take. The long side is scaled down to max_side first (None: as it is): a
    served VLM resizes anyway, and a 60-megapixel anchor would be a 20 MB request."""
    import base64
    if max_side and max(im.size) > max_side:
        scale = max_side / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                       Image.Resampling.BICUBIC)
    return "data:image/jpeg;base64," + base64.b64encode(to_jpeg_bytes(im, quality)).decode()
