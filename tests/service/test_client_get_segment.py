"""SegsearchClient.get_segment with and without the stored prototype, against a real server."""
from __future__ import annotations

import numpy as np

from segsearch.indexer.index_store import IndexStore
from service_helpers import PHOTO


def _a_stored_segment(index_template):
    with IndexStore.open(index_template, read_only=True) as store:
        return store.get_segment(store.get_image(PHOTO).segment_ids[3])


def test_get_segment_returns_the_stored_prototype_only_when_asked(served, index_template):
    stored = _a_stored_segment(index_template)
    plain = served.client.get_segment(stored.segment_id)
    assert len(plain.prototype) == 0
    with_prototype = served.client.get_segment(stored.segment_id, include_prototype=True)
    assert with_prototype.mask_png == plain.mask_png
    np.testing.assert_allclose(np.asarray(with_prototype.prototype, dtype=np.float32), stored.prototype, atol=1e-6)
