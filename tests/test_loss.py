"""The SigLIP pairwise sigmoid loss against a brute-force double loop."""

from __future__ import annotations

import math

import pytest
import torch

from carsearch.training.loss import contrastive_loss, pair_labels, siglip_loss, softmax_loss


def brute_force_loss(
    img: torch.Tensor, txt: torch.Tensor, t: float, b: float, classes: list[int] | None
) -> float:
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            dot = sum(float(img[i, k]) * float(txt[j, k]) for k in range(img.shape[1]))
            z = math.exp(t) * dot + b
            positive = (i == j) if classes is None else classes[i] == classes[j]
            label = 1.0 if positive else -1.0
            total += -math.log(1.0 / (1.0 + math.exp(-label * z)))
    return total / n


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)


@pytest.mark.parametrize("classes", [None, [0, 1, 2, 3, 4, 5], [0, 1, 0, 2, 1, 0]])
@pytest.mark.parametrize(("t", "b"), [(math.log(10.0), -10.0), (0.0, 0.0), (2.0, 1.5)])
def test_loss_matches_brute_force(classes: list[int] | None, t: float, b: float) -> None:
    img, txt = _unit(6, 5, 1), _unit(6, 5, 2)
    cls = None if classes is None else torch.tensor(classes)
    got = siglip_loss(img, txt, torch.tensor(t), torch.tensor(b), cls)
    assert float(got) == pytest.approx(brute_force_loss(img, txt, t, b, classes), rel=1e-5)


def test_same_class_pairs_are_positives_not_negatives() -> None:
    # Two images of one class with identical texts: with class labels the off-diagonal
    # pairs are positives, so aligning them lowers the loss instead of raising it.
    img = _unit(2, 4, 3)
    txt = img.clone()
    t, b = torch.tensor(math.log(10.0)), torch.tensor(-5.0)
    txt_same = torch.stack([img[0], img[0]])
    img_same = torch.stack([img[0], img[0]])
    with_classes = siglip_loss(img_same, txt_same, t, b, torch.tensor([7, 7]))
    diagonal_only = siglip_loss(img_same, txt_same, t, b)
    assert float(with_classes) < float(diagonal_only)
    assert pair_labels(torch.tensor([7, 7, 3]), 3, torch.device("cpu")).tolist() == [
        [1.0, 1.0, -1.0], [1.0, 1.0, -1.0], [-1.0, -1.0, 1.0],
    ]
    assert siglip_loss(img, txt, t, b).item() > 0


def test_gradients_reach_scalars_and_embeddings() -> None:
    img = _unit(4, 3, 5).requires_grad_(True)
    txt = _unit(4, 3, 6).requires_grad_(True)
    t = torch.tensor(1.0, requires_grad=True)
    b = torch.tensor(-2.0, requires_grad=True)
    siglip_loss(img, txt, t, b, torch.tensor([0, 0, 1, 2])).backward()
    for tensor in (img, txt, t, b):
        assert tensor.grad is not None and bool(tensor.grad.abs().sum() > 0)


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="embeddings"):
        siglip_loss(torch.zeros(3, 2), torch.zeros(2, 2), torch.tensor(0.0), torch.tensor(0.0))
    with pytest.raises(ValueError, match="classes"):
        siglip_loss(torch.zeros(3, 2), torch.zeros(3, 2), torch.tensor(0.0), torch.tensor(0.0),
                    torch.tensor([1, 2]))


def test_rectangular_loss_with_text_classes_matches_brute_force() -> None:
    # Images against their paired texts followed by one text per class (class names):
    # every pair is labelled by class, the loss normalised by the number of images.
    img, txt = _unit(4, 5, 7), _unit(7, 5, 8)
    classes, text_classes = [0, 1, 1, 2], [0, 1, 1, 2, 0, 1, 2]
    t, b = 1.5, -2.0
    expected = 0.0
    for i in range(4):
        for j in range(7):
            z = math.exp(t) * float(img[i] @ txt[j]) + b
            label = 1.0 if classes[i] == text_classes[j] else -1.0
            expected += -math.log(1.0 / (1.0 + math.exp(-label * z)))
    got = siglip_loss(img, txt, torch.tensor(t), torch.tensor(b), torch.tensor(classes),
                      text_classes=torch.tensor(text_classes))
    assert float(got) == pytest.approx(expected / 4, rel=1e-5)
    with pytest.raises(ValueError, match="embeddings"):
        siglip_loss(img, txt, torch.tensor(t), torch.tensor(b), torch.tensor(classes),
                    text_classes=torch.tensor([0, 1]))


# -- hand-computed cases of both losses (the values worked out on paper, not by the code) --

E = math.e


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_sigmoid_loss_hand_computed() -> None:
    # x = y = the 2-d unit vectors; exp(t) = 2, b = -1: diagonal z = 2 - 1 = 1 (label +1),
    # off-diagonal z = 0 - 1 = -1 (label -1): every one of the 4 pairs costs
    # -log sigmoid(1) = log(1 + 1/e); the sum over the batch of 2 is 4 log(1 + 1/e) / 2.
    eye = _t([[1, 0], [0, 1]])
    got = siglip_loss(eye, eye, torch.tensor(math.log(2.0)), torch.tensor(-1.0))
    assert float(got) == pytest.approx(2 * math.log(1 + 1 / E), rel=1e-6)
    # one class, all four pairs positives, exp(t) = 1, b = 0, identical unit vectors: z = 1
    # for every pair, so again 4 log(1 + 1/e) / 2, where diagonal-only labels would make
    # the two off-diagonal pairs cost -log sigmoid(-1) = log(1 + e) each.
    same = _t([[1, 0], [1, 0]])
    zero = torch.tensor(0.0)
    assert float(siglip_loss(same, same, zero, zero, torch.tensor([4, 4]))) == pytest.approx(
        2 * math.log(1 + 1 / E), rel=1e-6)
    assert float(siglip_loss(same, same, zero, zero)) == pytest.approx(
        math.log(1 + 1 / E) + math.log(1 + E), rel=1e-6)


