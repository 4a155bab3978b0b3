import numpy as np
import pytest
import torch

from segsearch.spml.colour import lab_code, pooled_lab_code, rgb_to_lab


def _image(*colours, side=8):
    """(1, 3, side, side * len(colours)) image of vertical bands of the given RGB colours."""
    bands = [torch.tensor(c, dtype=torch.float32).view(3, 1, 1).expand(3, side, side) for c in colours]
    return torch.cat(bands, dim=2)[None]


@pytest.mark.parametrize("rgb, lab", [((255, 255, 255), (100.0, 0.0, 0.0)), ((0, 0, 0), (0.0, 0.0, 0.0)),
                                      ((255, 0, 0), (53.24, 80.09, 67.20)), ((0, 0, 255), (32.30, 79.19, -107.86))])
def test_rgb_to_lab_matches_reference_values(rgb, lab):
    # reference values: CIE L*a*b* (D65) of the sRGB primaries, as published for sRGB
    assert rgb_to_lab(_image(rgb, side=1))[0, :, 0, 0].tolist() == pytest.approx(lab, abs=0.05)


def test_code_is_unit_norm_and_peaks_at_the_pixels_bin():
    code = lab_code(_image((255, 255, 255), (128, 128, 128)), bins=5)
    assert code.shape == (1, 125, 8, 16)
    assert torch.allclose(code.norm(dim=1), torch.ones(1, 8, 16), atol=1e-5)
    # white: L at the top bin, a and b at the centre bin (a, b in [-60, 60]); L-major order
    assert int(code[0, :, 0, 0].argmax()) == (4 * 5 + 2) * 5 + 2


def test_mean_code_is_a_histogram_near_colours_closer_than_far():
    red, dark_red, green = (200, 30, 30), (170, 40, 40), (30, 180, 40)
    def segment_code(*colours):
        mean = lab_code(_image(*colours), bins=6).mean(dim=(2, 3))[0]
        return mean / mean.norm()
    reds, mixed = segment_code(red, dark_red), segment_code(red, green)
    assert float(reds @ segment_code(red)) > float(mixed @ segment_code(red))
    assert float(segment_code(red) @ segment_code(dark_red)) > float(segment_code(red) @ segment_code(green)) + 0.3
    # a two-colour segment is equally like both halves: the mean holds both
    assert float(mixed @ segment_code(red)) == pytest.approx(float(mixed @ segment_code(green)), abs=0.05)


def test_pooled_code_covers_partial_cells_and_stays_unit():
    pooled = pooled_lab_code(torch.rand(2, 3, 10, 13) * 255, bins=4, stride=4)
    assert pooled.shape == (2, 64, 3, 4)
    assert np.allclose(pooled.norm(dim=1).numpy(), 1, atol=1e-5)


def test_too_few_bins_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        lab_code(torch.zeros(1, 3, 2, 2), bins=1)
