import torch

from segsearch.trainer.cam import cam_pseudo_labels

IGNORE = 255


def _synthetic(num_images=40, classes=4, channels=16, size=8, seed=0):
    """Each image: left half class a, right half class b; a class's pixels carry its own
    feature direction, so a linear CAM can localise it from image tags alone."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(classes, channels, generator=generator) * 3
    masks = torch.zeros(num_images, size, size, dtype=torch.long)
    for i in range(num_images):
        a, b = torch.randperm(classes, generator=generator)[:2]
        masks[i, :, : size // 2], masks[i, :, size // 2 :] = a, b
    features = directions[masks].permute(0, 3, 1, 2) + torch.randn(num_images, channels, size, size,
                                                                   generator=generator)
    tags = torch.zeros(num_images, classes, dtype=torch.bool)
    for i in range(num_images):
        tags[i, masks[i].unique()] = True
    return features, tags, masks


def test_cam_localises_tagged_classes_without_pixel_labels():
    features, tags, masks = _synthetic()
    labels = cam_pseudo_labels(features, tags, background_class=None, threshold=0.2)
    labelled = labels != IGNORE
    assert labelled.float().mean() > 0.5
    assert (labels[labelled] == masks[labelled]).float().mean() > 0.9


def test_pseudo_labels_never_name_a_class_the_image_is_not_tagged_with():
    features, tags, _ = _synthetic(seed=1)
    labels = cam_pseudo_labels(features, tags, background_class=None)
    for i in range(len(labels)):
        present = labels[i][labels[i] != IGNORE].unique()
        assert tags[i, present].all()


def test_padding_is_never_labelled_and_does_not_shift_the_classifier():
    features, tags, masks = _synthetic(seed=2)
    background = torch.zeros(len(tags), 1, dtype=torch.bool)
    tags = torch.cat([background, tags], dim=1)  # class 0 = background, present nowhere
    valid = torch.ones(features.shape[0], 8, 8, dtype=torch.bool)
    valid[:, 6:, :] = False
    padded = features.clone()
    padded[:, :, 6:, :] = 50.0  # padding features far from every class direction
    labels = cam_pseudo_labels(padded, tags, background_class=0, valid=valid)
    assert (labels[~valid] == IGNORE).all()
    assert (labels[valid] != IGNORE).all()  # with a background class every real pixel is labelled
    clean = cam_pseudo_labels(features, tags, background_class=0, valid=valid)
    agree = (labels[valid] == clean[valid]).float().mean()
    assert agree > 0.95


def test_the_bias_is_inside_the_relu(monkeypatch):
    """One image, one feature channel f = [2, 1, -1, -2]; both classes tagged.
    class 0: w = 1, b = -1 -> relu(f - 1) = [1, 0, 0, 0], normalised [1, 0, 0, 0];
    class 1: w = -1, b = 0 -> relu(-f) = [0, 0, 1, 2], normalised [0, 0, .5, 1].
    Pixel 1 scores 0 for both, below the 0.2 threshold: unlabelled. With the bias outside
    the ReLU (relu(w f) + relu(b)) class 0 would be [2, 1, 0, 0] -> [1, .5, 0, 0] and pixel 1
    would wrongly become class 0."""
    import segsearch.trainer.cam as cam

    classifier = torch.nn.Linear(1, 2)
    with torch.no_grad():
        classifier.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        classifier.bias.copy_(torch.tensor([-1.0, 0.0]))
    monkeypatch.setattr(cam, "train_tag_classifier", lambda *args, **kwargs: classifier)
    features = torch.tensor([2.0, 1.0, -1.0, -2.0]).view(1, 1, 1, 4)
    tags = torch.tensor([[True, True]])
    labels = cam.cam_pseudo_labels(features, tags, background_class=None, threshold=0.2)
    assert labels.tolist() == [[[0, IGNORE, 1, 1]]]
    maps = cam.class_activation_maps(features, classifier)
    assert maps[0, :, 0].tolist() == [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 2.0]]


def _fixed_classifier(monkeypatch, weight, bias):
    import segsearch.trainer.cam as cam

    classifier = torch.nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        classifier.weight.copy_(torch.tensor(weight))
        classifier.bias.copy_(torch.tensor(bias))
    monkeypatch.setattr(cam, "train_tag_classifier", lambda *args, **kwargs: classifier)
    return cam


def test_box_cam_keeps_only_pixels_above_half_the_in_box_peak(monkeypatch):
    """One 4x4 image at stride 1, one feature channel; class 0 background, class 1 boxed in
    columns 0-1 (box (1, 0, 0, 2, 4)). CAM of class 1 = relu(f):
        f = [[4, 1, 9, 9],      in-box CAM / in-box peak 4: [[1, .25], [.5, .75], [0, .5], [.25, 0]]
             [2, 3, 9, 9],      -> class 1 where >= .5, unlabelled elsewhere in the box;
             [0, 2, 9, 9],      the 9s outside the box do not set the peak; outside -> 0.
             [1, 0, 9, 9]]      Last row is padding -> unlabelled whatever it holds."""
    cam = _fixed_classifier(monkeypatch, [[0.0], [1.0]], [0.0, 0.0])
    features = torch.tensor([[4, 1, 9, 9], [2, 3, 9, 9], [0, 2, 9, 9], [1, 0, 9, 9]], dtype=torch.float)
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    valid[0, 3] = False
    tags = torch.tensor([[True, True]])
    labels = cam.box_cam_labels(features.view(1, 1, 4, 4), tags, [[(1, 0, 0, 2, 4)]], background_class=0,
                                stride=1, valid=valid)
    assert labels[0].tolist() == [
        [1, IGNORE, 0, 0],
        [1, 1, 0, 0],
        [IGNORE, 1, 0, 0],
        [IGNORE, IGNORE, IGNORE, IGNORE],
    ]


def test_box_cam_at_stride_and_nested_boxes(monkeypatch):
    """8x8 image pixels -> 2x2 cells at stride 4; two classes (no background). Box A (class 0)
    covers everything, box B (class 1) the top-left pixel block [0, 3) x [0, 3), i.e. cell
    (0, 0). Class 0's CAM peaks in cell (1, 1); class 1's CAM is 1 in cell (0, 0). The small box
    has the last word in its cell; cells of A below half A's peak stay unlabelled."""
    cam = _fixed_classifier(monkeypatch, [[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0])
    features = torch.zeros(1, 2, 2, 2)
    features[0, 0] = torch.tensor([[0.9, 0.2], [0.6, 1.0]])
    features[0, 1, 0, 0] = 1.0
    tags = torch.tensor([[True, True]])
    boxes = [[(0, 0, 0, 8, 8), (1, 0, 0, 3, 3)]]
    labels = cam.box_cam_labels(features, tags, boxes, background_class=None, stride=4)
    assert labels[0].tolist() == [[1, IGNORE], [0, 0]]


def test_smoothing_averages_over_the_window_and_keeps_the_size():
    import segsearch.trainer.cam as cam

    spike = torch.zeros(1, 1, 5, 5)
    spike[0, 0, 2, 2] = 9.0
    smooth = cam.smooth_cams(spike, 3)
    assert smooth.shape == spike.shape
    assert torch.allclose(smooth[0, 0, 1:4, 1:4], torch.ones(3, 3))  # 9 / 9 cells
    assert smooth[0, 0, 0, 0] == 0
    corner = torch.zeros(1, 1, 5, 5)
    corner[0, 0, 0, 0] = 9.0
    assert torch.allclose(cam.smooth_cams(corner, 3)[0, 0, 0, 0], torch.tensor(9.0 / 4))  # 4 cells inside
    assert cam.smooth_cams(spike, 1) is spike
