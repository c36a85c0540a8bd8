"""Knowledge distillation teacher -> student for YOLOv8-seg.

Ultralytics 8.4's built-in distillation (``train(distill_model=teacher.pt, dis=w)``) wraps the
student in ``ultralytics.nn.distill_model.DistillationModel``. Its loss is **feature-based**:
for each neck level feeding the head, a small 1x1-conv projector maps the student's feature
map to the teacher's width and a score-weighted L2 (``loss_sl2``) pulls it to the teacher's,
each location weighted by the teacher's max class probability there; the sum times ``dis`` is
appended to the student's own loss (``dis_loss``).

On top of it this module adds the **response-based** loss of Hinton et al. (2015), optional
(``compress.distill.hinton``): the temperature-softened class scores of the student are pulled
to the teacher's on the anchors the student's task-aligned assigner matched to ground truth
(its ``fg_mask``), scaled by ``T**2`` so its gradient does not shrink as ``T`` grows
(:func:`hinton_kd_loss`). It is logged per epoch as ``train/kd_loss`` next to ``train/dis_loss``.

Wiring: the trainer builds the ``DistillationModel`` itself; :func:`kd_trainer_cls` returns a
``SegmentationTrainer`` that, after Ultralytics' setup, turns that wrapper into
:class:`HintonDistillation` (same state, one extra loss term). The EMA copy and the saved
checkpoints remain plain Ultralytics classes (the final best.pt is the bare student).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from damage.tasks.core.errors import DamageError


def hinton_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, fg_mask: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """Hinton response-based KD on class logits of foreground anchors, as a per-class Bernoulli KL.

    ``KL(sigmoid(t/T) || sigmoid(s/T)) * T**2``, summed over classes and averaged over the
    anchors in ``fg_mask``.

    Why the binary (per-class Bernoulli) KL and not a softmax over classes: YOLOv8 scores each
    class with an independent sigmoid trained by BCE, and the absolute level of a logit is the
    detection confidence (NMS and mAP read it). A softmax over classes is invariant to adding
    the same constant to every logit, so it would transfer only the *ranking* among classes
    and throw away exactly the teacher's confidence; it would also impose mutual exclusivity the
    student was never trained with (a dent on a vehicle can score high for both). The
    per-class Bernoulli KL is the KL the BCE head's own likelihood defines, and at high ``T``
    its gradient ``(sigmoid(s/T) - sigmoid(t/T)) / T`` ~ ``(s - t) / (4 T**2)``, so the ``T**2``
    factor keeps its scale independent of ``T`` as in Hinton et al.

    Args:
        student_logits: (B, nc, A) raw class logits of the student.
        teacher_logits: (B, nc, A) raw class logits of the teacher (no gradient needed).
        fg_mask: (B, A) bool, anchors matched to ground truth by the student's assigner.
        temperature: T > 0.

    Returns:
        Scalar tensor (0 with a graph when no anchor is foreground).
    """
    if temperature <= 0:
        raise DamageError(f"distillation temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise DamageError(f"teacher/student class logits differ in shape: {tuple(teacher_logits.shape)} vs "
                          f"{tuple(student_logits.shape)} (same classes and strides needed)")
    if not fg_mask.any():
        return student_logits.sum() * 0.0
    s = student_logits.permute(0, 2, 1)[fg_mask].float() / temperature  # (N, nc)
    t = teacher_logits.detach().permute(0, 2, 1)[fg_mask].float() / temperature
    pt = torch.sigmoid(t)
    # KL(Bern(pt) || Bern(ps)) in log space for stability: log p = logsigmoid(x), log(1-p) = logsigmoid(-x)
    kl = pt * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - pt) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    return kl.sum(1).mean() * temperature**2


def _hinton_cls():
    """``DistillationModel`` subclass adding the Hinton term (built lazily: imports Ultralytics)."""
    from ultralytics.nn.distill_model import DistillationModel

    class HintonDistillation(DistillationModel):
        """Ultralytics' feature distillation plus :func:`hinton_kd_loss` (``kd_loss``)."""

        kd_temperature: float = 4.0
        kd_weight: float = 1.0

        def _fg_mask(self, preds: dict[str, Any], batch: dict[str, Any]) -> torch.Tensor:
            # The student's own task-aligned assignment (same call its loss makes), without gradients.
            crit = self.student_model.criterion
            with torch.no_grad():
                detached = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in preds.items()}
                (fg_mask, *_), _, _ = crit.get_assigned_targets_and_loss(detached, batch)
            return fg_mask.bool()

        def loss(self, batch, preds=None):
            total, items = super().loss(batch, preds)
            kd = torch.zeros(1, device=batch["img"].device)
            if self.training:
                n = len(self.feats_idx) - 1  # level n is the head (hooks captured both heads' raw outputs)
                t = self.decouple_outputs(self._teacher_feats[n], branch="one2many")
                s = self.decouple_outputs(self._student_feats[n], branch="one2many")
                fg = self._fg_mask(s, batch)
                kd = (hinton_kd_loss(s["scores"], t["scores"], fg, self.kd_temperature) * self.kd_weight).view(1)
            items["kd_loss"] = kd.detach()
            return torch.cat([total, kd * batch["img"].shape[0]]), items

    return HintonDistillation


