"""What a client learns of where an image lives (`image_uri` in hits and segment records).

The index records each corpus image's absolute path (the indexer reads it from there, and its
identity rule compares it). Showing that path to every client tells them the server's file
layout, so by default a client gets the path relative to the image's corpus root instead,
which is its image id when the image came from a folder (`segsearch index DIR`: the id is the
path under DIR). Policies (`segsearch serve --image-uris`):

- `relative` (default): a local absolute path becomes the part under its corpus root (the
  image id when the path ends with it, else the file name); any other uri (one a client sent
  with IndexImages, a `file://` or remote uri) is shown as recorded;
- `absolute`: as recorded;
- `none`: empty.
"""
from __future__ import annotations

import posixpath

from segsearch.indexer.records import ImageRecord




def shown_uri(image: ImageRecord | None, policy: str) -> str:
    if image is None or policy == "none":
        return ""
    uri = image.uri
    if policy == "absolute" or not uri.startswith("/"):
        return uri
    if uri.endswith("/" + image.image_id):
        return image.image_id
    return posixpath.basename(uri)
