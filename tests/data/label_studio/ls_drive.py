"""Run with Label Studio's own interpreter (its venv): drive a running Label Studio with label-studio-sdk.

    python ls_drive.py BASE_URL TOKEN LABEL_CONFIG.xml TASKS.json EXPORT_OUT.json

Creates a project with the config, pushes the tasks (their predictions become pre-annotations),
submits one annotation through the API on the first task (the reviewer accepts the model's
regions and relabels the first damage region "scratch"), exports the project as JSON to
EXPORT_OUT.json and prints {"project": id, "tasks": n, "annotated": inbox_id, "result": [...]}.
"""

import json
import sys
from pathlib import Path

from label_studio_sdk.client import LabelStudio


def main(base_url: str, token: str, config: Path, tasks_json: Path, out: Path) -> None:
    ls = LabelStudio(base_url=base_url, api_key=token)
    project = ls.projects.create(title="damage inbox", label_config=config.read_text())
    tasks = json.loads(tasks_json.read_text())
    ls.projects.import_tasks(id=project.id, request=tasks)
    listed = list(ls.tasks.list(project=project.id))
    assert len(listed) == len(tasks), (len(listed), len(tasks))
    first = min(listed, key=lambda t: t.id)
    src = next(t for t in tasks if t["data"]["inbox_id"] == first.data["inbox_id"])
    result = []
    for r in src["predictions"][0]["result"]:
        r = {k: v for k, v in r.items() if k != "score"}
        if r["value"]["polygonlabels"] != ["vehicle"] and not any(x["value"]["polygonlabels"] == ["scratch"] for x in result):
            r["value"] = {**r["value"], "polygonlabels": ["scratch"]}
        result.append(r)
    ls.annotations.create(id=first.id, result=result, was_cancelled=False, ground_truth=False, lead_time=2.5)
    data = b"".join(ls.projects.exports.download_sync(id=project.id, export_type="JSON", download_all_tasks=True))
    out.write_bytes(data)
    print(json.dumps({"project": project.id, "tasks": len(listed), "annotated": first.data["inbox_id"],
                      "result": result}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]))
