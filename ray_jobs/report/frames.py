"""The frames of a few labelled videos, decoded again for the report's contact sheet.

Each video's most confident window is decoded with the core decoder and the run's own decode
settings (`_job.json`), so the sheet shows the very frames the model labelled, letterboxed as it
saw them, only larger (PAGE_FRAME_SIZE). The videos are read again from where the job read them
(`sources.read_videos`): a video that is gone, or no longer decodes, gets its reason in place of
its frames rather than failing the page. They are a dozen videos that the job has already decoded,
so they are decoded here in this process, without the decode stage's supervised child.
"""

from __future__ import annotations

from dataclasses import fields, replace

import numpy as np

from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.media.spec import DecodeSpec
from groupemotion_core.schema import SourceRow

PAGE_FRAME_SIZE = 160


def page_spec(decode_spec: dict | None) -> DecodeSpec:
    """The run's DecodeSpec (as `_job.json` records it; the default without one) at the page's size."""
    known = {f.name for f in fields(DecodeSpec)}
    spec = DecodeSpec(**{k: v for k, v in (decode_spec or {}).items() if k in known})
    return replace(spec, frame_size=PAGE_FRAME_SIZE)


def decode_frames(starts: dict[str, float], spec: DecodeSpec) -> dict[str, np.ndarray | str]:
    """{key: frames uint8 [T, H, W, 3] of the window from that start, or why there are none}."""
    from groupemotion_core.media.decode import decode_clip
    from ray_jobs.inputs.sources import read_videos

    found: dict[str, np.ndarray | str] = {}
    for row in read_videos(list(starts), spec.max_input_bytes):
        key = row[SourceRow.KEY]
        if row[SourceRow.ERROR] is not None:
            found[key] = row[SourceRow.ERROR]
            continue
        try:
            found[key] = decode_clip(row[SourceRow.VIDEO], spec, starts[key]).frames
        except GroupEmotionError as e:
            found[key] = str(e)
    return found
