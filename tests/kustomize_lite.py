"""Render deploy/k8s's Kustomize overlays in Python, so that tests validate what `kubectl apply -k`
would send without needing kustomize.

Only what those overlays use: `resources` (files and directories), `components`, `patches` that
are strategic merge patches of a whole object named by kind and name or JSON patches of `add`
operations on a `target` named by kind and name, and `replicas`. Any other key fails loudly. The
strategic merge knows the merge keys of the fields the patches touch (containers, env, volumes,
volumeMounts, ports); any other list is replaced, as Kubernetes does for lists without a merge key.
Its deletions: a null value deletes its key, and `$patch: delete` the object or list item it is in.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "components", "patches", "replicas"}
DELETE = "$patch"  # the strategic merge's directive key
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort"}


def render(directory: Path, objects: tuple[dict, ...] = (), kind: str = "Kustomization") -> list[dict]:
    """The objects the kustomization in `directory` yields. A component (`kind` Component) yields
    `objects`, those of the kustomization that names it, as it changes them."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    if kustomization.get("kind", "Kustomization") != kind:
        raise ValueError(f"{directory}: a {kustomization.get('kind')} where a {kind} belongs")
    unknown = set(kustomization) - SUPPORTED
    if unknown:
        raise ValueError(f"{directory}: kustomize_lite does not render {sorted(unknown)}")
    objects = list(objects)
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        objects += render(path) if path.is_dir() else load_all(path)
    # as kustomize does: components after the resources, before this kustomization's own patches
    for entry in kustomization.get("components", []):
        objects = render((directory / entry).resolve(), tuple(objects), "Component")
    for patch in kustomization.get("patches", []):
        apply_patch(objects, directory, patch)
    for r in kustomization.get("replicas", []):
        objects[find(objects, "Deployment", r["name"])]["spec"]["replicas"] = r["count"]
    return objects


def apply_patch(objects: list[dict], directory: Path, patch: dict) -> None:
    if set(patch) == {"path", "target"} and set(patch["target"]) == {"kind", "name"}:
        (operations,) = load_all(directory / patch["path"])
        i = find(objects, patch["target"]["kind"], patch["target"]["name"])
        objects[i] = json_patch(objects[i], operations)
    elif set(patch) == {"path"}:
        for p in load_all(directory / patch["path"]):
            i = find(objects, p["kind"], p["metadata"]["name"])
            if p.get(DELETE) == "delete":
                del objects[i]
            else:
                objects[i] = merge(objects[i], p)
    else:
        raise ValueError(f"{directory}: only patches given by path (and a target by kind and name) are rendered, "
                         f"not {patch}")


def json_patch(obj: dict, operations: list[dict]) -> dict:
    """RFC 6902's `add`, the one operation rendered, at paths without escapes."""
    obj = copy.deepcopy(obj)
    for op in operations:
        if op["op"] != "add" or "~" in op["path"]:
            raise ValueError(f"kustomize_lite applies only `add` at plain paths, not {op}")
        *parents, last = op["path"].split("/")[1:]
        node = obj
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node.insert(len(node) if last == "-" else int(last), op["value"])
        else:
            node[last] = op["value"]
    return obj


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
            if value is None:
                out.pop(key, None)
            else:
                out[key] = merge(original[key], value, key) if key in original else value
        return out
    key = MERGE_KEYS.get(field)
    if key and isinstance(original, list) and isinstance(patch, list):
        if not all(key in item for item in original + patch):
            raise ValueError(f"kustomize_lite merges {field} lists by {key}, which an item lacks")
        deleted = {item[key] for item in patch if item.get(DELETE) == "delete"}
        patched = {item[key]: item for item in patch if item[key] not in deleted}
        kept = [merge(item, patched.pop(item[key]), field) if item[key] in patched else item
                for item in original if item[key] not in deleted]
        return kept + list(patched.values())
    return patch
