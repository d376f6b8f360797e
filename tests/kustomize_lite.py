"""Render deploy/k8s's Kustomize overlays in Python, so that tests validate what `kubectl apply -k`
would send without needing kustomize.

Only what those overlays use: `resources` (files and directories), `patches` that are strategic
merge patches of a whole object named by kind and name, and `replicas`. Any other key fails
loudly. The strategic merge knows the merge keys of the fields the patches touch (containers,
env, volumes, volumeMounts, ports); any other list is replaced, as Kubernetes does for lists
without a merge key.
"""

from __future__ import annotations

from pathlib import Path

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "patches", "replicas"}
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort"}


def render(directory: Path) -> list[dict]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - SUPPORTED
    if unknown:
        raise ValueError(f"{directory}: kustomize_lite does not render {sorted(unknown)}")
    objects: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        objects += render(path) if path.is_dir() else load_all(path)
    for patch in kustomization.get("patches", []):
        if set(patch) != {"path"}:
            raise ValueError(f"{directory}: only patches given by path are rendered, not {patch}")
        for p in load_all(directory / patch["path"]):
            i = find(objects, p["kind"], p["metadata"]["name"])
            objects[i] = merge(objects[i], p)
    for r in kustomization.get("replicas", []):
        objects[find(objects, "Deployment", r["name"])]["spec"]["replicas"] = r["count"]
    return objects


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(objects: list[dict], kind: str, name: str) -> int:
    matches = [i for i, o in enumerate(objects) if o["kind"] == kind and o["metadata"]["name"] == name]
    if len(matches) != 1:
        raise ValueError(f"{kind}/{name} is named by a patch or replicas entry; {len(matches)} resources match")
    return matches[0]


def merge(original, patch, field: str = ""):
    if isinstance(original, dict) and isinstance(patch, dict):
        out = dict(original)
        for key, value in patch.items():
            out[key] = merge(original[key], value, key) if key in original else value
        return out
    key = MERGE_KEYS.get(field)
    if key and isinstance(original, list) and isinstance(patch, list):
        if not all(key in item for item in original + patch):
            raise ValueError(f"kustomize_lite merges {field} lists by {key}, which an item lacks")
        patched = {item[key]: item for item in patch}
        kept = [merge(item, patched.pop(item[key]), field) if item[key] in patched else item for item in original]
        return kept + list(patched.values())
    return patch
