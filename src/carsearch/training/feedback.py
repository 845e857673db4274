"""Votes from the search page as training signal (issue 16).

The page stores every thumbs-up (+1) and thumbs-down (-1) on a result in
`query_feedback` (query text, `images.id`, vote). `load_feedback` turns them into
(query text, image, label) pairs for the trainer:

- One pair per (query, image): the query text is compared with its case and whitespace
  folded, the votes on the pair are summed and the sign of the sum is the label (+1: an
  extra positive, -1: a hard negative); a net vote of 0 is no pair. A row without text
  takes its logged query's (`query_log.query`); a row with neither is skipped.
- Newest first (by the newest vote on the pair), and at most
  `min(max_pairs, ceil(max_share * n_train_images))` pairs enter a run: the rest are
  counted as capped.
- The image: the `images` row of the vote (a row that is gone is skipped), of the
  trained collection (`vehicles`; others are skipped). It is joined to the data set by
  its path (resolved) or, failing that, its file's sha256: a train image of this run is
  used as the version serves it (framed by its image policy); an image of the data set that is not
  one of this run's train images (the test split, or beyond `--limit`) is skipped, since
  evaluation must not see trained-on images; an image outside the data set is read from
  its path (skipped when unreadable).

Every skip is counted by reason and logged. How the trainer weighs the pairs is in
`loss.feedback_loss` and the trainer's module docstring.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy import func, select

from carsearch.data.stanford import StanfordDataset
from carsearch.platform.db import Database, QueryFeedback, QueryLog, as_utc
from carsearch.platform.db import Image as ImageRow
from carsearch.platform.errors import ImageRejectedError
from carsearch.platform.images import DECODE_MAX_SIDE, load_image, sha256_file
from carsearch.platform.models.image_policy import IMPLIED_POLICY, ImagePolicy

log = logging.getLogger(__name__)

DEFAULT_WEIGHT = 1.0
DEFAULT_MAX_PAIRS = 1000
DEFAULT_MAX_SHARE = 0.25
COLLECTION = "vehicles"


@dataclass(frozen=True)
class Vote:
    """One `query_feedback` row, with the query text it was given for."""

    id: int
    created_at: datetime
    image_id: int
    vote: int
    query: str | None


@dataclass(frozen=True)
class NetVote:
    """The net vote of one (query, image): `label` +1 or -1 over `votes` rows."""

    query: str
    image_id: int
    label: int
    votes: int
    newest: datetime
    newest_id: int


@dataclass
class FeedbackPair:
    """A pair the trainer scores: `image` at the train set's cache size."""

    query: str
    image: Image.Image
    label: int
    image_id: int
    train_index: int | None  # the image's index in the TrainSet where it is a train image


@dataclass
class FeedbackSet:
    pairs: list[FeedbackPair]
    stats: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.pairs)

    def digest(self) -> str:
        """sha256 over the pairs (query, image id, label), for the data fingerprint."""
        h = hashlib.sha256()
        for p in self.pairs:
            h.update(f"{p.label:+d}\t{p.image_id}\t{p.query}\n".encode())
        return h.hexdigest()


def query_key(text: str) -> str:
    """Votes on "Red  Pickup" and "red pickup" are votes on one query."""
    return " ".join(text.split()).casefold()


def net_votes(votes: Iterable[Vote]) -> tuple[list[NetVote], Counter[str]]:
    """One net vote per (query, image), newest first; and the skipped rows by reason."""
    skipped: Counter[str] = Counter()
    groups: dict[tuple[str, int], list[Vote]] = {}
    for v in votes:
        text = " ".join((v.query or "").split())
        if not text:
            skipped["no query text"] += 1
        elif v.vote == 0:
            skipped["vote of 0"] += 1
        else:
            groups.setdefault((query_key(text), v.image_id), []).append(v)
    out: list[NetVote] = []
    for (_, image_id), rows in groups.items():
        rows.sort(key=lambda r: (as_utc(r.created_at), r.id))
        net = sum(1 if r.vote > 0 else -1 for r in rows)
        if net == 0:
            skipped["net vote of 0"] += len(rows)
            continue
        newest = rows[-1]
        out.append(NetVote(" ".join((newest.query or "").split()), image_id,
                           1 if net > 0 else -1, len(rows), as_utc(newest.created_at),
                           newest.id))
    out.sort(key=lambda n: (n.newest, n.newest_id), reverse=True)
    return out, skipped


def feedback_cap(n_train_images: int, max_pairs: int, max_share: float) -> int:
    """How many pairs may enter a run: max_pairs, and max_share of the train images."""
    if max_pairs < 0 or max_share < 0:
        raise ValueError("the feedback caps must not be negative")
    return min(max_pairs, math.ceil(max_share * n_train_images))


def read_votes(db: Database) -> list[Vote]:
    """Every `query_feedback` row, with its logged query's text where it has none."""
    stmt = (
        select(QueryFeedback.id, QueryFeedback.created_at, QueryFeedback.image_id,
               QueryFeedback.vote, func.coalesce(QueryFeedback.query, QueryLog.query))
        .outerjoin(QueryLog, QueryLog.id == QueryFeedback.query_log_id)
        .order_by(QueryFeedback.id)
    )
    with db.session() as s:
        return [Vote(int(i), c, int(im), int(v), q) for i, c, im, v, q in s.execute(stmt)]


