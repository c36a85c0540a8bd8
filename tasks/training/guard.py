"""The parent guard: a fine-tune keeps the epoch that does not lose any class its parent had.

A nightly run fine-tunes production's weights (``train.init``). Its last epoch is usually better
overall, but on a small validation split one class can drop while the others rise, and the
promotion gate then refuses the version (per-class regression against production). The guard
makes the checkpoint choice aware of that rule instead of leaving it to luck:

1. before the first epoch the parent (the weights training starts from) is scored once by the
   pipeline's evaluator (the promotion gate's measure), on the same split and settings as every
   epoch after it;
2. every epoch's checkpoint is scored and judged: it *qualifies* when no class's mask AP50 is
   more than ``tol`` below the parent's;
3. ``best.pt`` is the qualifying epoch with the highest Ultralytics fitness; while none qualifies,
   the epoch whose worst class drop is smallest (so a run that never qualifies still ends with
   its least-regressed epoch, and says so).

The choice is a pure function (``GuardState.judge``), tested on its own. The trainer side is a
pair of Ultralytics callbacks (``ParentGuard``), so it composes with any trainer class. The
state is written to ``guard.json`` in the run folder after every epoch (atomic rename), which
is also how a resumed run gets the parent's figures back.

Selecting an epoch on the validation split makes that split's figures optimistic for the chosen
epoch; the gate scores candidate and production on the same split, so the guard only chooses
among epochs what the gate would judge anyway. Scoring costs one evaluation of the val split per
epoch (about 1 s for the demo's 80 images at 160 px; a time budget then fits fewer epochs).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

GUARD_FILE = "guard.json"
CLASS_PREFIX = "mask_ap50/"


@dataclass
class EpochVerdict:
    """One validated epoch, judged against the parent."""

    epoch: int
    fitness: float
    worst_drop: float  # max over classes of parent - epoch mask AP50 (negative: every class gained)
    worst_class: str | None
    qualified: bool
    chosen: bool = False


@dataclass
class GuardState:
    """The parent's per-class mask AP50, the tolerance, and every epoch's verdict.

    Example:
        >>> g = GuardState(parent={"mask_ap50/dent": 0.5, "mask_ap50/tire": 0.8}, tol=0.0)
        >>> g.judge(0, 0.30, {"mask_ap50/dent": 0.6, "mask_ap50/tire": 0.7}).chosen  # first epoch: kept
        True
        >>> g.judge(1, 0.25, {"mask_ap50/dent": 0.55, "mask_ap50/tire": 0.85}).chosen  # qualifies: wins
        True
        >>> g.judge(2, 0.40, {"mask_ap50/dent": 0.3, "mask_ap50/tire": 0.9}).chosen  # dent dropped 0.2
        False
    """

    parent: dict[str, float]
    tol: float = 0.0
    epochs: list[EpochVerdict] = field(default_factory=list)

    @property
    def chosen(self) -> EpochVerdict | None:
        return next((e for e in reversed(self.epochs) if e.chosen), None)

    def judge(self, epoch: int, fitness: float, aps: dict[str, float]) -> EpochVerdict:
        """Judge one epoch and move the choice to it when it beats the current one.

        Order: qualified before not; among qualified the higher fitness, among the others the
        smaller worst drop (ties: the later epoch).
        """
        from damage.tasks.evaluation.metrics import worst_class_drop

        worst_class, worst = worst_class_drop(self.parent, aps, CLASS_PREFIX)
        v = EpochVerdict(epoch, float(fitness), float(worst), worst_class, worst <= self.tol + 1e-12)
        cur = self.chosen
        if cur is None or _key(v) >= _key(cur):
            if cur is not None:
                cur.chosen = False
            v.chosen = True
        self.epochs.append(v)
        return v

    def summary(self) -> dict[str, Any]:
        """Figures for tags and the run summary: chosen epoch, whether it qualified, worst drop."""
        c = self.chosen
        return {"guard.tol": self.tol, "guard.epochs_judged": len(self.epochs),
                "guard.qualified_epochs": sum(e.qualified for e in self.epochs),
                "guard.chosen_epoch": None if c is None else c.epoch + 1,
                "guard.chosen_qualified": None if c is None else c.qualified,
                "guard.chosen_worst_drop": None if c is None else round(c.worst_drop, 4),
                "guard.chosen_worst_class": None if c is None else c.worst_class}

    def save(self, path: Path) -> None:
        from damage.tasks.core.atomic import atomic_write_text

        atomic_write_text(path, json.dumps({"parent": self.parent, "tol": self.tol,
                                            "epochs": [asdict(e) for e in self.epochs]}, indent=1))

    @classmethod
    def load(cls, path: Path) -> GuardState | None:
        try:
            d = json.loads(Path(path).read_text())
            return cls({k: float(v) for k, v in d["parent"].items()}, float(d["tol"]),
                       [EpochVerdict(**e) for e in d["epochs"]])
        except (OSError, ValueError, KeyError, TypeError):
            return None


def _key(v: EpochVerdict) -> tuple[bool, float]:
    return (v.qualified, v.fitness if v.qualified else -v.worst_drop)


class ParentGuard:
    """The guard's trainer side, as Ultralytics callbacks (``attach``).

    ``evaluate_fn`` is the pipeline's evaluator (``Evaluator.metrics_fn``: the promotion gate's
    measure, not Ultralytics' in-training validator, whose per-class figures differed from it by up
    to 0.19 AP50 on the demo model; a guard in the validator's terms let a class drop 0.018 in
    the gate's). The parent is scored before the first epoch; after each epoch's ``last.pt`` is
    written (``on_model_save``) that checkpoint is scored and judged, a chosen one copied to
    ``guard_best.pt``, and ``best.pt`` set to the chosen checkpoint, so Ultralytics' final
    validation and everything downstream use it.
    """

    def __init__(self, weights: Path, evaluate_fn, tol: float):
        self.weights, self.evaluate_fn, self.tol = Path(weights), evaluate_fn, float(tol)
        self.state: GuardState | None = None
        self.last_figures: dict[str, float] = {}

    def attach(self, model) -> None:
        model.add_callback("on_train_start", self._start)
        model.add_callback("on_model_save", self._judge)

    def _start(self, trainer) -> None:
        path = Path(trainer.save_dir) / GUARD_FILE
        saved = GuardState.load(path)
        if saved is not None and trainer.start_epoch > 0:  # resumed: keep the parent's figures and verdicts
            self.state = saved
            return
        parent = {k: float(v) for k, v in self.evaluate_fn(self.weights).items() if k.startswith(CLASS_PREFIX)}
        self.state = GuardState(parent, self.tol)
        self.state.save(path)
        shown = ", ".join(f"{k[len(CLASS_PREFIX):]} {p:.3f}" for k, p in parent.items())
        print(f"fine-tune guard: parent mask AP50 per class: {shown}; keeping the fittest epoch with no class "
              f"below it by more than {self.tol:g}")

    def _judge(self, trainer) -> None:
        import shutil

        from damage.tasks.core.atomic import atomic_write

        if self.state is None:
            return
        wdir = Path(trainer.wdir)
        m = self.evaluate_fn(Path(trainer.last))
        aps = {k: float(v) for k, v in m.items() if k.startswith(CLASS_PREFIX)}
        verdict = self.state.judge(int(trainer.epoch), float(m.get("fitness", 0.0)), aps)
        self.state.save(Path(trainer.save_dir) / GUARD_FILE)
        self.last_figures = {"guard/fitness": float(m.get("fitness", 0.0)), "guard/mask_mAP50": m.get("mask/mAP50"),
                             "guard/worst_class_drop": verdict.worst_drop, "guard/qualified": float(verdict.qualified),
                             **{f"guard/{k}": v for k, v in aps.items()}}
        kept = wdir / "guard_best.pt"
        if verdict.chosen:
            atomic_write(kept, lambda tmp: shutil.copyfile(trainer.last, tmp))
        if kept.is_file():  # best.pt is the chosen epoch (Ultralytics may have just written this epoch there)
            atomic_write(Path(trainer.best), lambda tmp: shutil.copyfile(kept, tmp))
