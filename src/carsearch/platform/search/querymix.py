"""Query vectors built from several parts: an image and a text, negated concepts,
and in-session feedback (Rocchio). Every input and output is L2-normalised float32
of shape (1, dim)."""

from __future__ import annotations

import numpy as np


def normalise(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32).reshape(1, -1)
    n = float(np.linalg.norm(v))
    if not np.isfinite(n) or n < 1e-12:
        return v
    return (v / n).astype(np.float32)


def combine(image: np.ndarray, text: np.ndarray | None, image_weight: float) -> np.ndarray:
    """image_weight * image + (1 - image_weight) * text, renormalised (the image alone
    when there is no text)."""
    if text is None:
        return normalise(image)
    return normalise(image_weight * normalise(image) + (1.0 - image_weight) * normalise(text))


def subtract(query: np.ndarray, negatives: np.ndarray, weight: float) -> np.ndarray:
    """query - weight * each negative term's vector, renormalised."""
    out = normalise(query)
    for neg in np.asarray(negatives, dtype=np.float32).reshape(-1, out.shape[1]):
        out = out - weight * normalise(neg)
    return normalise(out)


def rocchio(query: np.ndarray, liked: np.ndarray, disliked: np.ndarray,
            weights: tuple[float, float, float]) -> np.ndarray:
    """alpha * query + beta * mean(liked) - gamma * mean(disliked), renormalised.

    Bounded: the weights are fixed, and each centroid is of unit vectors, so however
    many ids are given the query moves at most by beta + gamma."""
    alpha, beta, gamma = weights
    out = alpha * normalise(query)
    dim = out.shape[1]
    liked = np.asarray(liked, dtype=np.float32).reshape(-1, dim)
    disliked = np.asarray(disliked, dtype=np.float32).reshape(-1, dim)
    if len(liked):
        out = out + beta * normalise(liked.mean(axis=0))
    if len(disliked):
        out = out - gamma * normalise(disliked.mean(axis=0))
    return normalise(out)


def mmr_order(relevance: np.ndarray, vectors: np.ndarray, k: int,
              diversity: float) -> list[int]:
    """Maximal marginal relevance: the indices of ``k`` candidates, each chosen in turn
    to maximise (1 - diversity) * relevance - diversity * its highest cosine with those
    chosen before it. Relevance (the candidates' scores against the query) is scaled to
    0-1 over the candidates first, so that it and the cosines between images weigh on
    one scale whatever the model's score range; ``vectors`` are unit rows (a row of
    zeros: a candidate with no stored vector, never redundant). ``diversity`` 0 keeps the
    relevance order."""
    n = len(relevance)
    k = min(k, n)
    if k <= 0:
        return []
    rel = np.asarray(relevance, dtype=np.float64)
    span = float(rel.max() - rel.min())
    rel = (rel - rel.min()) / span if span > 1e-12 else np.ones(n)
    if diversity <= 0.0:
        return [int(i) for i in np.argsort(-rel, kind="stable")[:k]]
    vecs = np.asarray(vectors, dtype=np.float32).reshape(n, -1)
    redundancy = np.zeros(n)  # the highest cosine (at least 0) with those chosen
    free = np.ones(n, dtype=bool)
    chosen: list[int] = []
    for _ in range(k):
        gain = (1.0 - diversity) * rel - diversity * redundancy
        gain[~free] = -np.inf
        best = int(np.argmax(gain))
        chosen.append(best)
        free[best] = False
        redundancy = np.maximum(redundancy, vecs @ vecs[best])
    return chosen