class _Resolver:
    """Finds the image of a vote: a train image of the run, another image of the data
    set (skipped), or a file outside it."""

    def __init__(self, dataset: StanfordDataset, train_ids: Sequence[str], side: int,
                 policy: ImagePolicy = IMPLIED_POLICY) -> None:
        self.policy = policy
        self.dataset = dataset
        self.train_index = {image_id: i for i, image_id in enumerate(train_ids)}
        self.by_path = {_resolved(item.path): item.image_id for item in dataset.images}
        self._by_sha: dict[str, str] | None = None
        self.side = side

    def by_sha(self, digest: str) -> str | None:
        if self._by_sha is None:  # hashed once, and only when a path did not match
            self._by_sha = {}
            for item in self.dataset.images:
                try:
                    self._by_sha.setdefault(sha256_file(item.path), item.image_id)
                except OSError:
                    continue
        return self._by_sha.get(digest)

    def resolve(self, row: ImageRow) -> tuple[int | None, Image.Image | None, str | None]:
        """(train index, image, skip reason): a train index, or an image read from the
        row's path, or a reason."""
        data_id = self.by_path.get(_resolved(Path(row.path))) or self.by_sha(row.sha256)
        if data_id is not None:
            index = self.train_index.get(data_id)
            return (index, None, None) if index is not None else (
                None, None, "in the data set but not a train image of this run")
        try:
            img = load_image(Path(row.path), max_side=DECODE_MAX_SIDE)
        except (ImageRejectedError, OSError) as exc:
            log.warning("feedback: cannot read image %d at %s: %s", row.id, row.path, exc)
            return None, None, "image unreadable"
        # the served view of the row: cropped to its stored box under the version's policy
        img = self.policy.frame(img, getattr(row, "box", None))
        scale = min(1.0, self.side / max(img.size))  # held like a train image: never up
        if scale < 1.0:
            img = img.resize((max(1, round(img.width * scale)),
                              max(1, round(img.height * scale))), Image.Resampling.BICUBIC)
        return None, img, None


def _resolved(path: Path) -> str:
    try:
        return str(path.expanduser().resolve())
    except OSError:
        return str(path)


def load_feedback(
    db: Database,
    dataset: StanfordDataset,
    train_ids: Sequence[str],
    train_images: Sequence[Image.Image] | Callable[[int], Image.Image],
    *,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    max_share: float = DEFAULT_MAX_SHARE,
    collection: str = COLLECTION,
    side: int = 0,
    policy: ImagePolicy = IMPLIED_POLICY,
) -> FeedbackSet:
    """The feedback pairs of a run (see the module docstring for the rules).

    `train_images` is the train set's images (or a function of a train index giving the
    image as served); an image outside the data set is framed by `policy` with the box
    stored on its row, and scaled (never up) so its longer side is at most `side` (0: the
    first train image's longer side)."""
    votes = read_votes(db)
    nets, skipped = net_votes(votes)
    cap = feedback_cap(len(train_ids), max_pairs, max_share)
    image_at = train_images if callable(train_images) else train_images.__getitem__
    if side <= 0:
        side = max(image_at(0).size) if train_ids else 1
    resolver = _Resolver(dataset, train_ids, side, policy)
    with db.session() as s:
        rows = {r.id: r for r in s.scalars(
            select(ImageRow).where(ImageRow.id.in_({n.image_id for n in nets})))}
    pairs: list[FeedbackPair] = []
    capped = 0
    for net in nets:
        if len(pairs) >= cap:
            capped += 1
            continue
        reason, index, img = None, None, None
        row = rows.get(net.image_id)
        if row is None:
            reason = "image row gone"
        # getattr: databases migrated before image collections have only vehicles
        elif getattr(row, "collection", COLLECTION) != collection:
            reason = f"not in the {collection} collection"
        else:
            index, img, reason = resolver.resolve(row)
        if reason is not None:
            skipped[reason] += net.votes
            continue
        image = image_at(index) if index is not None else img
        assert image is not None
        pairs.append(FeedbackPair(net.query, image, net.label, net.image_id, index))
    stats: dict[str, Any] = {
        "rows": len(votes),
        "pairs": len(pairs),
        "up": sum(1 for p in pairs if p.label > 0),
        "down": sum(1 for p in pairs if p.label < 0),
        "train_images": sum(1 for p in pairs if p.train_index is not None),
        "outside_images": sum(1 for p in pairs if p.train_index is None),
        "cap": cap,
        "capped": capped,
        "skipped": dict(sorted(skipped.items())),
    }
    log.info("feedback: %d pairs (%d up, %d down) from %d votes; cap %d, %d capped; "
             "skipped %s", stats["pairs"], stats["up"], stats["down"], stats["rows"], cap,
             capped, stats["skipped"] or "none")
    return FeedbackSet(pairs, stats)