def kd_trainer_cls(hinton: bool = True, temperature: float = 4.0, weight: float = 1.0):
    """A ``SegmentationTrainer`` subclass for distillation, optionally with the Hinton term.

    Pass it as ``trainer_cls`` to :func:`damage.tasks.training.train.train_model` together with
    ``extra_args={"distill_model": teacher, "dis": w}``.
    """
    from ultralytics.models.yolo.segment import SegmentationTrainer
    from ultralytics.nn.distill_model import DistillationModel
    from ultralytics.utils.torch_utils import unwrap_model

    class KDSegmentationTrainer(SegmentationTrainer):
        """Segmentation trainer whose DistillationModel also computes the Hinton KD term."""

        def _setup_train(self):
            super()._setup_train()
            m = unwrap_model(self.model)
            if hinton and isinstance(m, DistillationModel):
                # Same object, same state (projector, hooks, optimizer params); only loss() changes.
                m.__class__ = _hinton_cls()
                m.kd_temperature = float(temperature)
                m.kd_weight = float(weight)

    return KDSegmentationTrainer


def distill(teacher: str | Path, data_yaml: str | Path, train_cfg, dcfg, out_dir: str | Path, seed: int = 0,
            name: str = "distill", on_epoch=None):
    """Train ``dcfg.student`` from scratch for ``dcfg.epochs`` with distillation from ``teacher``.

    Args:
        teacher: teacher ``.pt``.
        data_yaml: dataset.
        train_cfg: ``TrainConfig`` for everything but model/weights/epochs.
        dcfg: ``DistillConfig`` (student size, dis, hinton, temperature, hinton_weight, epochs).
        out_dir, seed, name, on_epoch: as in :func:`damage.tasks.training.train.train_model`; ``on_epoch`` gets
            ``train/dis_loss`` and ``train/kd_loss`` among the metrics.

    Returns:
        ``TrainResult`` of the student.
    """
    from damage.tasks.training.train import train_model

    teacher = Path(teacher)
    if not teacher.is_file():
        raise DamageError(f"{teacher}: teacher weights not found")
    cfg = student_cfg(train_cfg, dcfg)
    extra = {"distill_model": str(teacher.resolve()), "dis": float(dcfg.dis)}
    return train_model(data_yaml, cfg, out_dir, seed=seed, name=name, on_epoch=on_epoch,
                       trainer_cls=kd_trainer_cls(dcfg.hinton, dcfg.temperature, dcfg.hinton_weight),
                       extra_args=extra)


def student_cfg(train_cfg, dcfg):
    """The student's TrainConfig: size from ``dcfg.student``, from scratch, ``dcfg.epochs`` epochs."""
    # time_min None: the KD comparison needs exactly dcfg.epochs for both students, not the training's time budget
    return train_cfg.model_copy(update={"model": dcfg.student, "weights": None, "epochs": dcfg.epochs,
                                        "resume": None, "finetune": False, "time_min": None})


