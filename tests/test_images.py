"""Image attachments: the type from the bytes, the pixel size, the limits."""

from __future__ import annotations

import hashlib
import io

import pytest
from PIL import Image

from llamad.errors import ImageError
from llamad.images import data_uri, inspect_image
from llamad.protocol import MAX_IMAGE_BYTES


def picture(fmt: str, size: tuple[int, int] = (64, 48), **save: object) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(out, format=fmt, **save)
    return out.getvalue()


@pytest.mark.parametrize(
    ("fmt", "save", "mime"),
    [
        ("PNG", {}, "image/png"),
        ("JPEG", {}, "image/jpeg"),
        ("JPEG", {"progressive": True}, "image/jpeg"),
        ("WEBP", {}, "image/webp"),
        ("WEBP", {"lossless": True}, "image/webp"),
        ("GIF", {}, "image/gif"),
    ],
)
def test_type_and_size_come_from_the_bytes(fmt: str, save: dict[str, object], mime: str) -> None:
    data = picture(fmt, (640, 480), **save)
    info = inspect_image(data, "cat.bmp")  # the name does not matter
    assert (info.mime, info.width, info.height, info.size) == (mime, 640, 480, len(data))
    assert info.digest == hashlib.sha256(data).hexdigest()


def test_webp_with_alpha_uses_the_extended_header() -> None:
    out = io.BytesIO()
    Image.new("RGBA", (300, 7), (0, 0, 0, 0)).save(out, format="WEBP")
    info = inspect_image(out.getvalue())
    assert (info.mime, info.width, info.height) == ("image/webp", 300, 7)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "cat.png is empty"),
        (b"%PDF-1.7\n...", "cat.png is a PDF; attach a PNG, JPEG, WebP or GIF image"),
        (b"hello, world", "cat.png is not an image llamad knows"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "truncated or damaged"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "truncated or damaged"),
    ],
)
def test_what_is_not_an_image_is_refused(data: bytes, reason: str) -> None:
    with pytest.raises(ImageError, match=reason.replace("(", r"\(")):
        inspect_image(data, "cat.png")


def test_truncated_real_images_are_refused() -> None:
    for fmt, keep in (("PNG", 20), ("JPEG", 20), ("WEBP", 20), ("GIF", 8)):
        with pytest.raises(ImageError, match="truncated or damaged"):
            inspect_image(picture(fmt)[:keep], "x")


def test_size_limit() -> None:
    data = picture("PNG")
    with pytest.raises(ImageError, match="the limit is 10 MiB"):
        inspect_image(data + b"\x00" * MAX_IMAGE_BYTES, "huge.png")


def test_data_uri() -> None:
    assert data_uri("image/png", b"\x89PNG") == "data:image/png;base64,iVBORw=="
