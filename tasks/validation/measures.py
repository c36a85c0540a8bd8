"""Per-image measures of the data gate's profile: brightness, contrast and blur of a greyscale image.

One rule for the data gate (``damage.tasks.validation.scan.measure_image``, over files) and the scoring
server's monitoring (``damage.tasks.serving.monitor``, over the images it is sent), so the profile of what
production sees compares with the profile of the training data.
"""

from __future__ import annotations

import numpy as np

GREY_SIDE = 256  # long side of the greyscale copy every measure is taken on (cheap; blur comparable)


def grey_measures(grey: np.ndarray) -> tuple[np.ndarray, float, float, float]:
    """``(grey downscaled to GREY_SIDE, blur, brightness, contrast)`` of a greyscale uint8 image.

    blur: variance of the Laplacian (lower = blurrier); brightness: mean grey level; contrast: its
    standard deviation. Values are rounded to 3 decimals, as stored in the profile.
    """
    import cv2

    side = max(grey.shape[:2])
    if side > GREY_SIDE:
        s = GREY_SIDE / side
        grey = cv2.resize(grey, (max(1, round(grey.shape[1] * s)), max(1, round(grey.shape[0] * s))),
                          interpolation=cv2.INTER_AREA)
    mean, std = cv2.meanStdDev(grey)
    _, lap_std = cv2.meanStdDev(cv2.Laplacian(grey, cv2.CV_32F))
    return (grey, round(float(lap_std[0, 0]) ** 2, 3), round(float(mean[0, 0]), 3), round(float(std[0, 0]), 3))