def train_scratch(data_yaml: str | Path, train_cfg, dcfg, out_dir: str | Path, seed: int = 0,
                  name: str = "scratch", on_epoch=None):
    """The same student, same epochs and data, without a teacher (the KD baseline)."""
    from damage.tasks.training.train import train_model

    return train_model(data_yaml, student_cfg(train_cfg, dcfg), out_dir, seed=seed, name=name, on_epoch=on_epoch)


def distill_vs_scratch(teacher: str | Path, data_yaml: str | Path, train_cfg, dcfg, out_dir: str | Path,
                       seed: int = 0, parent_run_id: str | None = None, evaluator=None) -> dict[str, Any]:
    """Train the student with KD and from scratch (same epochs, data, seed); compare them side by side.

    Both students are measured by ``evaluator`` (a ``damage.tasks.evaluation.evaluate.Evaluator``;
    default: its defaults at ``train_cfg.imgsz``). With
    ``parent_run_id`` each training is a nested MLflow run (``distill/kd``, ``distill/scratch``)
    with its per-epoch history (``train/dis_loss`` and ``train/kd_loss`` for KD), and a
    ``distill/compare`` run holds both final figures and ``kd_minus_scratch/*`` differences.

    Returns:
        ``{"kd": {...}, "scratch": {...}, "diff": {...}, "kd_weights", "scratch_weights"}``.
    """
    out_dir = Path(out_dir)
    histories: dict[str, list[tuple[int, dict[str, float]]]] = {"kd": [], "scratch": []}
    kd = distill(teacher, data_yaml, train_cfg, dcfg, out_dir, seed=seed, name="kd",
                 on_epoch=lambda e, m: histories["kd"].append((e, m)))
    sc = train_scratch(data_yaml, train_cfg, dcfg, out_dir, seed=seed, name="scratch",
                       on_epoch=lambda e, m: histories["scratch"].append((e, m)))
    if evaluator is None:  # both models are scored as the gate scores (evaluate: settings), never by defaults
        raise DamageError("distill_vs_scratch needs evaluator=Evaluator.from_config(cfg)")
    res = {tag: evaluator(tr.best, data_yaml).metrics for tag, tr in (("kd", kd), ("scratch", sc))}
    keys = ("mask/mAP50", "mask/mAP50-95", "box/mAP50", "box/mAP50-95")
    diff = {f"kd_minus_scratch/{k}": res["kd"][k] - res["scratch"][k] for k in keys}
    if parent_run_id:
        _log_comparison(parent_run_id, teacher, dcfg, kd, sc, histories, res, diff)
    return {"kd": res["kd"], "scratch": res["scratch"], "diff": diff, "kd_weights": str(kd.best),
            "scratch_weights": str(sc.best),
            "kd_loss_terms": sorted({k for _, m in histories["kd"] for k in m if k.endswith(("dis_loss", "kd_loss"))})}


def _log_comparison(parent_run_id, teacher, dcfg, kd, sc, histories, res, diff) -> None:
    from damage.tasks.core import tracking
    params = {"teacher": str(teacher), "student": dcfg.student, "epochs": dcfg.epochs, "dis": dcfg.dis,
              "hinton": dcfg.hinton, "temperature": dcfg.temperature, "hinton_weight": dcfg.hinton_weight}
    with tracking.step_run(parent_run_id, "distill/compare") as (c, cmp_id):
        tracking.log_params(c, cmp_id, params)
        for tag, tr in (("kd", kd), ("scratch", sc)):
            with tracking.step_run(cmp_id, f"distill/{tag}", tags={"damage.distill.arm": tag}) as (_, rid):
                tracking.log_params(c, rid, {**params, "arm": tag, "weights": str(tr.best)})
                for epoch, m in histories[tag]:
                    tracking.log_metrics(c, rid, m, step=epoch)
                tracking.log_metrics(c, rid, {f"final/{k}": v for k, v in res[tag].items()})
            tracking.log_metrics(c, cmp_id, {f"{tag}/{k}": v for k, v in res[tag].items()
                                             if k.startswith(("mask/", "box/"))})
        tracking.log_metrics(c, cmp_id, diff)
