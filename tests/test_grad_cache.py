"""Cached-embedding accumulation (GradCache): the big batch's gradient, in chunks.

A small two-tower model (a linear image projection; a token-embedding text tower with
dropout, so the re-run must redraw the same masks) and a batch of 6 with repeated
classes and class-name columns: the parameters' gradients after `cached_backward` over
3 chunks of 2 equal those of one forward and backward of the whole batch, for both
losses; plain accumulation does not (the softmax's normalisers are the chunks').
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from carsearch.training.grad_cache import cached_backward
from carsearch.training.loss import contrastive_loss

CLASSES = [0, 1, 0, 2, 1, 0]
NAMES = [[7], [8], [9]]  # class-name "token ids" of classes 0, 1, 2


class Towers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.image = nn.Linear(5, 4)
        self.tokens = nn.Embedding(10, 4)
        self.drop = nn.Dropout(0.3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(5.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-2.0))

    def forward(self, features: torch.Tensor, ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        image = F.normalize(self.image(features), dim=-1)
        text = F.normalize(self.drop(self.tokens(ids)).mean(dim=1), dim=-1)
        return image, text, self.logit_scale, self.logit_bias


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 5, generator=g), torch.randint(0, 7, (6, 3), generator=g)


def _loss(kind: str, classes: Sequence[int], with_names: bool):  # type: ignore[no-untyped-def]
    rows = torch.tensor(classes)
    columns = torch.cat([rows, torch.arange(3)]) if with_names else rows

    def fn(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
           bias: torch.Tensor) -> torch.Tensor:
        return contrastive_loss(kind, image, text, scale, bias, rows, text_classes=columns)

    return fn


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
@pytest.mark.parametrize("with_names", [False, True])
def test_cached_accumulation_gives_the_big_batch_gradient(kind: str, with_names: bool) -> None:
    feats, ids = _batch()
    names = torch.tensor(NAMES).repeat(1, 3)
    whole_ids = torch.cat([ids, names]) if with_names else ids
    model = Towers()
    model.train()
    model.drop.p = 0.0  # dropout's re-draw: the next test

    def forward(k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        part = ids[2 * k:2 * k + 2]
        if with_names and k == 2:
            part = torch.cat([part, names])
        return model(feats[2 * k:2 * k + 2], part)

    image, text, scale, bias = model(feats, whole_ids)
    _loss(kind, CLASSES, with_names)(image, text, scale, bias).backward()
    expected = _grads(model)
    model.zero_grad()
    got_loss = cached_backward(forward, range(3), _loss(kind, CLASSES, with_names))
    got = _grads(model)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
    assert got_loss == pytest.approx(float(_loss(kind, CLASSES, with_names)(
        image.detach(), text.detach(), scale.detach(), bias.detach())), rel=1e-6)
    if kind == "softmax":  # the bias cancels: no gradient, as in one big batch
        assert "logit_bias" not in got

    # Plain accumulation (the mean of the chunks' own losses) is another gradient.
    model.zero_grad()
    for k in range(3):
        image, text, scale, bias = forward(k)
        rows = CLASSES[2 * k:2 * k + 2]
        cols = torch.tensor(rows + ([0, 1, 2] if with_names and k == 2 else []))
        (contrastive_loss(kind, image, text, scale, bias, torch.tensor(rows),
                          text_classes=cols) / 3).backward()
    plain = _grads(model)
    assert not torch.allclose(plain["image.weight"], expected["image.weight"], atol=1e-4)


def test_the_rerun_draws_the_same_dropout_masks() -> None:
    """With dropout on, the cached gradient is that of the embeddings the first pass drew:
    the same as a big batch made of the chunks' forwards with those RNG states."""
    feats, ids = _batch()
    model = Towers()
    model.train()
    kind = "softmax"

    def forward(k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return model(feats[2 * k:2 * k + 2], ids[2 * k:2 * k + 2])

    torch.manual_seed(11)
    outs = [forward(k) for k in range(3)]  # one graph per chunk, the same draws in order
    image = torch.cat([o[0] for o in outs])
    text = torch.cat([o[1] for o in outs])
    _loss(kind, CLASSES, False)(image, text, outs[0][2], outs[0][3]).backward()
    expected = _grads(model)
    model.zero_grad()
    torch.manual_seed(11)
    cached_backward(forward, range(3), _loss(kind, CLASSES, False))
    got = _grads(model)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
    # and the global RNG goes on from after the first pass, not from the re-runs
    torch.manual_seed(11)
    for k in range(3):
        forward(k)
    after_first_pass = torch.rand(1)
    torch.manual_seed(11)
    cached_backward(forward, range(3), _loss(kind, CLASSES, False))
    assert torch.equal(torch.rand(1), after_first_pass)


def test_no_chunks_is_an_error() -> None:
    with pytest.raises(ValueError, match="no chunks"):
        cached_backward(lambda k: (torch.zeros(1),) * 4, [], lambda *a: torch.zeros(()))
