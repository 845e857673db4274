"""Write an ingest manifest for the demo: real Stanford Cars photos where present,
otherwise a few generated pictures (the demo must run on a machine without the data)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

FALLBACK = [
    ("Chevrolet Silverado 1500 Regular Cab 2012", "red"),
    ("Mercedes-Benz SL-Class Coupe 2009", "silver"),
    ("Ford F-150 Regular Cab 2007", "blue"),
    ("BMW M3 Coupe 2012", "black"),
]


def stanford_rows(root: Path, n: int) -> list[dict[str, object]]:
    import scipy.io as sio

    names = [str(x[0]) for x in sio.loadmat(root / "cars_meta.mat")["class_names"][0]]
    annos = sio.loadmat(root / "cars_train_annos.mat")["annotations"][0]
    step = max(1, len(annos) // n)
    return [
        {
            "path": str(root / "cars_train" / str(a["fname"][0])),
            "class_name": names[int(a["class"][0][0]) - 1],
            "source": "stanford_cars",
        }
        for a in annos[::step][:n]
    ]


def generated_rows(out_dir: Path, n: int) -> list[dict[str, object]]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        cls, colour = FALLBACK[i % len(FALLBACK)]
        img = Image.new("RGB", (96, 64), tuple(int(c) for c in rng.integers(0, 255, 3)))
        ImageDraw.Draw(img).rectangle([10, 20, 86, 50], fill=colour)
        path = out_dir / f"generated_{i:03d}.png"
        img.save(path)
        rows.append({"path": str(path), "class_name": cls, "colour": colour,
                     "source": "generated"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--stanford", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=60)
    a = ap.parse_args()
    if (a.stanford / "cars_meta.mat").is_file():
        rows = stanford_rows(a.stanford, a.n)
    else:
        rows = generated_rows(a.out.parent, a.n)
    a.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} images to {a.out}")


if __name__ == "__main__":
    main()
