"""The SigLIP pairwise sigmoid loss against a brute-force double loop."""

from __future__ import annotations

import math

import pytest
import torch

from carsearch.training.loss import pair_labels, siglip_loss


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
