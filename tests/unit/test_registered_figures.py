"""The model card and the nightly summary describe the registered artifact (issue 32): the INT8
variant's figures and per-class table when the INT8 is registered, its parent named as what it is
(a variant of the source run, never a version), one latency definition per key, damage_pct_mae."""

from __future__ import annotations

from types import SimpleNamespace

FP32_ROWS = [{"class": "dent", "images": 5, "instances": 7, "mask/AP50": 0.470, "box/AP50": 0.5}]
INT8_ROWS = [{"class": "dent", "images": 5, "instances": 7, "mask/AP50": 0.478, "box/AP50": 0.49}]
FP32 = {"mask/mAP50": 0.681, "mask/mAP50-95": 0.4, "box/mAP50": 0.7, "box/mAP50-95": 0.45, "latency_ms": 19.7}
INT8 = {"mask/mAP50": 0.670, "mask/mAP50-95": 0.39, "box/mAP50": 0.69, "box/mAP50-95": 0.44, "latency_ms": 16.9,
        "latency/forward_ms": 3.1}
INT8_CANDIDATE = {"onnx": "/m/int8.onnx", "weights": "/m/best.pt", "kind": "int8-static", "parent": "parent",
                  "metrics": INT8, "per_class": INT8_ROWS}


def _summary(candidate, damage):
    from damage.tasks.nightly.pipeline import summarise

    cfg = SimpleNamespace(train=SimpleNamespace(imgsz=160, model="n"))
    paths = SimpleNamespace(root="/s", prefect_home="/s/prefect")
    run = SimpleNamespace(run_id="r1", tracking_uri="sqlite:////s/mlflow.db")
    data = SimpleNamespace(data_yaml="/d/data.yaml", fingerprint="fp", cleaned=False)
    sweep = SimpleNamespace(thresholds={"conf": 0.4, "iou": 0.5, "objective": "damage_pct"},
                            damage=SimpleNamespace(mae=6.0, by_class={"dent": 7.0}, vehicles=12))
    return summarise(cfg, paths, run, data, SimpleNamespace(epochs_run=3, best="/m/best.pt"),
                     SimpleNamespace(metrics=FP32, per_class=FP32_ROWS), sweep,
                     SimpleNamespace(onnx_path="/m/best.onnx"), SimpleNamespace(name="damage-seg", version="7"),
                     {"passed": True, "reasons": []}, candidate, damage)


def test_summary_figures_are_the_registered_int8_variants():
    from damage.tasks.nightly.reporting import summary_markdown

    own = SimpleNamespace(mae=6.4, by_class={"dent": 7.5}, vehicles=12)
    s = _summary(INT8_CANDIDATE, own)
    assert s["registered_artifact"] == {"kind": "int8-static", "precision": "INT8", "onnx": "/m/int8.onnx"}
    assert s["metrics"]["mask/mAP50"] == 0.670 and s["metrics"]["latency_ms"] == 16.9
    assert s["per_class"] == INT8_ROWS and s["damage_pct_mae"]["mae"] == 6.4
    md = summary_markdown(s)
    assert "| registered artifact | INT8 (int8-static) |" in md
    assert "| mask/mAP50 | 0.670 |" in md and "0.681" not in md
    assert "| damage_pct_mae (points per vehicle) | 6.400 |" in md
    assert "| latency_ms (pre+inference+post per image) | 16.9 |" in md and "19.7" not in md
    assert "| dent | 7 | 0.490 | – | 0.478 |" in md  # the INT8 variant's per-class row, not the .pt's 0.470


def test_summary_without_compression_is_the_trained_models():
    s = _summary({"onnx": "/m/best.onnx", "kind": "trained", "parent": None, "metrics": FP32}, None)
    assert s["registered_artifact"]["precision"] == "FP32" and s["metrics"]["mask/mAP50"] == 0.681
    assert s["per_class"] == FP32_ROWS and s["damage_pct_mae"]["mae"] == 6.0  # the sweep's, same model


def test_card_names_the_parent_as_a_variant_and_keeps_one_latency_per_key():
    from damage.model_registry.card import model_card

    md = model_card("damage-seg", 7, INT8, INT8_ROWS, {"conf": 0.4, "iou": 0.5, "objective": "x", "value": 1},
                    compressed_from="parent", trained_from="none", kind="int8-static", machine_desc="box",
                    damage_pct_mae=6.4)
    assert "**Kind:** int8-static (INT8)" in md
    assert "**Compressed from:** this run's trained FP32 model" in md
    assert "version parent" not in md and "**Training started from:** scratch or a weights file" in md
    assert "| latency (ms/image, pre+inference+post) | 16.9 on box |" in md
    assert "| ONNX Runtime forward pass alone (ms) | 3.1 |" in md
    assert "| dent | 5 | 7 | 0.490 | – | 0.478 | – |" in md
    assert "| damage_pct_mae (points, per vehicle, at the operating point) | 6.400 |" in md
    fine_tuned = model_card("damage-seg", 8, FP32, FP32_ROWS, None, trained_from="3")
    assert "**Training started from:** registered version 3" in fine_tuned and "Compressed from" not in fine_tuned


def test_version_lineage_tags_the_variant_it_was_compressed_from(tmp_path):
    from damage.model_registry.steps import version_lineage

    run = SimpleNamespace(lineage=lambda fp: {"dataset_fingerprint": fp, "config_hash": "c", "code_version": "v",
                                              "source_run_id": "r"})
    init = SimpleNamespace(parent_version="3", source="production")
    tags = version_lineage(run, "fp", {"kind": "int8-static", "parent": "parent"}, init)
    assert tags["compressed_from"] == "parent" and "parent_version" not in tags
    assert tags["lineage.parent_version"] == "3" and tags["variant"] == "int8-static"


def test_headline_metrics_for_the_parent_run():
    from damage.tasks.evaluation.headline import headline_metrics

    s = _summary(INT8_CANDIDATE, None)
    m = headline_metrics(s, SimpleNamespace(mae=6.4, by_class={"dent": 7.5}, vehicles=12))
    assert m["mask/mAP50"] == 0.670 and m["mask_ap50/dent"] == 0.478 and m["damage_pct_mae"] == 6.4
    assert m["damage_pct_mae/dent"] == 7.5 and m["latency_ms"] == 16.9
