"""Drop the test split of a Stanford-layout data set into an ingest inbox, each image
with a sidecar JSON of its labels, the way a camera gateway would deliver them."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from carsearch.data.stanford import load_stanford


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--inbox", type=Path, required=True)
    ap.add_argument("--source", default="demo")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--no-box", action="store_true",
                    help="leave the box out: the photo arrives as a box-less camera frame")
    a = ap.parse_args()
    a.inbox.mkdir(parents=True, exist_ok=True)
    items = load_stanford(a.root).split("test")
    if a.limit:
        items = items[: a.limit]
    for item in items:
        label = item.label
        name = f"{a.source}-{item.path.name}"
        side = {"class_name": label.class_name, "make": label.make, "model": label.model,
                "year": label.year, "body_type": label.body_type, "colour": label.colour,
                "source": a.source}
        if item.bbox is not None and not a.no_box:  # the vehicle's box: ingest embeds the crop
            side["box"] = list(item.bbox)
        (a.inbox / f"{name}.json").write_text(json.dumps(side))
        tmp = a.inbox / f".{name}"
        shutil.copyfile(item.path, tmp)  # dot-name first: the worker skips it until renamed
        tmp.rename(a.inbox / name)
    print(f"delivered {len(items)} test images to {a.inbox}")


if __name__ == "__main__":
    main()
