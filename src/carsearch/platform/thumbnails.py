"""Thumbnails of indexed images: what the page shows and the label export links to.

JPEGs made once per image with the platform's safe decoder and kept under the image
directory (`THUMB_DIR`), the only folder the page serves.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from PIL import Image as PILImage

from carsearch.platform.errors import ImageRejectedError
from carsearch.platform.images import load_image
from carsearch.platform.settings import Settings

log = logging.getLogger(__name__)

THUMB_SIZE = 320
THUMB_DIR = "_thumbs"


class ThumbnailCache:
    """JPEG thumbnails of result images, made once with the safe decoder.

    They live in `root` (inside the image directory, the only folder the page serves),
    named by image id, so photos indexed from anywhere on disk are shown without that
    folder ever being opened to the web.
    """

    def __init__(self, root: Path, size: int = THUMB_SIZE, max_pixels: int = 40_000_000) -> None:
        self.root = Path(root)
        self.size = size
        self.max_pixels = max_pixels
        self.root.mkdir(parents=True, exist_ok=True)
        self._missing = self.root / "missing.jpg"

    @classmethod
    def for_settings(cls, settings: Settings) -> ThumbnailCache:
        """The thumbnails of a deployment: image_dir/_thumbs, decoded within its pixel cap."""
        return cls(settings.image_dir / THUMB_DIR, max_pixels=settings.max_image_pixels)

    def path_for(self, image_id: int) -> Path:
        return self.root / f"{image_id & 0xFF:02x}" / f"{image_id}.jpg"

    def get(self, image_id: int, source: str) -> Path:
        out = self.path_for(image_id)
        if out.is_file():
            return out
        try:
            img = load_image(Path(source), max_pixels=self.max_pixels, max_side=self.size)
        except ImageRejectedError as exc:
            log.warning("no thumbnail for image %d: %s", image_id, exc)
            return self.missing()
        img.thumbnail((self.size, self.size))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{threading.get_ident()}.part")
        img.save(tmp, format="JPEG", quality=85)
        tmp.replace(out)
        return out

    def missing(self) -> Path:
        if not self._missing.is_file():
            PILImage.new("RGB", (self.size, self.size), (200, 200, 200)).save(self._missing)
        return self._missing
