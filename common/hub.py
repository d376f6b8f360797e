"""Checkpoints named by their Hugging Face Hub repository (`--model Qwen/Qwen2.5-Coder-1.5B`), fetched
into the Hub's own cache (`$HF_HOME`, shared with transformers) with huggingface_hub, which shows its
progress, resumes, locks against other processes fetching the same files, and reads `HF_TOKEN` for
gated repositories. Only what splitserve reads comes down: the JSON files (config, tokenizer,
safetensors index), the chat template, and the safetensors the checkpoint loads (model.safetensors,
or the shards its index lists; never Mistral's consolidated copy or pickles). Imports no torch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

# owner/name, as the Hub spells repository ids
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_SMALL_FILES = ["*.json", "*.jinja"]


class HubError(FileNotFoundError):
    """A repository that could not be fetched; the message says why."""


def is_repo_id(name: str) -> bool:
    return bool(_REPO_ID.fullmatch(name)) and ".." not in name


def fetch_checkpoint(repo_id: str, revision: str | None = None, weights: bool = True) -> Path:
    """The local snapshot of `repo_id` at `revision` (a branch, tag or commit; None: main), fetched
    where missing; without `weights` only its small files (what the router and frontends read: the
    config and the tokenizer). With HF_HUB_OFFLINE=1 only the cache is read."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        # the small files first, and the commit they came from: the weights then come from that one
        snapshot = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_SMALL_FILES))
        if not weights:
            return snapshot
        index = snapshot / "model.safetensors.index.json"
        weights = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
            else ["model.safetensors"]
        return Path(snapshot_download(repo_id, revision=snapshot.name, allow_patterns=weights))
    except RepositoryNotFoundError as e:
        raise HubError(f"{repo_id!r} is no Hugging Face Hub repository this machine may read (a gated one "
                       f"needs HF_TOKEN): {_first_line(e)}") from None
    except LocalEntryNotFoundError as e:
        raise HubError(f"{repo_id!r} is not in the Hugging Face cache and cannot be fetched (offline?): "
                       f"{_first_line(e)}") from None
    except (HfHubHTTPError, OSError) as e:
        raise HubError(f"fetching {repo_id!r} from the Hugging Face Hub failed: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
