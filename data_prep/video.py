"""Video clips with PyAV: decode, pick N frames (uniformly or at a fixed stride), store as frame JPEGs or an mp4.

Frames are stored like the synthetic videos (``f00.jpg`` ... ``fNN.jpg``, so ``train/`` reads both the same way) or
re-encoded into one ``.mp4`` (H.264 when the PyAV build has libx264, MPEG-4 part 2 otherwise). Both are
deterministic: x264's macroblock-tree rate control was seen to give different bytes for the same input from run to
run (PyAV 18, one thread), so it is turned off.
"""

from __future__ import annotations

import argparse
import io
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
from PIL import Image

from condmoe.data_prep.argtypes import non_negative_int, positive_int
from condmoe.data_prep.errors import SkipSample, UserError
from condmoe.data_prep.imaging import encode_jpeg, resize_short_side
from condmoe.data_prep.schema import MAX_FRAMES, VIDEO, frame_member, uniform_frame_indices

__all__ = ["VIDEO_EXTENSIONS", "VideoOptions", "decode_clip", "encode_clip", "sample_indices", "video_sample"]

VIDEO_EXTENSIONS: frozenset[str] = frozenset({".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v"})


@dataclass(frozen=True)
class VideoOptions:
    """How clips are sampled and stored.

    Attributes:
        num_frames: Frames kept per clip.
        sampling: ``"uniform"``: the centres of ``num_frames`` equal segments of the whole clip; ``"stride"``: every
            ``stride``-th frame of a window centred in the clip (the last frame repeats if the clip is too short).
        stride: Frame step for ``"stride"``.
        fmt: ``"frames"`` (``f00.jpg`` ...) or ``"mp4"``.
        short_side: Target short side of the frames in pixels (0 keeps the size).
        quality: JPEG quality of frame members.
        fps: Frame rate written into re-encoded mp4 files.
    """

    num_frames: int = 8
    sampling: str = "uniform"
    stride: int = 4
    fmt: str = "frames"
    short_side: int = 128
    quality: int = 90
    fps: int = 8

    def validate(self) -> None:
        """Raise ``ValueError`` for out-of-range fields."""
        if not 1 <= self.num_frames <= MAX_FRAMES:
            raise ValueError(f"--num-frames must be in [1, {MAX_FRAMES}], got {self.num_frames}")
        if self.sampling not in ("uniform", "stride"):
            raise ValueError(f"--frame-sampling must be uniform or stride, got {self.sampling!r}")
        if self.stride < 1 or self.fps < 1:
            raise ValueError("--frame-stride and --mp4-fps must be positive")
        if self.fmt not in ("frames", "mp4"):
            raise ValueError(f"--video-format must be frames or mp4, got {self.fmt!r}")
        if not 1 <= self.quality <= 95:
            raise ValueError(f"JPEG quality must be in [1, 95], got {self.quality}")

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser, with_quality: bool = True) -> None:
        """Add the frame sampling and storage flags, and ``--jpeg-quality`` unless the image options add it."""
        d = VideoOptions()
        s = " (default: %(default)s)"
        if with_quality:
            parser.add_argument("--jpeg-quality", type=int, default=d.quality, help="JPEG quality 1-95" + s)
        parser.add_argument("--num-frames", type=positive_int, default=d.num_frames, help="frames per clip" + s)
        parser.add_argument(
            "--frame-sampling",
            choices=("uniform", "stride"),
            default=d.sampling,
            help="uniform: spread over the whole clip; stride: every --frame-stride-th frame, centred" + s,
        )
        parser.add_argument("--frame-stride", type=positive_int, default=d.stride, help="step for stride" + s)
        parser.add_argument(
            "--video-format", choices=("frames", "mp4"), default=d.fmt, help="f00.jpg... members or one .mp4" + s
        )
        parser.add_argument(
            "--video-size", type=non_negative_int, default=d.short_side, help="frame short side in px, 0 keeps" + s
        )
        parser.add_argument("--mp4-fps", type=positive_int, default=d.fps, help="frame rate of written mp4s" + s)

    @staticmethod
    def from_args(args: argparse.Namespace) -> VideoOptions:
        """Build and validate from parsed arguments (needs ``--jpeg-quality`` too).

        Raises:
            UserError: For an out-of-range value.
        """
        options = VideoOptions(
            num_frames=args.num_frames,
            sampling=args.frame_sampling,
            stride=args.frame_stride,
            fmt=args.video_format,
            short_side=args.video_size,
            quality=args.jpeg_quality,
            fps=args.mp4_fps,
        )
        try:
            options.validate()
        except ValueError as e:
            raise UserError(str(e)) from None
        return options


