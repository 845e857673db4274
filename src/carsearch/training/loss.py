"""SigLIP's pairwise sigmoid loss, with class-level positives.

For a batch of n image embeddings x_i and n text embeddings y_j (L2-normalised), the
logit of a pair is z_ij = exp(t) * <x_i, y_j> + b, with t the log temperature
(`logit_scale`) and b the bias (`logit_bias`). Each pair is a binary problem with label
l_ij = +1 when image i and text j show the same class, -1 otherwise; the loss is

    L = -(1 / n) * sum_ij log sigmoid(l_ij * z_ij)

(Zhai et al., "Sigmoid Loss for Language Image Pre-Training", 2023, eq. 1, normalised by
the batch size as there). Without class labels only the diagonal is positive, as in the
paper; with them, two images of one class and each other's captions are positives,
not negatives, which matters when a batch holds several images of a class.

`softmax_loss` is the alternative the trainer offers (`--loss softmax`): CLIP's symmetric
InfoNCE (Radford et al., 2021) with the same learnable temperature, z_ij = exp(t) <x_i, y_j>
(exp(t) clipped at 100 as in CLIP; the bias cancels in a softmax and is unused), and the
same class-level positives. With several positives in a row, its target is spread
uniformly over them (the soft-target cross-entropy, equal to the mean of -log p over the
row's positives, as in SupCon's "outside" form and UniCL):

    L_img = (1 / |R|) sum_{i in R} -(1 / |P_i|) sum_{j in P_i} log softmax_j(z_i.)
    L_txt = (1 / |C|) sum_{j in C} -(1 / |P^j|) sum_{i in P^j} log softmax_i(z_.j)
    L = (L_img + L_txt) / 2

with P_i the positive texts of image i, P^j the positive images of text j, and R, C the
rows and columns that have at least one positive (a class-name column whose class has no
image in the batch is a negative for every row and has no term of its own).

`feedback_loss` adds votes from the search page: (text, image) pairs whose labels are
set explicitly (+1 thumbs-up, -1 thumbs-down), weighted, on the same scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pair_labels(
    classes: torch.Tensor | None,
    n: int,
    device: torch.device,
    text_classes: torch.Tensor | None = None,
    image_colours: torch.Tensor | None = None,
    text_colours: torch.Tensor | None = None,
) -> torch.Tensor:
    """The matrix of +1 (same class, or the diagonal) and -1 (otherwise).

    (n, n) for paired images and texts; (n, m) when `text_classes` (m,) gives the classes
    of the text columns separately (texts that pair with no image of the batch). With
    `image_colours` (n,) and `text_colours` (m,) (colour ids, -1: none), a text that names
    a colour is a positive only for same-class images of that colour: the label matches
    every attribute the text names. The diagonal (a text written for its own image)
    stays positive.
    """
    if classes is None:
        if text_classes is not None:
            raise ValueError("text classes need image classes")
        same = torch.eye(n, dtype=torch.bool, device=device)
    else:
        if classes.shape != (n,):
            raise ValueError(f"classes must have shape ({n},), got {tuple(classes.shape)}")
        columns = classes if text_classes is None else text_classes
        if columns.ndim != 1:
            raise ValueError(f"text classes must be 1-d, got {tuple(columns.shape)}")
        same = classes.view(-1, 1) == columns.view(1, -1)
        if image_colours is not None and text_colours is not None:
            named = text_colours.view(1, -1) >= 0
            agree = image_colours.view(-1, 1) == text_colours.view(1, -1)
            same = same & (~named | agree)
            k = min(same.shape)
            same[torch.arange(k), torch.arange(k)] |= classes[:k] == columns[:k]
    return same.to(torch.float32) * 2.0 - 1.0


def siglip_logits(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
) -> torch.Tensor:
    """z_ij = exp(t) * <x_i, y_j> + b, rows images, columns texts."""
    return image_emb @ text_emb.t() * logit_scale.exp() + logit_bias


def siglip_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    classes: torch.Tensor | None = None,
    text_classes: torch.Tensor | None = None,
    image_colours: torch.Tensor | None = None,
    text_colours: torch.Tensor | None = None,
) -> torch.Tensor:
    """The pairwise sigmoid loss of a batch (see the module docstring).

    `image_emb` and `text_emb` are (n, d) and should be L2-normalised; `classes` is an
    (n,) integer tensor of class ids shared by image i and text i, or None for
    diagonal-only positives. With `text_classes` (m,), `text_emb` is (m, d): texts with
    their own classes (e.g. the batch's texts followed by every class name), each pair
    labelled by class. Computed in float32 whatever the input precision.
    """
    _check_shapes(image_emb, text_emb, text_classes)
    n = image_emb.shape[0]
    logits = siglip_logits(
        image_emb.float(), text_emb.float(), logit_scale.float(), logit_bias.float()
    )
    labels = pair_labels(classes, n, logits.device, text_classes, image_colours,
                         text_colours)
    return -F.logsigmoid(labels * logits).sum() / n


LOSSES = ("sigmoid", "softmax")
MAX_LOGIT_SCALE = 100.0  # CLIP's clip of exp(t)


def _check_shapes(image_emb: torch.Tensor, text_emb: torch.Tensor,
                  text_classes: torch.Tensor | None) -> None:
    if (
        image_emb.ndim != 2
        or text_emb.ndim != 2
        or image_emb.shape[1] != text_emb.shape[1]
        or (text_classes is None and image_emb.shape != text_emb.shape)
        or (text_classes is not None and text_classes.shape != text_emb.shape[:1])
    ):
        raise ValueError(
            f"embeddings must both be (n, d), got {tuple(image_emb.shape)} "
            f"and {tuple(text_emb.shape)}"
        )


def _soft_target_ce(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Mean over rows with a positive of -sum_j q_ij log softmax_j, q uniform on positives."""
    has = positive.any(dim=1)
    logp = F.log_softmax(logits[has], dim=1)
    pos = positive[has].to(logp.dtype)
    return (-(logp * pos).sum(dim=1) / pos.sum(dim=1)).mean()


def softmax_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    classes: torch.Tensor | None = None,
    text_classes: torch.Tensor | None = None,
    image_colours: torch.Tensor | None = None,
    text_colours: torch.Tensor | None = None,
) -> torch.Tensor:
    """The symmetric InfoNCE loss with class-level positives (see the module docstring).

    Arguments as for `siglip_loss` (no bias: it cancels in a softmax). Computed in float32.
    """
    _check_shapes(image_emb, text_emb, text_classes)
    n = image_emb.shape[0]
    scale = logit_scale.float().exp().clamp(max=MAX_LOGIT_SCALE)
    logits = image_emb.float() @ text_emb.float().t() * scale
    positive = pair_labels(classes, n, logits.device, text_classes, image_colours,
                           text_colours) > 0
    return (_soft_target_ce(logits, positive) + _soft_target_ce(logits.t(), positive.t())) / 2


