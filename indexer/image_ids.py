"""What an image id may be: the one rule for the indexer's corpora and the service's writes.

An id is how a user names an image later (`index delete --image-id`, DeleteImages, hits), so
it must survive a command line, a log line and a JSON report unchanged: printable characters
only (no NUL, newline or other control characters), no surrounding spaces, at most
MAX_IMAGE_ID_BYTES of UTF-8 (the LMDB key limit), and, since ids are usually paths, no "." or
".." segments that would make two spellings of one name (`a/./b`, `a/x/../b`). An id is a
name, never a path anything opens: absolute paths are allowed (a manifest's default id is its
uri as written).
"""
from __future__ import annotations

MAX_IMAGE_ID_BYTES = 500


def image_id_problem(image_id: str) -> str | None:
    """Why `image_id` cannot be used, or None when it can."""
    if not isinstance(image_id, str) or not image_id:
        return "an image id must be a non-empty string"
    size = len(image_id.encode("utf-8", errors="surrogatepass"))
    if size > MAX_IMAGE_ID_BYTES:
        return f"it has {size} bytes of UTF-8; at most {MAX_IMAGE_ID_BYTES} are allowed"
    if not image_id.isprintable():
        return "it contains control characters (such as NUL or a newline); use printable characters only"
    if image_id != image_id.strip():
        return "it starts or ends with white space"
    if any(part in (".", "..") for part in image_id.split("/")):
        return "it has a '.' or '..' path segment"
    return None
