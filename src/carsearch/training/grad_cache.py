"""Accumulation with cached embeddings: the gradient of one big batch's loss, in chunks.

Plain gradient accumulation sums the gradients of each micro-batch's own loss. For the
pairwise sigmoid loss that is the big batch's loss less its cross-micro-batch pairs;
for the softmax (InfoNCE) loss it is a different loss altogether, since each row's
normaliser runs over its micro-batch's columns only. The cached form (GradCache, Gao et
al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup", 2021)
gives the exact gradient of the big batch's loss while holding only one micro-batch's
graph at a time:

1. embed every chunk without a graph (its RNG state noted, so a re-run draws the same);
2. the loss of all the embeddings together, and its gradient with respect to each
   embedding and to the scalars (temperature, bias), from a graph that starts at the
   embeddings (cheap: a (rows x columns) matrix);
3. re-run each chunk with a graph and backpropagate that chunk's slice of the embedding
   gradients (`backward(sum(<embedding, its gradient>))`); the scalars' gradients go
   through the first chunk's re-run.

The parameters' gradients are then those of the big batch's loss (up to float rounding),
as if it had been one forward and one backward. Costs: a second forward of every chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

ACCUMULATE = ("plain", "cached")  # how stage 1 accumulates micro-batches (training/stage1.py)
Chunk = TypeVar("Chunk")
Embedded = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor]]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor]]) -> None:
    torch.set_rng_state(state[0])
    if state[1]:
        torch.cuda.set_rng_state_all(state[1])


def cached_backward(
    forward: Callable[[Chunk], Embedded],
    chunks: Sequence[Chunk],
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
) -> float:
    """Accumulate into the parameters' `.grad` the gradient of `loss_fn` over all chunks.

    `forward(chunk)` returns (image embeddings (n_c, d), text embeddings (m_c, d),
    log temperature, bias) as the model computes them; `loss_fn(images, texts, t, b)`
    scores the rows of every chunk against the columns of every chunk, concatenated in
    chunk order. `backward` runs a backward pass (e.g. `accelerator.backward`). Returns
    the big batch's loss.
    """
    if not chunks:
        raise ValueError("no chunks to accumulate")
    states, images, texts = [], [], []
    scalars: tuple[torch.Tensor, torch.Tensor] | None = None
    with torch.no_grad():
        for chunk in chunks:
            states.append(_rng_state())
            image, text, scale, bias = forward(chunk)
            images.append(image.detach())
            texts.append(text.detach())
            if scalars is None:
                scalars = (scale.detach(), bias.detach())
    assert scalars is not None
    leaves = [torch.cat(images).requires_grad_(True), torch.cat(texts).requires_grad_(True),
              scalars[0].clone().requires_grad_(True), scalars[1].clone().requires_grad_(True)]
    loss = loss_fn(*leaves)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    g_image, g_text = (torch.zeros_like(leaf) if g is None else g
                       for g, leaf in zip(grads[:2], leaves[:2], strict=True))
    g_scalars = grads[2:]  # None for a scalar the loss does not use (the softmax's bias)
    after = _rng_state()
    row = col = 0
    for k, (chunk, state) in enumerate(zip(chunks, states, strict=True)):
        _set_rng_state(state)
        image, text, scale, bias = forward(chunk)
        n, m = image.shape[0], text.shape[0]
        surrogate = ((image * g_image[row:row + n]).sum()
                     + (text * g_text[col:col + m]).sum())
        if k == 0:
            for value, g in zip((scale, bias), g_scalars, strict=True):
                if g is not None:
                    surrogate = surrogate + (value * g).sum()
        backward(surrogate)
        row, col = row + n, col + m
    _set_rng_state(after)
    return float(loss.detach())
