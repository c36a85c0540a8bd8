"""The labelling loop against a real Label Studio (1.23.2) on loopback, then the next nightly.

Label Studio pins (Django, numpy < 2.3 through its SDK) clash with this project's, so it lives in its own
virtualenv under the state dir, made once by the ``label_studio_python`` fixture (``python -m venv`` +
``pip install label-studio==1.23.2``; kept in ``$DAMAGE_STATE_DIR/label-studio-venv``, so a second run
reuses it). ``label-studio-sdk`` comes with it and drives the server from that venv
(``tests/data/label_studio/ls_drive.py``): create a project, push the inbox's tasks, submit one
annotation through the API, export. The export is imported back, and the next nightly (tiny, offline)
trains on the union: its dataset fingerprint differs from the base's, the union holds the reviewed image
with the reviewer's label, and the run's MLflow dataset inputs name the base and the batch.

Slow: with the venv cached the test took 100 s on the shared 2-core dev machine (Label Studio's first start,
which migrates its SQLite database, 38 s of it; the tiny nightly most of the rest); the first run also
installs Label Studio (the pip install measured 136 s there), which puts it over 2 minutes. Skipped, with
the reason, only when PyPI cannot be reached.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import free_port, run_process

pytestmark = pytest.mark.slow

LS_VERSION = "1.23.2"
HERE = Path(__file__).resolve().parents[1] / "data" / "label_studio"
TOKEN = "damage-test-token-0123456789"


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment for Label Studio's venv: none of this project's Python settings leak in."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CONFIG_FILE",
            "PIP_FIND_LINKS", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")
    return {**{k: os.environ[k] for k in keep if k in os.environ}, **extra}


def _pypi_reachable(py: str) -> tuple[bool, str]:
    r = subprocess.run([py, "-m", "pip", "index", "versions", "label-studio"], capture_output=True, text=True,
                       timeout=120, env=_clean_env())
    return r.returncode == 0 and LS_VERSION in r.stdout, (r.stdout + r.stderr)[-500:]


@pytest.fixture(scope="session")
def label_studio_python(state_paths) -> Path:
    """The interpreter of a virtualenv with label-studio (and label-studio-sdk), made once and cached."""
    venv = Path(state_paths.root) / "label-studio-venv"
    marker = venv / ".complete"
    if marker.is_file() and marker.read_text().strip() == f"label-studio=={LS_VERSION}":
        return venv / "bin" / "python"
    ok, why = _pypi_reachable(sys.executable)
    if not ok:
        pytest.skip(f"PyPI unreachable (label-studio=={LS_VERSION} cannot be installed): {why}")
    tmp = venv.with_name(f"{venv.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True, timeout=300)
    # Run through `python -m pip` / `python -c`: a venv's console scripts name its folder, which is renamed below.
    subprocess.run([str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", f"label-studio=={LS_VERSION}"],
                   check=True, timeout=1800, env=_clean_env())
    print(f"label-studio venv: created and installed in {time.perf_counter() - t0:.0f} s")
    (tmp / ".complete").write_text(f"label-studio=={LS_VERSION}\n")
    shutil.rmtree(venv, ignore_errors=True)
    os.replace(tmp, venv)
    return venv / "bin" / "python"


@pytest.fixture(scope="session")
def label_studio(label_studio_python, tmp_path_factory):
    """A Label Studio server on 127.0.0.1 (its data in a temp dir of the state dir); yields (url, token)."""
    port = free_port()
    data = tmp_path_factory.mktemp("label-studio-data")
    log = data / "server.log"
    env = _clean_env(
        LABEL_STUDIO_BASE_DATA_DIR=str(data), LABEL_STUDIO_USERNAME="reviewer@example.com",
        LABEL_STUDIO_PASSWORD="damage-test-password", LABEL_STUDIO_USER_TOKEN=TOKEN,
        LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true", LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK="true",
        LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="true", LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT="/",
        SENTRY_DSN="", FRONTEND_SENTRY_DSN="", COLLECT_ANALYTICS="false")
    code = "import sys; from label_studio.server import main; sys.argv[0] = 'label-studio'; sys.exit(main())"
    cmd = [str(label_studio_python), "-c", code, "start", "--no-browser", "--internal-host", "127.0.0.1",
           "--port", str(port), "--data-dir", str(data), "--agree-fix-sqlite"]
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    # the first start migrates Label Studio's SQLite database: minutes on a busy 2-core machine
    with run_process(cmd, log, f"{url}/health", "Label Studio", env=env, timeout_s=600):
        print(f"Label Studio up in {time.perf_counter() - t0:.0f} s at {url}")
        yield url, TOKEN


def _inbox(root: Path, n: int = 3) -> list[str]:
    """An inbox of ``n`` collected requests (64-px photos the model was unsure about)."""
    from damage.tasks.core.config import CollectConfig
    from damage.tasks.data.blobstore import LocalStore
    from damage.tasks.serving.inbox import Inbox
    from tests.unit.test_inbox import Clock, png, pred

    ib = Inbox(CollectConfig(enabled=True), LocalStore(root), clock=Clock())
    ids = []
    for k in range(n):
        ib.clock.t += 60
        ids.append(ib.maybe_collect(png(100 + k, size=64), {**pred(("dent", 0.3, [8, 8, 40, 30]),
                                                                   ("vehicle", 0.9, [2, 2, 62, 62])),
                                                            "width": 64, "height": 64}))
    assert all(ids)
    return ids


def test_label_studio_round_trip_feeds_the_next_nightly(label_studio, label_studio_python, prefect_harness,
                                                        state_paths, tmp_path):
    from mlflow.tracking import MlflowClient

    from damage.flows.nightly import nightly
    from damage.tasks.core.config import CLASSES
    from damage.tasks.data.blobstore import LocalStore
    from damage.tasks.data.fingerprint import dataset_fingerprint
    from damage.tasks.data.label_studio import export_inbox, import_export
    from tests.conftest import make_easy_dataset

    url, token = label_studio
    ids = _inbox(tmp_path / "inbox")
    store = LocalStore(tmp_path / "inbox")
    tasks_json, n = export_inbox(store, tmp_path / "ls", CLASSES)
    config = tmp_path / "ls" / "label_config.xml"
    env = _clean_env()
    check = subprocess.run([str(label_studio_python), str(HERE / "sdk_check.py"), "validate", str(config),
                            str(tasks_json)], capture_output=True, text=True, timeout=300, env=env)
    assert check.returncode == 0 and json.loads(check.stdout.splitlines()[-1]) == [], check.stderr[-2000:]

    export = tmp_path / "export.json"
    drive = subprocess.run([str(label_studio_python), str(HERE / "ls_drive.py"), url, token, str(config),
                            str(tasks_json), str(export)], capture_output=True, text=True, timeout=600, env=env)
    assert drive.returncode == 0, drive.stderr[-3000:]
    done = json.loads(drive.stdout.strip().splitlines()[-1])
    assert done["tasks"] == n == 3 and done["annotated"] in ids

    reviewed = tmp_path / "reviewed"
    res = import_export(export, store, reviewed, CLASSES)
    assert res.imported == [done["annotated"]] and len(res.unreviewed) == 2, res.summary()
    again = import_export(export, store, reviewed, CLASSES)
    assert again.batch is None and again.already == [done["annotated"]]
    label = (res.batch / "labels" / "train" / f"{done['annotated']}.txt").read_text().splitlines()
    assert sorted(int(ln.split()[0]) for ln in label) == sorted([CLASSES.index("vehicle"), CLASSES.index("scratch")])

    base = make_easy_dataset(tmp_path / "base", n_train=16, n_val=8)
    from tests.integration.test_nightly_e2e import TINY

    old = os.environ.get("DAMAGE_REGISTRY_CONFIG")
    os.environ["DAMAGE_REGISTRY_CONFIG"] = json.dumps({"floor_mask_map": 0.0, "min_class_ap50": 0.0,
                                                       "model_name": f"damage-seg-loop-{os.getpid()}"})
    try:
        summary = nightly(overrides=[*TINY, f"data.source={base.parent}", f"data.batches=[\"{reviewed}\"]",
                                     "label_issues.enabled=false", "explain.enabled=false"], force=True)
    finally:
        if old is None:
            os.environ.pop("DAMAGE_REGISTRY_CONFIG", None)
        else:
            os.environ["DAMAGE_REGISTRY_CONFIG"] = old
    union = Path(summary["dataset"]).parent
    assert union.name.startswith("union-")
    assert summary["dataset_fingerprint"] != dataset_fingerprint(base.parent)
    assert summary["dataset_fingerprint"] == dataset_fingerprint(union)
    assert (union / "labels" / "train" / f"{done['annotated']}.txt").read_text().splitlines() == label
    inputs = MlflowClient(summary["tracking_uri"]).get_run(summary["mlflow_run_id"]).inputs.dataset_inputs
    assert {i.dataset.name for i in inputs} >= {base.parent.name, res.batch.name}
