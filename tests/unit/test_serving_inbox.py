"""The Ray server offers what it served to the labelling inbox (serving.collect), off the request path."""

from __future__ import annotations

import numpy as np

from damage.tasks.core.config import CollectConfig
from damage.tasks.data.blobstore import LocalStore
from damage.tasks.serving.inbox import Inbox
from damage.tasks.serving.ray_serve import collect_rows, encode_png, make_inbox


def _pred(score: float, cls: str = "dent") -> dict:
    return {"image": "x", "width": 32, "height": 32, "instances": [
        {"class": cls, "score": score, "box": [2, 2, 20, 20], "polygon": [[2, 2], [20, 2], [20, 20], [2, 20]]}]}


def test_uncertain_rows_are_collected_and_confident_ones_are_not(tmp_path):
    inbox = Inbox(CollectConfig(enabled=True, band=(0.25, 0.5), max_per_hour=10), LocalStore(tmp_path / "inbox"))
    img = np.full((32, 32, 3), 90, np.uint8)
    assert collect_rows(inbox, [(img, _pred(0.3)), (img, _pred(0.9)), (img, _pred(0.4, "vehicle"))]) == 1
    stored = sorted(p.suffix for p in (tmp_path / "inbox").rglob("*") if p.is_file())
    assert stored == [".json", ".png"]


def test_an_inbox_that_fails_never_fails_the_request(tmp_path):
    class Broken:
        def maybe_collect(self, *a, **k):
            raise OSError("disk full")

    img = np.zeros((8, 8, 3), np.uint8)
    assert collect_rows(Broken(), [(img, _pred(0.3))]) == 0


def test_collection_is_off_unless_enabled(tmp_path):
    assert make_inbox(CollectConfig(), tmp_path) is None and make_inbox(None, tmp_path) is None
    assert make_inbox(CollectConfig(enabled=True), tmp_path / "inbox") is not None
    png = encode_png(np.zeros((4, 4, 3), np.uint8))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
