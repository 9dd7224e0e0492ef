"""Path converters shared by the URL maps."""

from django.urls import register_converter


class _Text:
    """A path segment kept as text; subclasses give its pattern."""

    regex = ""

    def to_python(self, value: str) -> str:
        return value

    def to_url(self, value: str) -> str:
        return value


class UidConverter(_Text):
    """A DICOM UID (PS3.5 9.1): digits and dots, at most 64 characters."""

    regex = r"[0-9.]{1,64}"


class FrameListConverter(_Text):
    """Frame numbers separated by commas (PS3.18 10.4.1.1.3)."""

    regex = r"[0-9]+(?:,[0-9]+)*"


class TagConverter(_Text):
    """A tag as 8 hex digits."""

    regex = r"[0-9A-Fa-f]{8}"


register_converter(UidConverter, "uid")
register_converter(FrameListConverter, "frames")
register_converter(TagConverter, "tag")
