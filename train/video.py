"""A stored clip's frames for training: ``fNN.jpg`` members, or an ``mp4`` member decoded with PyAV.

condmoe-prep stores clips already sampled (data_prep/video.py); training then picks ``data.num_frames`` of them with
the same rule (``data_prep.schema.uniform_frame_indices``).
"""

import io

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
