"""Image re-encoding shared by the sources: decode anything Pillow reads, fix orientation, shrink, write a JPEG.

Every image in the shards is an RGB baseline JPEG whose short side is at most the target (images are never
upscaled). Encoding is deterministic for a given Pillow/libjpeg, which is what makes a resumed run byte-identical to
an uninterrupted one.
"""

from __future__ import annotations

import argparse
import io
import os
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps

from condmoe.data_prep.argtypes import non_negative_int
from condmoe.data_prep.errors import SkipSample, UserError

__all__ = ["IMAGE_EXTENSIONS", "ImageOptions", "encode_jpeg", "open_image", "reencode_image", "resize_short_side"]

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)


@dataclass(frozen=True)
class ImageOptions:
    """How images are stored.

    Attributes:
        short_side: Target length of the shorter side in pixels; larger images are shrunk to it, smaller ones kept.
            0 keeps every image at its size.
        quality: JPEG quality (1-95).
    """

    short_side: int = 256
    quality: int = 90

    def validate(self) -> None:
        """Raise ``ValueError`` for out-of-range fields."""
        if self.short_side < 0:
            raise ValueError(f"image short side must be >= 0, got {self.short_side}")
        if not 1 <= self.quality <= 95:  # Pillow documents >95 as wasteful; 100 disables parts of the compression
            raise ValueError(f"JPEG quality must be in [1, 95], got {self.quality}")

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add ``--image-size`` and ``--jpeg-quality``."""
        d = ImageOptions()
        parser.add_argument(
            "--image-size",
            type=non_negative_int,
            default=d.short_side,
            help="shrink images so the short side is at most this many px; 0 keeps the size (default: %(default)s)",
        )
        parser.add_argument(
            "--jpeg-quality", type=int, default=d.quality, help="JPEG quality 1-95 (default: %(default)s)"
        )

    @staticmethod
    def from_args(args: argparse.Namespace) -> ImageOptions:
        """Build and validate from parsed ``--image-size``/``--jpeg-quality``.

        Raises:
            UserError: For an out-of-range value.
        """
        options = ImageOptions(short_side=args.image_size, quality=args.jpeg_quality)
        try:
            options.validate()
        except ValueError as e:
            raise UserError(str(e)) from None
        return options


def resize_short_side(image: Image.Image, short_side: int) -> Image.Image:
    """Shrink ``image`` (bicubic) so its short side is ``short_side``; smaller images and ``0`` leave it as is."""
    w, h = image.size
    if short_side <= 0 or min(w, h) <= short_side:
        return image
    scale = short_side / min(w, h)
    # The short side is exactly the target; the long side is rounded, never below 1 px.
    size = (short_side, max(1, round(h * scale))) if w <= h else (max(1, round(w * scale)), short_side)
    return image.resize(size, Image.Resampling.BICUBIC)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Plain convert("RGB") would turn transparent pixels black (their hidden colour); white is what viewers show.
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def open_image(source: bytes | str | os.PathLike, short_side: int = 0) -> tuple[Image.Image, tuple[int, int]]:
    """Decode an image fully, apply its EXIF orientation and convert it to RGB.

    Args:
        source: Encoded bytes or a file path.
        short_side: If set, JPEGs are decoded at a reduced scale that is still at least this large (much faster for
            big photos; the result is then shrunk exactly by :func:`resize_short_side`).

    Returns:
        The RGB image (not yet resized) and the original ``(width, height)`` after orientation.

    Raises:
        SkipSample: ``missing_file`` or ``bad_image`` (undecodable, truncated, decompression bomb).
    """
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        with image:
            width, height = image.size
            if short_side > 0 and min(width, height) > short_side:
                scale = short_side / min(width, height)
                image.draft("RGB", (int(width * scale) + 1, int(height * scale) + 1))
            image.load()  # decode now: a truncated file fails here and not later inside the encoder
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # orientations that swap width and height
                width, height = height, width
            oriented = ImageOps.exif_transpose(image)
            rgb = _to_rgb(oriented)
    except FileNotFoundError as e:
        raise SkipSample("missing_file", str(e)) from None
    # Pillow's format plugins raise many types on corrupt input (OSError, SyntaxError, ValueError, struct.error,
    # DecompressionBombError, ...); any of them means the file is unusable, never a bug here.
    except Exception as e:
        raise SkipSample("bad_image", f"{type(e).__name__}: {e}") from None
    return rgb, (width, height)


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    """Encode an RGB image as a baseline JPEG (no ``optimize``: it only saves a few percent and costs time)."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def reencode_image(source: bytes | str | os.PathLike, options: ImageOptions) -> tuple[bytes, dict[str, Any]]:
    """Decode, shrink to the target short side and re-encode one image.

    Args:
        source: Encoded bytes or a file path.
        options: Target size and quality.

    Returns:
        The JPEG bytes and ``{"width", "height", "orig_width", "orig_height"}`` for the sample's ``.json``.

    Raises:
        SkipSample: If the image is missing or cannot be decoded.
    """
    image, (orig_w, orig_h) = open_image(source, options.short_side)
    image = resize_short_side(image, options.short_side)
    meta = {"width": image.size[0], "height": image.size[1], "orig_width": orig_w, "orig_height": orig_h}
    return encode_jpeg(image, options.quality), meta
