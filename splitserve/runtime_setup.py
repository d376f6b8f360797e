"""Turn model options into a loaded model: threads first, then device, dtype and weights."""

from __future__ import annotations

from splitserve.common.builtin_models import resolve_model
from splitserve.common.config import ModelOptions
from splitserve.common.loading import LoadedModel, load_model
from splitserve.common.runtime import resolve_device, resolve_dtype, set_threads


def open_model(opts: ModelOptions, progress: bool | None = None) -> LoadedModel:
    set_threads(opts.threads)
    path = resolve_model(opts.model, opts.home, revision=opts.revision)
    device = resolve_device(opts.device)
    return load_model(path, resolve_dtype(opts.dtype, device, path), device, progress)
