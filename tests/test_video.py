"""Video members on the training side: the frame-index rule of the data contract (data_prep/schema.py) and mp4 clips
decoded by train/video.py."""

import numpy as np
import pytest
from PIL import Image


def test_uniform_frame_indices_are_segment_centres():
    from condmoe.data_prep.schema import uniform_frame_indices

    assert uniform_frame_indices(16, 4) == [2, 6, 10, 14]
    assert uniform_frame_indices(6, 4) == [0, 2, 3, 5]
    assert uniform_frame_indices(3, 5) == [0, 0, 1, 2, 2]  # a short clip repeats frames
    assert uniform_frame_indices(1, 3) == [0, 0, 0]
    # the float rule train/ used before (int((i + 0.5) * total / n)) gives the same indices
    for total in range(1, 101):
        for n in range(1, 33):
            assert uniform_frame_indices(total, n) == [min(total - 1, int((i + 0.5) * total / n)) for i in range(n)]


def test_an_mp4_clip_is_read_like_frame_members():
    from condmoe.data_prep.video import VideoOptions, encode_clip
    from condmoe.train.video import video_frames

    colours = [(40 * t, 255 - 40 * t, 128) for t in range(6)]
    frames = [Image.new("RGB", (32, 24), c) for c in colours]
    mp4 = encode_clip(frames, VideoOptions(fmt="mp4", fps=8))["mp4"]
    decoded = video_frames({"__key__": "clip", "mp4": mp4})
    assert len(decoded) == 6 and all(f.size == (32, 24) and f.mode == "RGB" for f in decoded)
    # lossy, but each frame keeps its colour: the order survives
    means = [np.asarray(f, dtype=np.float64).reshape(-1, 3).mean(0) for f in decoded]
    assert all(np.abs(m - c).max() < 12 for m, c in zip(means, colours)), means
    stored = {"__key__": "clip", "f01.jpg": frames[1], "f00.jpg": frames[0], "f02.jpg": frames[2]}
    assert video_frames(stored) == [frames[0], frames[1], frames[2]]  # frame members in name order


def test_a_bad_mp4_member_is_a_value_error_naming_it():
    from condmoe.train.video import video_frames

    with pytest.raises(ValueError, match="mp4"):
        video_frames({"__key__": "clip", "mp4": b"\x00\x00\x00\x18ftypmp42 but nothing else"})
    with pytest.raises(ValueError, match="neither fNN.jpg frames nor an mp4"):
        video_frames({"__key__": "clip", "cls": 1})
