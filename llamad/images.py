"""Images attached to chat messages: the type from the bytes, the size, the limits.

Pure: ``inspect_image`` reads only the first bytes of the data to learn the
format and pixel size (PNG, JPEG, WebP, GIF), so a file named ``cat.png``
holding a PDF is refused before anything is stored or sent to a model.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from dataclasses import dataclass
from typing import Final

from llamad.errors import ImageError
from llamad.protocol import image_size_problem

MAX_IMAGES_PER_MESSAGE: Final = 8
MIME_TYPES: Final = ("image/png", "image/jpeg", "image/webp", "image/gif")


@dataclass(frozen=True)
class ImageInfo:
    mime: str
    width: int
    height: int
    size: int  # bytes
    digest: str  # sha256 hex of the bytes: the storage key, so a repeat is stored once


def inspect_image(data: bytes, name: str = "the image") -> ImageInfo:
    """Format and size of ``data``; ``ImageError`` with a one-line reason otherwise."""
    if not data:
        raise ImageError(f"{name} is empty")
    too_big = image_size_problem(name, len(data))
    if too_big is not None:
        raise ImageError(too_big)
    try:
        mime, width, height = _sniff(data, name)
    except (struct.error, IndexError):
        raise ImageError(f"{name} is a truncated or damaged image") from None
    if width <= 0 or height <= 0:
        raise ImageError(f"{name} is a damaged image (size {width}×{height})")
    return ImageInfo(mime, width, height, len(data), hashlib.sha256(data).hexdigest())


def data_uri(mime: str, data: bytes) -> str:
    """How an image travels to llama-server: an OpenAI ``image_url`` data URI."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _sniff(data: bytes, name: str) -> tuple[str, int, int]:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        if data[12:16] != b"IHDR":
            raise IndexError
        width, height = struct.unpack(">II", data[16:24])
        return "image/png", width, height
    if data.startswith(b"\xff\xd8\xff"):
        return ("image/jpeg", *_jpeg_size(data))
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ("image/webp", *_webp_size(data))
    if data[:6] in (b"GIF87a", b"GIF89a"):
        width, height = struct.unpack("<HH", data[6:10])
        return "image/gif", width, height
    what = "a PDF" if data.startswith(b"%PDF") else "not an image llamad knows"
    raise ImageError(f"{name} is {what}; attach a PNG, JPEG, WebP or GIF image")


# Start-of-frame markers carry the size; C4 (DHT), C8 (JPG) and CC (DAC) do not.
_SOF_MARKERS: Final = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(data: bytes) -> tuple[int, int]:
    position = 2
    while True:
        while data[position] == 0xFF and data[position + 1] == 0xFF:  # fill bytes
            position += 1
        if data[position] != 0xFF:
            raise IndexError
        marker = data[position + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            position += 2
            continue
        if marker == 0xD9:  # end of image before any frame
            raise IndexError
        (length,) = struct.unpack(">H", data[position + 2 : position + 4])
        if marker in _SOF_MARKERS:
            height, width = struct.unpack(">HH", data[position + 5 : position + 9])
            return width, height
        position += 2 + length


def _webp_size(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8 ":  # lossy: 14-bit sizes after the frame tag and start code
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":  # lossless: 14-bit (size - 1) fields packed after a 0x2F
        if data[20] != 0x2F:
            raise IndexError
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":  # extended: 24-bit (size - 1) fields
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    raise IndexError
