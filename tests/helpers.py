"""Helpers shared by test modules (plain functions and constants; fixtures live in conftest.py)."""

from __future__ import annotations

S3_BUCKET = "datasets"  # the bucket the `s3` fixture (tests/conftest.py) creates
