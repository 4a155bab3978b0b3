"""What clients see of where an image lives (`--image-uris`)."""
import pytest

from segsearch.indexer.records import ImageRecord
from segsearch.service.uris import shown_uri


def _image(image_id: str, uri: str) -> ImageRecord:
    return ImageRecord(image_id, uri, 4, 3, "0" * 64)


@pytest.mark.parametrize("image_id, uri, relative", [
    ("cats/a.jpg", "/srv/corpus/cats/a.jpg", "cats/a.jpg"),          # a folder corpus: the id is the path under it
    ("custom-id", "/srv/manifests/photos/b.png", "b.png"),          # a manifest id: the file name only
    ("sent", "file:///client/side/c.png", "file:///client/side/c.png"),  # a client's own uri: as sent
    ("none", "", ""),
])
def test_relative_hides_the_server_layout(image_id, uri, relative):
    image = _image(image_id, uri)
    assert shown_uri(image, "relative") == relative
    assert shown_uri(image, "absolute") == uri
    assert shown_uri(image, "none") == "" and shown_uri(None, "relative") == ""