def contrastive_loss(
    kind: str,
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    classes: torch.Tensor | None = None,
    text_classes: torch.Tensor | None = None,
    image_colours: torch.Tensor | None = None,
    text_colours: torch.Tensor | None = None,
) -> torch.Tensor:
    """`siglip_loss` ("sigmoid") or `softmax_loss` ("softmax") of a batch."""
    if kind == "sigmoid":
        return siglip_loss(image_emb, text_emb, logit_scale, logit_bias, classes,
                           text_classes, image_colours, text_colours)
    if kind == "softmax":
        return softmax_loss(image_emb, text_emb, logit_scale, classes, text_classes,
                            image_colours, text_colours)
    raise ValueError(f"loss must be one of {', '.join(LOSSES)}, not {kind!r}")


def feedback_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    labels: torch.Tensor,
    weight: float,
    n: int,
) -> torch.Tensor:
    """The sigmoid loss of feedback pairs: image k with text k, label l_k (+1 or -1).

        L_f = -(w / n) * sum_k log sigmoid(l_k * z_kk)

    with z_kk the pair's logit as in `siglip_logits` and n the batch size of the batch
    loss it is added to: each feedback pair counts as one more entry of the batch's
    pair matrix, weighted by w, whose label is set explicitly (a thumbs-down is a -1 even
    when the image's class matches the text). Only the paired entries are scored: how a
    feedback text relates to the batch's other images is not known.
    """
    if image_emb.shape != text_emb.shape or labels.shape != image_emb.shape[:1]:
        raise ValueError(
            f"feedback embeddings must both be (k, d) with k labels, got "
            f"{tuple(image_emb.shape)}, {tuple(text_emb.shape)} and {tuple(labels.shape)}"
        )
    if n < 1:
        raise ValueError("n must be at least 1")
    z = (image_emb.float() * text_emb.float()).sum(-1) * logit_scale.float().exp()
    z = z + logit_bias.float()
    return -F.logsigmoid(labels.to(z.dtype) * z).sum() * (weight / n)
