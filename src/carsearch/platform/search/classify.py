"""Zero-shot classification with SigLIP's own calibration.

SigLIP is trained with a pairwise sigmoid loss, so an (image, text) pair has a
probability of its own, independent of the other labels:

    p(label | image) = sigmoid(exp(logit_scale) * cos(image, text(label)) + logit_bias)

where ``text(label)`` is the prompt template filled with the label ("a photo of a {}.")
and both vectors are L2-normalised. The probabilities of several labels need not sum to
one: an image can be both "a car" and "red", or none of the labels. The same
probability of a search hit (the query text against the hit's image) is a relevance
cut-off that means the same thing for every query (`SearchService.search_text`'s
``min_prob``), where a raw cosine does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from carsearch.platform.errors import QueryError
from carsearch.platform.models.encoder import Encoder

DEFAULT_TEMPLATE = "a photo of a {}."
MAX_LABELS = 100
MAX_LABEL_CHARS = 100


@dataclass(frozen=True)
class LabelScore:
    """One label's probability for one image (its calibration is measured, not assumed:
    `platform.metrics.reliability`), with its parts."""

    label: str
    probability: float
    cosine: float
    logit: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_labels(labels: str | Sequence[str]) -> list[str]:
    """"sedan, pickup,suv" (or a list) -> ["sedan", "pickup", "suv"]: stripped, blanks and
    repeats dropped; QueryError when none is left or there are too many."""
    items = labels.split(",") if isinstance(labels, str) else list(labels)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise QueryError(f"a label is text, not {type(item).__name__}")
        text = " ".join(item.split())
        if any(0xD800 <= ord(c) <= 0xDFFF or ord(c) < 32 for c in text):
            raise QueryError("a label holds characters that are not text")
        if len(text) > MAX_LABEL_CHARS:
            raise QueryError(f"label too long ({len(text)} characters; at most "
                             f"{MAX_LABEL_CHARS}): {text[:40]}...")
        if text and text not in out:
            out.append(text)
    if not out:
        raise QueryError("give at least one label, e.g. --labels \"sedan,pickup,suv\"")
    if len(out) > MAX_LABELS:
        raise QueryError(f"{len(out)} labels; at most {MAX_LABELS}")
    return out


def check_template(template: str) -> str:
    """A prompt template with exactly one ``{}`` where the label goes."""
    if not isinstance(template, str) or template.count("{}") != 1 or (
            template.replace("{}", "").count("{") or template.replace("{}", "").count("}")):
        raise QueryError(f"the template needs exactly one {{}} for the label and no other "
                         f"braces, e.g. {DEFAULT_TEMPLATE!r}; got {template!r}"[:200])
    return template


def pair_logits(cosine: np.ndarray | float, logit_scale: float, logit_bias: float
                ) -> np.ndarray:
    """SigLIP's pair logits, exp(logit_scale) * cos + logit_bias (any shape)."""
    return np.asarray(cosine, dtype=np.float64) * np.exp(logit_scale) + logit_bias


def probability(cosine: np.ndarray | float, logit_scale: float, logit_bias: float
                ) -> np.ndarray:
    """SigLIP's pair probability from cosine similarities (any shape); the logistic
    without overflow for very negative logits."""
    return _logistic(pair_logits(cosine, logit_scale, logit_bias))


def _logistic(logits: np.ndarray) -> np.ndarray:
    from scipy.special import expit

    return np.asarray(expit(logits))


def classify_vectors(
    encoder: Encoder, image_vectors: np.ndarray, labels: str | Sequence[str],
    template: str = DEFAULT_TEMPLATE,
) -> list[list[LabelScore]]:
    """Per image, every label's probability, most probable first."""
    names = parse_labels(labels)
    prompts = [check_template(template).replace("{}", name) for name in names]
    text = encoder.encode_text(prompts)
    cos = np.asarray(image_vectors, dtype=np.float32) @ text.T
    logits = pair_logits(cos, encoder.logit_scale, encoder.logit_bias)
    probs = _logistic(logits)
    out: list[list[LabelScore]] = []
    for i in range(len(cos)):
        row = [LabelScore(names[j], round(float(probs[i, j]), 6), round(float(cos[i, j]), 6),
                          round(float(logits[i, j]), 4)) for j in range(len(names))]
        row.sort(key=lambda s: -s.probability)
        out.append(row)
    return out
