"""multipart/related bodies (RFC 2387) as DICOMweb uses them (PS3.18 8.6.1.2)."""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


class MultipartError(ValueError):
    """A body that is not the multipart/related it claims to be; ``str(exc)`` says why."""


def new_boundary() -> str:
    return "pacsportal-" + secrets.token_hex(16)


def content_type(part_type: str, boundary: str, transfer_syntax: str | None = None) -> str:
    syntax = f"; transfer-syntax={transfer_syntax}" if transfer_syntax else ""
    return f'multipart/related; type="{part_type}"; boundary={boundary}' + syntax


def stream(parts: Iterable[tuple[dict[str, str], Iterable[bytes]]], boundary: str) -> Iterator[bytes]:
    """Encode (headers, chunks) parts as a multipart body, chunk by chunk."""
    for headers, chunks in parts:
        head = f"--{boundary}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        yield head.encode()
        yield from chunks
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def parameters(header: str) -> tuple[str, dict[str, str]]:
    """A Content-Type or Accept media range: (media type, parameters), lowercased names."""
    pieces = _split(header, ";")
    media = pieces[0].strip().lower() if pieces else ""
    params: dict[str, str] = {}
    for piece in pieces[1:]:
        name, _, value = piece.partition("=")
        params[name.strip().lower()] = value.strip().strip('"')
    return media, params


def _split(text: str, separator: str) -> list[str]:
    """Split on ``separator`` outside double quotes."""
    out, current, quoted = [], [], False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            out.append("".join(current))
            current = []
        else:
            current.append(char)
    out.append("".join(current))
    return out


def accept_ranges(header: str) -> list[tuple[str, dict[str, str]]]:
    """The media ranges of an Accept header, in the order given (q-values ignored but kept)."""
    return [parameters(item) for item in _split(header or "", ",") if item.strip()]


@dataclass
class Part:
    headers: dict[str, str]
    body: bytes

    @property
    def media_type(self) -> str:
        return parameters(self.headers.get("content-type", ""))[0]


def parse(data: bytes, boundary: str, *, max_parts: int = 100_000) -> Iterator[Part]:
    """Parse a multipart body; raise ``MultipartError`` when it is malformed."""
    delimiter = b"--" + boundary.encode()
    if delimiter not in data:
        raise MultipartError("the body does not contain the boundary its Content-Type names")
    chunks = data.split(delimiter)
    count = 0
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            return  # the closing delimiter
        if not chunk.startswith(b"\r\n"):
            raise MultipartError("a boundary is not followed by a line break")
        head, separator, content = chunk[2:].partition(b"\r\n\r\n")
        if not separator:
            raise MultipartError("a part has no blank line between its headers and its content")
        headers: dict[str, str] = {}
        for line in head.split(b"\r\n"):
            if not line.strip():
                continue
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon:
                raise MultipartError(f"a part header is malformed: {line[:60]!r}")
            headers[name.strip().lower()] = value.strip()
        if content.endswith(b"\r\n"):
            content = content[:-2]
        count += 1
        if count > max_parts:
            raise MultipartError(f"more than {max_parts} parts")
        yield Part(headers, content)
    raise MultipartError("the body does not end with the closing boundary")

