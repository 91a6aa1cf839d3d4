"""Uploaded audio, checked before admission: a container we take, holding audio that decodes, and how long it is.

Every packet is decoded (PyAV), not just the header read: a header can lie about the
length, and the length is what the hold and the bill are for. Blocking: run it in a thread.
"""

from __future__ import annotations

import io

import av

from bus.errors import InvalidRequest

# FFmpeg's demuxer names for the containers OpenAI takes (its mp4, mpeg and mpga are among them).
_FORMATS = {"wav": "wav", "mp3": "mp3", "flac": "flac", "ogg": "ogg", "mov,mp4,m4a,3gp,3g2,mj2": "m4a",
            "matroska,webm": "webm"}
_TAKEN = "wav, mp3, flac, ogg, m4a or webm"


def audio_seconds(data: bytes, max_seconds: float) -> float:
    """The length of the audio in ``data``, in seconds; a 400 naming ``file`` if it is empty, not audio in a
    format we take, does not decode, or is longer than ``max_seconds``."""
    if not data:
        raise InvalidRequest("The audio file is empty.", param="file")
    seconds = 0.0
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if container.format.name not in _FORMATS:
                raise InvalidRequest(f"The file's format ({container.format.long_name}) is not one we take: "
                                     f"{_TAKEN}.", param="file")
            if not container.streams.audio:
                raise InvalidRequest("The file holds no audio.", param="file")
            for frame in container.decode(container.streams.audio[0]):
                seconds += frame.samples / frame.sample_rate
                if seconds > max_seconds:
                    raise InvalidRequest(f"The audio is longer than {max_seconds:g} seconds.", param="file")
    except av.FFmpegError as exc:
        raise InvalidRequest(f"The file is not audio we can decode ({_TAKEN}): {exc.strerror}.",
                             param="file") from None
    if seconds == 0:
        raise InvalidRequest("The audio file holds no sound.", param="file")
    return seconds
