"""A trial's own MLflow state agrees with the driver's (``_trial_rows``/``settle_runs``), whichever writes last.

ASHA stops a trial by raising ``SystemExit`` at one of its reports. A stop at the final report comes after the trial
trained and scored its best weights; the driver counts it finished, and the trial's own ``finally`` (which can run
after the driver settled the runs) must write the same state. Ray itself is replaced by a stand-in context here.
"""

from __future__ import annotations

import types

import pytest


@pytest.mark.parametrize(("stop_at_final", "state", "status"),
                         [(True, "finished", "FINISHED"), (False, "stopped_early", "KILLED")])
def test_a_stop_at_a_report_leaves_the_trials_run_in_the_drivers_state(tiny_dataset, tmp_path, monkeypatch,
                                                                        stop_at_final, state, status):
    ray_tune = pytest.importorskip("ray.tune", reason="the [ray] extra is not installed")
    import damage.tasks.core.runtime as runtime
    import damage.tasks.scale.ray_runtime as ray_runtime
    import damage.tasks.training.train as train_mod
    from damage.tasks.core import tracking
    from damage.tasks.core.config_load import load_config
    from damage.tasks.scale import tune as T

    c = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tracking.ensure_experiment(c, "tune-state")
    parent = tracking.start_run(c, exp, "search")
    best = tmp_path / "best.pt"
    best.write_bytes(b"weights")

    def fake_train(data_yaml, cfg, out, seed, on_epoch):
        on_epoch(0, {"train/seg_loss": 1.0})
        return types.SimpleNamespace(best=best, epochs_run=1)

    def report(metrics):
        if bool(metrics["final"]) == stop_at_final:
            raise SystemExit  # what Tune raises in a trial that ASHA stops at this report

    monkeypatch.setattr(train_mod, "train_model", fake_train)
    monkeypatch.setattr(T, "score", lambda *a, **k: (0.5, {}))
    monkeypatch.setattr(ray_runtime, "apply_worker_threads", lambda n: None)  # keeps this process's threads
    monkeypatch.setattr(runtime, "configure_ultralytics", lambda paths: None)
    monkeypatch.setattr(ray_tune, "get_context", lambda: types.SimpleNamespace(
        get_trial_id=lambda: "t_00001", get_trial_name=lambda: "trial-1"))
    monkeypatch.setattr(ray_tune, "report", report)
    settings = T.TrialSettings(load_config().to_dict(), str(tiny_dataset), str(tmp_path / "out"), parent,
                               c.tracking_uri, None, 1)

    with pytest.raises(SystemExit):
        T.run_trial({"train.lr0": 0.01}, settings)

    (run,) = c.search_runs([exp], f"tags.`{T.TRIAL_TAG}` = 't_00001'")
    assert (run.data.tags[T.STATE_TAG], run.info.status) == (state, status)
    assert (tmp_path / "out" / "trials" / "t_00001" / T.TRIAL_FILE).is_file() == stop_at_final
