"""The image id rule shared by corpora and IndexImages."""
import pytest

from segsearch.indexer.image_ids import MAX_IMAGE_ID_BYTES, image_id_problem


@pytest.mark.parametrize("image_id", ["IMG_0001.jpg", "cam1/IMG_0001.jpg", "/abs/path.png", "ünï cödé.png",
                                      "sha256:0123abcd", "a" * MAX_IMAGE_ID_BYTES])
def test_usable_ids(image_id):
    assert image_id_problem(image_id) is None


@pytest.mark.parametrize("image_id, why", [
    ("", "non-empty"), ("nul\x00", "control characters"), ("two\nlines", "control characters"),
    ("tab\there", "control characters"), (" lead", "white space"), ("trail ", "white space"),
    ("a/../b", "'..'"), ("./a", "'.'"), ("é" * 251, "502 bytes"), ("\ud800", "control characters"),
])
def test_unusable_ids_say_why(image_id, why):
    assert why in image_id_problem(image_id)
