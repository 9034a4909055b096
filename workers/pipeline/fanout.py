"""Encoding the frames of one large instance on several Ray workers at once.

A 2,000-frame breast tomosynthesis or cardiac instance is hundreds of frames of codec
work; on one core it would hold the whole batch up. Above ``min_frames`` frames, the
frames are cut into runs of ``chunk_frames`` and each run is encoded *and verified bit for
bit* by its own Ray task over one shared, zero-copy buffer. Ray releases the waiting
task's CPU while it waits, so the runs really spread over the cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt
import ray

from workers.codecs.lossless import EncodedPixels, NotLossless, encode_verified
from workers.dicom.split import PixelLayout


@dataclass(frozen=True)
class FrameFanout:
    """When and how finely to spread one instance's frames over workers."""

    min_frames: int = 64  # 0 turns fan-out off
    chunk_frames: int = 32
    # Below this much pixel data, scheduling the runs costs more than it saves
    # (measured in bench/multiframe.py: 26 MB was slower spread than on one core).
    min_bytes: int = 32 * 1024 * 1024

    def applies(self, layout: PixelLayout) -> bool:
        return (
            0 < self.min_frames <= layout.frames
            and layout.expected_length >= self.min_bytes
            and layout.frame_bits % 8 == 0
            and ray.is_initialized()
        )

    def encode(
        self, pixels: memoryview, layout: PixelLayout, transfer_syntax: str
    ) -> tuple[EncodedPixels, int]:
        """Encoded frames in order, each verified bit-exact by its task; and task count."""
        body = np.frombuffer(pixels, dtype=np.uint8, count=layout.expected_length)
        shared = ray.put(body)  # workers map it read-only: no copy per task
        bounds = [
            (start, min(start + self.chunk_frames, layout.frames))
            for start in range(0, layout.frames, self.chunk_frames)
        ]
        runs = [_encode_run.remote(shared, layout, a, b, transfer_syntax) for a, b in bounds]
        try:
            parts = ray.get(runs)
        except ray.exceptions.RayTaskError as error:
            if isinstance(error.cause, NotLossless):
                raise NotLossless(str(error.cause)) from None
            raise
        frames = tuple(codestream for part in parts for codestream in part)
        trailing = bytes(pixels[layout.expected_length :])
        return EncodedPixels(transfer_syntax, frames, trailing), len(bounds)


@ray.remote(num_cpus=1, max_retries=2)
def _encode_run(
    buffer: npt.NDArray[np.uint8], layout: PixelLayout, start: int, stop: int, syntax: str
) -> tuple[bytes, ...]:
    """Frames ``start``..``stop`` - 1 encoded and each proven to decode bit-exact."""
    view = buffer.data[start * layout.frame_length : stop * layout.frame_length]
    return encode_verified(view, replace(layout, frames=stop - start), syntax).frames
