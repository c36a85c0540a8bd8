"""Class-activation maps of one feature layer, for ``damage.tasks.evaluation.explain``.

Each takes the layer's activation ``A`` (``C x h x w``) and, for the gradient methods, the gradient
``dS/dA`` of the explained instance's class logit, and returns an ``h x w`` map (ReLU'd).

* Grad-CAM (Selvaraju et al. 2017): channel weights are the spatially averaged gradients,
  ``ReLU(sum_c mean_xy(dS/dA_c) * A_c)``. Averaging the gradient over the whole map lets a strong
  activation anywhere (a wheel, another instance) take weight from a gradient that lives elsewhere.
* HiResCAM (Draelos & Carin 2020): the element-wise product, ``ReLU(sum_c dS/dA_c * A_c)``; a
  position only gets heat where the score's gradient is, which for a detector's anchor score is
  near the anchor's receptive field: provably faithful to the score for this kind of head.
* EigenCAM (Muhammad & Yeasin 2020): gradient-free, the first principal component of the
  activations; the same map for every instance explained at that layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

GRADIENT_METHODS = ("gradcam", "hirescam")
METHODS = (*GRADIENT_METHODS, "eigencam")


def gradcam_map(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Grad-CAM of one layer: ReLU(sum_c mean_xy(dS/dA_c) * A_c). Inputs ``C x h x w``; output ``h x w``."""
    weights = gradient.mean(dim=(1, 2))
    return (weights[:, None, None] * activation).sum(0).clamp_min(0)


def hirescam_map(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """HiResCAM of one layer: ReLU(sum_c dS/dA_c * A_c), element-wise. Inputs ``C x h x w``; output ``h x w``."""
    return (gradient * activation).sum(0).clamp_min(0)


def eigencam_map(activation: torch.Tensor) -> torch.Tensor:
    """EigenCAM: projection of each position on the first principal component (``C x h x w`` -> ``h x w``).

    An SVD's sign is arbitrary, so the sign is chosen to make the map correlate positively with
    the channel-mean activation; the negative side is then cut (ReLU), as in Grad-CAM.
    """
    import torch

    c, h, w = activation.shape
    flat = activation.reshape(c, h * w).T.double()  # positions x channels
    centred = flat - flat.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    proj = centred @ vh[0]
    mean_act = flat.mean(1)
    corr = ((proj - proj.mean()) * (mean_act - mean_act.mean())).sum()
    if corr < 0:
        proj = -proj
    return proj.reshape(h, w).clamp_min(0).float()


GRADIENT_MAPS = {"gradcam": gradcam_map, "hirescam": hirescam_map}
