"""Image checks shared by the reader, the shard packer and the loader: links, size, header.

Policy: an image that fails here is a bad view (dropped and reported), never a crash; PIL's
decompression-bomb warning and error are turned into this limit's message.
"""

from __future__ import annotations

import warnings
from pathlib import Path

# views above this many pixels are dropped (reported): 16.8 MP = 4096 x 4096, 10x a 640 x 640
# x 4 location; PIL's own decompression-bomb guard starts at 89 MP and aborts at 179 MP
DEFAULT_MAX_PIXELS = 4096 * 4096


def image_header_problem(path: Path, images_dir: Path | None, max_pixels: int) -> str | None:
    """Why an image cannot be used, or None: missing, a link out of `images_dir`, an unreadable
    header, or more than `max_pixels` pixels. Reads only the header (cheap)."""
    if images_dir is not None:
        target = path.resolve()
        if not target.is_relative_to(images_dir.resolve()):
            return f"symlink leads outside the image folder (to {target})"
    if not path.is_file():
        return "missing image"
    try:
        with open(path, "rb") as f:
            return pixel_problem(f, max_pixels)
    except OSError as e:
        return f"unreadable image ({type(e).__name__})"


def pixel_problem(source, max_pixels: int) -> str | None:
    """Open an image header (file object or path) and say why it is unusable, or None.
    PIL's decompression-bomb warning and error become this limit's message."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is below PIL's
            with Image.open(source) as im:
                w, h = im.size
    except Image.DecompressionBombError as e:
        return f"image over the pixel limit ({e})"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"unreadable image ({type(e).__name__})"
    if w * h > max_pixels:
        return f"image of {w}x{h} = {w * h} pixels over the limit of {max_pixels} pixels (max_pixels)"
    return None


EIGHT_BIT_MODES = ("L", "RGB", "CMYK", "YCbCr")  # what a JPEG decodes to


def format_problem(im) -> str | None:
    """Why an opened view is not the 8-bit JPEG it is named as (a 16-bit PNG named .jpg would
    reach the model all white), or None. Header only: cheap enough for every loader read."""
    if im.format != "JPEG" or im.mode not in EIGHT_BIT_MODES:
        return f"degenerate image: a {im.format} of mode {im.mode} named .jpg (8-bit JPEG expected)"
    return None
