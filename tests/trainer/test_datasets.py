import numpy as np

from segsearch.trainer.datasets import _fit_square
from segsearch.trainer.sample import IGNORE_INDEX, Sample


def test_padding_is_marked_invalid_not_just_unlabelled():
    image = np.full((20, 40, 3), 200, dtype=np.uint8)
    mask = np.zeros((20, 40), dtype=np.int64)
    mask[5, 5] = IGNORE_INDEX  # a void pixel inside the image stays valid
    fitted = _fit_square(Sample(image, mask, "wide"), 16)
    assert fitted.valid.shape == (16, 16)
    assert fitted.valid[:8].all() and not fitted.valid[8:].any()  # 20x40 -> 8x16, then padding
    assert (fitted.mask[8:] == IGNORE_INDEX).all() and (fitted.image[8:] == 0).all()
    assert Sample(image, mask, "plain").valid_mask().all()
