"""Turn model options into a loaded model: threads first, then device, dtype and weights."""

from __future__ import annotations

import logging
import time

from splitserve.common.builtin_models import resolve_model
from splitserve.common.checkpoint import quantization, weights_bytes
from splitserve.common.config import ModelOptions
from splitserve.common.loading import LoadedModel, load_model
from splitserve.common.runtime import resolve_device, resolve_dtype, set_threads

log = logging.getLogger(__name__)


def open_model(opts: ModelOptions, progress: bool | None = None) -> LoadedModel:
    set_threads(opts.threads)
    path = resolve_model(opts.model, opts.home, revision=opts.revision)
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device, path)
    start = time.perf_counter()
    model = load_model(path, dtype, device, progress)
    # what an operator sizes a GPU by: a quantized checkpoint takes its dense size once loaded
    quant = quantization(model.cfg)
    log.info("loaded %s (%s%s) as %s on %s in %.1f s: %.2f GiB of weights", path, model.cfg.model_type,
             f", {quant} dequantized" if quant else "", str(dtype).removeprefix("torch."), device,
             time.perf_counter() - start, weights_bytes(model.cfg, dtype) / 2**30)
    return model