def sample_indices(total: int, options: VideoOptions) -> list[int]:
    """Indices of the frames to keep from a clip of ``total`` frames (``total >= 1``), in order, maybe repeated."""
    n = options.num_frames
    if options.sampling == "uniform":
        return uniform_frame_indices(total, n)
    span = (n - 1) * options.stride + 1
    start = max(0, (total - span) // 2)
    return [min(total - 1, start + i * options.stride) for i in range(n)]


def _count_frames(source: bytes | str | os.PathLike) -> int:
    # Many containers (webm, some mp4s) do not store a frame count; counting packets needs no decoding.
    with av.open(io.BytesIO(source) if isinstance(source, bytes) else os.fspath(source)) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size)


def decode_clip(source: bytes | str | os.PathLike, options: VideoOptions) -> tuple[list[Image.Image], dict[str, Any]]:
    """Decode the frames chosen by :func:`sample_indices` and shrink them to the target short side.

    Args:
        source: Encoded bytes or a file path.
        options: Sampling and size.

    Returns:
        ``num_frames`` RGB images and ``{"orig_num_frames", "fps", "frame_indices", "orig_width", "orig_height"}``.

    Raises:
        SkipSample: ``missing_file``, or ``bad_video`` for anything PyAV cannot open or decode, or a clip without
            video frames.
    """
    if not isinstance(source, bytes) and not os.path.isfile(source):
        raise SkipSample("missing_file", f"no such file: {os.fspath(source)}")
    try:
        with av.open(io.BytesIO(source) if isinstance(source, bytes) else os.fspath(source)) as container:
            if not container.streams.video:
                raise SkipSample("bad_video", "no video stream")
            stream = container.streams.video[0]
            total = stream.frames or 0
            fps = float(stream.average_rate) if stream.average_rate else 0.0
            if total <= 0:
                total = _count_frames(source)
            if total <= 0:
                raise SkipSample("bad_video", "no video frames")
            indices = sample_indices(total, options)
            wanted = set(indices)
            kept: dict[int, Image.Image] = {}
            last: Image.Image | None = None
            size = (0, 0)
            for k, frame in enumerate(container.decode(stream)):
                if k in wanted:
                    last = frame.to_image()
                    kept[k] = last
                    size = last.size
                if k >= indices[-1]:
                    break  # the rest of the clip is not needed
    except SkipSample:
        raise
    # PyAV raises its FFmpegError family (a ValueError subclass) and sometimes plain OSError/ValueError on broken
    # files; all of them mean "this video is unusable".
    except (av.FFmpegError, OSError, ValueError, IndexError) as e:
        raise SkipSample("bad_video", f"{type(e).__name__}: {e}") from None
    if last is None:
        raise SkipSample("bad_video", f"none of the {total} frames could be decoded")
    frames: list[Image.Image] = []
    for index in indices:
        # A clip that decodes to fewer frames than its header claims repeats its last decoded frame.
        last = kept.get(index, last)
        frames.append(last)
    frames = [resize_short_side(f.convert("RGB"), options.short_side) for f in frames]
    info = {
        "orig_num_frames": total,
        "fps": round(fps, 4),
        "frame_indices": indices,
        "orig_width": size[0],
        "orig_height": size[1],
    }
    return frames, info


def _mp4(frames: list[Image.Image], fps: int) -> bytes:
    # yuv420p needs even dimensions: crop the odd row/column instead of scaling, so pixels stay where they were.
    w, h = frames[0].size
    w, h = max(2, w - w % 2), max(2, h - h % 2)
    buf = io.BytesIO()
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    options = {"crf": "23", "preset": "medium", "x264-params": "mbtree=0"} if codec == "libx264" else {"qscale": "3"}
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.thread_count = 1  # thread count is recorded in the stream and can change the bytes
        for t, image in enumerate(frames):
            frame = av.VideoFrame.from_image(image.crop((0, 0, w, h)) if image.size != (w, h) else image)
            frame.pts = t
            frame.time_base = Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def encode_clip(frames: list[Image.Image], options: VideoOptions) -> dict[str, bytes]:
    """Encode frames as sample members: ``{"f00.jpg": ..., ...}`` or ``{"mp4": ...}``."""
    if options.fmt == "mp4":
        return {VIDEO: _mp4(frames, options.fps)}
    return {frame_member(t): encode_jpeg(frame, options.quality) for t, frame in enumerate(frames)}


def video_sample(source: bytes | str | os.PathLike, options: VideoOptions) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Decode, sample and encode one clip.

    Returns:
        The media members (frames or mp4) and metadata for the sample's ``.json`` (adds ``num_frames``, ``width``,
        ``height``, ``format``).

    Raises:
        SkipSample: If the clip is missing or unusable.
    """
    frames, info = decode_clip(source, options)
    members = encode_clip(frames, options)
    info.update(num_frames=len(frames), width=frames[0].size[0], height=frames[0].size[1], format=options.fmt)
    return members, info
