"""train.model names: families and sizes, bare sizes (YOLOv8), paths, and the error for unknown names."""

from __future__ import annotations

import pytest

from damage.tasks.core.config import ConfigError
from damage.tasks.core.config_load import load_config
from damage.tasks.core.errors import DamageError
from damage.tasks.core.families import FAMILIES, family_of, model_source, valid_names


@pytest.mark.parametrize(("value", "source"), [
    ("n", "yolov8n-seg.yaml"), ("x", "yolov8x-seg.yaml"),
    ("yolov8n-seg", "yolov8n-seg.yaml"), ("yolo11s-seg", "yolo11s-seg.yaml"), ("yolo26m-seg", "yolo26m-seg.yaml"),
    ("yolo26l-seg.yaml", "yolo26l-seg.yaml"),
])
def test_names_map_to_the_family_yaml(value, source):
    assert model_source(value) == source
    assert load_config(overrides=[f"train.model={value}"]).train.model == value


def test_paths_are_resolved_or_refused(tmp_path):
    pt = tmp_path / "best.pt"
    pt.write_bytes(b"x")
    assert model_source(str(pt)) == str(pt.resolve())
    with pytest.raises(DamageError, match=r"train.model '.*missing.yaml': file not found"):
        model_source(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("bad", ["yolo12n-seg", "yolov8n", "yolo11q-seg", "resnet50", "yolo26n-seg.onnx"])
def test_unknown_name_lists_the_valid_ones(bad):
    with pytest.raises(DamageError) as e:
        model_source(bad)
    msg = str(e.value)
    assert f"'{bad}'" in msg and "yolov8n-seg" in msg and "yolo11x-seg" in msg and "yolo26s-seg" in msg
    with pytest.raises(ConfigError, match=r"train.model.*unknown model. Valid names: n, s, m, l, x, yolov8n-seg"):
        load_config(overrides=[f"train.model={bad}"])


def test_distill_student_is_checked_too():
    assert load_config(overrides=["compress.distill.student=yolo26n-seg"]).compress.distill.student == "yolo26n-seg"
    with pytest.raises(ConfigError, match="compress.distill.student 'yolo9t-seg': unknown model"):
        load_config(overrides=["compress.distill.student=yolo9t-seg"])


def test_valid_names_cover_every_family_and_size():
    names = valid_names()
    assert len(names) == 5 + 5 * len(FAMILIES) and len(set(names)) == len(names)
    assert all(model_source(n).endswith("-seg.yaml") for n in names)


@pytest.mark.parametrize("name", ["yolov8n-seg", "yolo11n-seg", "yolo26n-seg"])
def test_family_of_built_models(state_paths, name):
    from ultralytics.nn.tasks import SegmentationModel

    m = SegmentationModel(f"{name}.yaml", nc=3, verbose=False)
    assert family_of(m).name == name[:-5]
    m.yaml = {}  # no YAML name (custom YAML, rebuilt module): the layers decide
    assert family_of(m).name == name[:-5]
