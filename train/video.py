"""A stored clip's frames for training: ``fNN.jpg`` members, or an ``mp4`` member decoded with PyAV; the views of
a clip that multi-view evaluation averages (clips at several offsets, three crops).

condmoe-prep stores clips already sampled (data_prep/video.py); training then picks ``data.num_frames`` of them with
the same rule (``data_prep.schema.uniform_frame_indices``).
"""

import io

import numpy as np
from PIL import Image

from condmoe.data_prep import schema


def video_frames(sample: dict) -> list[Image.Image]:
    """Every stored frame of a decoded video sample, in order: its ``f00.jpg ... fNN.jpg`` members, else its mp4."""
    names = sorted(k for k in sample if schema.FRAME_MEMBER.fullmatch(k))
    if names:
        return [sample[k] for k in names]
    if schema.VIDEO in sample:
        return decode_mp4(sample[schema.VIDEO])
    raise ValueError(f"video sample {sample.get('__key__')} has neither fNN.jpg frames nor an {schema.VIDEO}")


def decode_mp4(data: bytes) -> list[Image.Image]:
    """All frames of an mp4 member as RGB images (prep's clips are short: at most ``schema.MAX_FRAMES``)."""
    import av  # here: only mp4 datasets need PyAV

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise ValueError("mp4 member without a video stream")
            frames = [frame.to_image().convert("RGB") for frame in container.decode(video=0)]
    except (av.FFmpegError, OSError) as exc:
        raise ValueError(f"undecodable mp4 member: {type(exc).__name__}: {exc}") from None
    if not frames:
        raise ValueError("mp4 member without frames")
    return frames


def view_frame_indices(total: int, num_frames: int, clip: int, clips: int) -> list[int]:
    """Frame ``i`` of clip ``clip`` of ``clips``: at ``(i + (clip + 0.5) / clips)`` segments of ``total / num_frames``
    frames (TSN-style test offsets); one clip is ``schema.uniform_frame_indices``, the segments' centres."""
    return [min(total - 1, int((i + (clip + 0.5) / clips) * total / num_frames)) for i in range(num_frames)]


def three_crops(image: Image.Image, size: int) -> list[np.ndarray]:
    """The short side resized to ``size`` (bicubic), then ``size`` x ``size`` crops at the start, centre and end of
    the long side (the usual 3-crop video test)."""
    image = image.convert("RGB")
    width, height = image.size
    scale = size / min(width, height)
    image = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)
    width, height = image.size
    spare = max(width, height) - size
    boxes = [(o, 0, o + size, size) if width > height else (0, o, size, o + size) for o in (0, spare // 2, spare)]
    return [np.asarray(image.crop(box)) for box in boxes]