def test_softmax_loss_hand_computed_diagonal() -> None:
    # exp(t) = 2, x = y = unit vectors: logits 2 I. Each row and column: the positive has
    # p = e^2 / (e^2 + 1), so every term is log(1 + e^-2); the bias plays no part.
    eye = _t([[1, 0], [0, 1]])
    expected = math.log(1 + E ** -2)
    for bias in (0.0, -10.0):
        got = softmax_loss(eye, eye, torch.tensor(math.log(2.0)))
        assert float(got) == pytest.approx(expected, rel=1e-6)
        got = contrastive_loss("softmax", eye, eye, torch.tensor(math.log(2.0)),
                               torch.tensor(bias))
        assert float(got) == pytest.approx(expected, rel=1e-6)


def test_softmax_loss_hand_computed_multi_positive() -> None:
    # classes [0, 0, 1]; images = texts = (1,0), (1,0), (0,1); exp(t) = 1.
    # Rows 1, 2: logits [1, 1, 0], positives texts 1 and 2, each p = e / (2e + 1); the
    # target spread uniformly over them gives -log p = log(2e + 1) - 1.
    # Row 3: logits [0, 0, 1], one positive, p = e / (e + 2): log(e + 2) - 1.
    # The matrix is symmetric, so the text-to-image half is the same.
    x = _t([[1, 0], [1, 0], [0, 1]])
    row = (2 * (math.log(2 * E + 1) - 1) + (math.log(E + 2) - 1)) / 3
    got = softmax_loss(x, x, torch.tensor(0.0), torch.tensor([0, 0, 1]))
    assert float(got) == pytest.approx(row, rel=1e-6)
    # Texts (1,0), (0.5,0), (0,1) against the same images, classes [0, 0, 1]:
    y = _t([[1, 0], [0.5, 0], [0, 1]])
    # rows 1 and 2 (both images (1,0)) have logits [1, 0.5, 0] and two positives:
    # -(1/2)[(1 - L) + (0.5 - L)] with L = log(e + e^0.5 + 1)
    big = math.log(E + E ** 0.5 + 1)
    rows12 = -0.5 * ((1 - big) + (0.5 - big))
    row3 = math.log(E + 2) - 1  # logits [0, 0, 1]
    # columns: text 1 sees images [1, 1, 0], both positive: log(2e + 1) - 1;
    # text 2 sees [0.5, 0.5, 0]: log(2 e^.5 + 1) - 0.5; text 3 sees [0, 0, 1]: log(e + 2) - 1
    col = ((math.log(2 * E + 1) - 1) + (math.log(2 * E ** 0.5 + 1) - 0.5)
           + (math.log(E + 2) - 1)) / 3
    expected = ((2 * rows12 + row3) / 3 + col) / 2
    got = softmax_loss(x, y, torch.tensor(0.0), torch.tensor([0, 0, 1]))
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # Two different images of one class, texts = images = the unit vectors, exp(t) = 1:
    # logits I. With the class, both texts are positives of each row: -(1/2)[(1 - L) +
    # (0 - L)] = L - 1/2, L = log(e + 1), and the same for every column; diagonal-only
    # positives cost -(1 - L) = L - 1 instead.
    eye = _t([[1, 0], [0, 1]])
    zero = torch.tensor(0.0)
    assert float(softmax_loss(eye, eye, zero, torch.tensor([5, 5]))) == pytest.approx(
        math.log(E + 1) - 0.5, rel=1e-6)
    assert float(softmax_loss(eye, eye, zero)) == pytest.approx(math.log(E + 1) - 1, rel=1e-6)


def test_softmax_loss_hand_computed_class_name_column_without_image() -> None:
    # Two images (classes 0, 1), their texts, and a class-name column of class 2, which no
    # image of the batch has: a negative in every row, and no text-to-image term of its own.
    # images (1,0), (0,1); texts (1,0), (0,1), (0,0); exp(t) = 1.
    # rows: logits [1, 0, 0] and [0, 1, 0]: log(e + 2) - 1 each.
    # columns 1, 2: images [1, 0] / [0, 1]: log(e + 1) - 1 each; column 3 left out.
    img = _t([[1, 0], [0, 1]])
    txt = _t([[1, 0], [0, 1], [0, 0]])
    got = softmax_loss(img, txt, torch.tensor(0.0), torch.tensor([0, 1]),
                       text_classes=torch.tensor([0, 1, 2]))
    expected = ((math.log(E + 2) - 1) + (math.log(E + 1) - 1)) / 2
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_softmax_temperature_is_learnable_and_clipped() -> None:
    img, txt = _unit(4, 3, 9), _unit(4, 3, 10)
    t = torch.tensor(1.0, requires_grad=True)
    softmax_loss(img, txt, t, torch.tensor([0, 1, 1, 2])).backward()
    assert t.grad is not None and float(t.grad) != 0.0
    # exp(t) above 100 is clipped as in CLIP: t = 10 scores as t = log(100)
    high = softmax_loss(img, txt, torch.tensor(10.0))
    at_clip = softmax_loss(img, txt, torch.tensor(math.log(100.0)))
    assert float(high) == pytest.approx(float(at_clip), rel=1e-6)


def test_unknown_loss_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="sigmoid, softmax"):
        contrastive_loss("hinge", torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor(0.0),
                         torch.tensor(0.0))
