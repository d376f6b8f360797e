"""Train the built-in `tiny` model on the standard library's Python source, on the CPU.

The model has the benchmarks' reference shape (TINY_HF_CONFIG) and the committed tiny tokenizer.
Files are split into a training set and a held-out set by a hash of their path, so the split is
the same on every machine with the same interpreter. Half of the training examples are
rearranged for fill-in-the-middle in StarCoder's PSM order (<fim_prefix> prefix <fim_suffix>
suffix <fim_middle> middle), the order the gateway's `suffix` requests use.

For a given seed, thread count and step count the run is deterministic. `--minutes` picks the
step count from the speed of the first steps (the chosen count is printed and written to the
model card, so `--steps` reproduces it exactly).
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import platform
import random
import sysconfig
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..builtin_models import TINY_HF_CONFIG
from ..checkpoint import save_weights
from ..families import checkpoint_shapes, gpt_bigcode
from ..fim import find_fim
from ..model_config import ModelConfig, model_config_from_dict
from ..tokenizer import Tokenizer, write_tokenizer_files
from .train_options import TrainOptions
from .train_tokenizer import stdlib_sources

HELD_OUT_PERCENT = 3
# Unlike the tokenizer's corpus, tests are in: they are real Python and triple the data. Installed
# packages vary per machine; pydoc_data is one huge string table, not code.
SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__", "pydoc_data"}
# Python code the model never sees in training, for the cross-entropy check in the model card:
# a package the project depends on, so it is installed wherever splitserve is.
UNSEEN_PACKAGE = "tqdm"


def bf16_supported() -> bool:
    """Whether this CPU multiplies bf16 natively (emulated bf16 is slower than fp32)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


# ---- data ----------------------------------------------------------------------------------------


def split_files(paths: list[Path], root: Path) -> tuple[list[Path], list[Path]]:
    """(train, held out): a file's side depends only on its path relative to the stdlib."""
    held = [p for p in paths if zlib.crc32(str(p.relative_to(root)).encode()) % 100 < HELD_OUT_PERCENT]
    held_set = set(held)
    return [p for p in paths if p not in held_set], held


def read_texts(paths: list[Path]) -> list[str]:
    texts = []
    for path in paths:
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return [t for t in texts if t.strip()]


def tokenize(tok: Tokenizer, texts: list[str]) -> list[torch.Tensor]:
    encodings = tok._tok.encode_batch(texts, add_special_tokens=False)
    return [torch.tensor(e.ids, dtype=torch.int32) for e in encodings]


def strip_license_header(text: str) -> str:
    """Drop a leading block of `#` comment lines: license boilerplate says nothing about code."""
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines) and (lines[i].startswith("#") or not lines[i].strip()):
        i += 1
    return "".join(lines[i:])


def unseen_texts() -> list[str]:
    """The fixed held-out package's source files, license headers skipped, in path order."""
    import importlib.util

    spec = importlib.util.find_spec(UNSEEN_PACKAGE)
    root = Path(spec.origin).parent
    return [strip_license_header(t) for t in read_texts(sorted(root.rglob("*.py")))]


def fim_example(ids: torch.Tensor, rng: random.Random, markers: dict[str, int]) -> torch.Tensor:
    """`ids` rearranged as <prefix> P <suffix> S <middle> M, cut at two random token positions."""
    a, b = sorted(rng.randrange(len(ids) + 1) for _ in range(2))
    pre, mid, suf = ids[:a], ids[a:b], ids[b:]
    mark = lambda name: torch.tensor([markers[name]], dtype=ids.dtype)  # noqa: E731
    return torch.cat([mark("prefix"), pre, mark("suffix"), suf, mark("middle"), mid])


def epoch_stream(docs: list[torch.Tensor], epoch: int, opts: TrainOptions, eos: int,
                 markers: dict[str, int]) -> torch.Tensor:
    """One epoch's training tokens as one stream: files in a seeded order, each cut into pieces
    that fit a window (so a FIM example's parts are seen together), a share of the pieces turned
    into FIM examples, end-of-text after each file."""
    rng = random.Random(opts.seed * 1_000_003 + epoch)
    order = list(range(len(docs)))
    rng.shuffle(order)
    piece = opts.seq_len - 4  # room for the three FIM markers and an end-of-text
    eos_t = torch.tensor([eos], dtype=torch.int32)
    parts = []
    for i in order:
        doc = docs[i]
        for start in range(0, len(doc), piece):
            chunk = doc[start:start + piece]
            parts.append(fim_example(chunk, rng, markers) if rng.random() < opts.fim_rate else chunk)
        parts.append(eos_t)
    return torch.cat(parts)


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[n, seq_len + 1] consecutive windows; each step predicts tokens 1.. from 0.."""
    n = (len(stream) - 1) // seq_len
    idx = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)[None, :]
    return stream[idx].long()


def eval_windows(docs: list[torch.Tensor], seq_len: int, eos: int, limit: int) -> torch.Tensor:
    """Plain (no FIM) held-out text in order, cut into at most `limit` windows."""
    eos_t = torch.tensor([eos], dtype=torch.int32)
    stream = torch.cat([t for d in docs for t in (d, eos_t)])
    return windows(stream, seq_len)[:limit]


# ---- model ---------------------------------------------------------------------------------------


def init_weights(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """GPT-2 initialisation in the Hugging Face GPTBigCode layout, from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in checkpoint_shapes(cfg).items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            t = torch.ones(shape)
        elif name.endswith(".bias"):
            t = torch.zeros(shape)
        elif name.endswith("c_proj.weight"):
            t = 0.02 / math.sqrt(2 * cfg.n_layer) * torch.randn(shape, generator=gen)
        else:
            t = 0.02 * torch.randn(shape, generator=gen)
        weights[name] = t.requires_grad_()
    return weights


def forward(w: dict[str, torch.Tensor], cfg: ModelConfig, ids: torch.Tensor) -> torch.Tensor:
    """Logits [batch, seq, vocab] of the multi-query GPTBigCode model (training-time twin of
    common.model's serving code, with autograd and a causal mask)."""
    b, t = ids.shape
    d, hd, nh = cfg.n_embd, cfg.head_dim, cfg.n_head
    x = w["wte.weight"][ids] + w["wpe.weight"][:t]  # [b, t, d]
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        h = F.layer_norm(x, (d,), w[p + "ln_1.weight"], w[p + "ln_1.bias"], cfg.layer_norm_epsilon)
        q, k, v = F.linear(h, w[p + "attn.c_attn.weight"], w[p + "attn.c_attn.bias"]).split([d, hd, hd], -1)
        q = q.view(b, t, nh, hd).transpose(1, 2)  # [b, heads, t, hd]
        k = k.view(b, 1, t, hd).expand(b, nh, t, hd)
        v = v.view(b, 1, t, hd).expand(b, nh, t, hd)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + F.linear(a, w[p + "attn.c_proj.weight"], w[p + "attn.c_proj.bias"])
        h = F.layer_norm(x, (d,), w[p + "ln_2.weight"], w[p + "ln_2.bias"], cfg.layer_norm_epsilon)
        h = F.gelu(F.linear(h, w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"]), approximate="tanh")
        x = x + F.linear(h, w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"])
    x = F.layer_norm(x, (d,), w["ln_f.weight"], w["ln_f.bias"], cfg.layer_norm_epsilon)
    return F.linear(x, w["wte.weight"])


def loss_on(w: dict[str, torch.Tensor], cfg: ModelConfig, batch: torch.Tensor) -> torch.Tensor:
    logits = forward(w, cfg, batch[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


@torch.no_grad()
def mean_loss(w: dict[str, torch.Tensor], cfg: ModelConfig, wins: torch.Tensor, batch: int) -> float:
    """Mean cross-entropy per predicted token, nats."""
    total = 0.0
    for i in range(0, len(wins), batch):
        chunk = wins[i:i + batch]
        total += loss_on(w, cfg, chunk).item() * chunk.shape[0] * (chunk.shape[1] - 1)
    return total / (len(wins) * (wins.shape[1] - 1))


def lr_at(step: int, total: int, opts: TrainOptions) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio of the peak at the last step."""
    if step < opts.warmup_steps:
        return opts.lr * (step + 1) / opts.warmup_steps
    progress = (step - opts.warmup_steps) / max(total - opts.warmup_steps, 1)
    return opts.lr * (opts.min_lr_ratio + (1 - opts.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(w: dict[str, torch.Tensor], opts: TrainOptions) -> torch.optim.Optimizer:
    # Decay matrices only: decaying layer norms and biases just fights them.
    decay = [t for t in w.values() if t.dim() >= 2]
    no_decay = [t for t in w.values() if t.dim() < 2]
    groups = [{"params": decay, "weight_decay": opts.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=opts.lr, betas=(0.9, 0.95), eps=1e-8, foreach=True)


# ---- the run -------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    seconds: float
    train_files: int
    held_out_files: int
    train_tokens: int
    held_out_loss: float
    unseen_package: str
    unseen_loss: float
    random_unseen_loss: float
    history: list


def train(opts: TrainOptions) -> TrainResult:
    torch.manual_seed(opts.seed)
    torch.set_num_threads(opts.threads)
    cfg = model_config_from_dict(TINY_HF_CONFIG)
    tok = Tokenizer.from_file(Path(__file__).parent / "tiny" / "tokenizer.json")
    eos = tok.eos_token_id
    fim = find_fim(tok)  # StarCoder's markers, as the gateway's fill-in-the-middle prompts use them
    markers = {"prefix": fim.prefix_id, "suffix": fim.suffix_id, "middle": fim.middle_id}

    root = Path(sysconfig.get_paths()["stdlib"])
    train_paths, held_paths = split_files(stdlib_sources(root, SKIPPED_DIRS), root)
    train_paths = train_paths[:opts.max_files or None]
    train_docs = tokenize(tok, read_texts(train_paths))
    held = eval_windows(tokenize(tok, read_texts(held_paths)), opts.seq_len, eos, opts.eval_windows)
    unseen = eval_windows(tokenize(tok, unseen_texts()), opts.seq_len, eos, opts.eval_windows)
    train_tokens = sum(len(d) for d in train_docs)
    print(f"{len(train_docs)} training files ({train_tokens:,} tokens), {len(held_paths)} held out, "
          f"unseen package {UNSEEN_PACKAGE!r}: {unseen.numel():,} tokens")

    w = init_weights(cfg, opts.seed)
    random_unseen = mean_loss(w, cfg, unseen, opts.batch)
    optimizer = make_optimizer(w, opts)
    epoch, data, cursor = 0, windows(epoch_stream(train_docs, 0, opts, eos, markers), opts.seq_len), 0
    total = opts.steps or 10**9
    history = []
    start = time.perf_counter()
    bar = tqdm(total=opts.steps or None, desc="training", unit="step", dynamic_ncols=True)
    step = 0
    while step < total:
        if cursor + opts.batch > len(data):
            epoch += 1
            data, cursor = windows(epoch_stream(train_docs, epoch, opts, eos, markers), opts.seq_len), 0
        batch = data[cursor:cursor + opts.batch]
        cursor += opts.batch
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, opts)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=opts.bf16):
            loss = loss_on(w, cfg, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(w.values()), 1.0)
        optimizer.step()
        step += 1
        elapsed = time.perf_counter() - start
        bar.update(1)
        if step == 1:
            calib_start = time.perf_counter()  # the first step is slower (allocator warm-up)
        if step == opts.calibration_steps and not opts.steps:
            per_step = (time.perf_counter() - calib_start) / (opts.calibration_steps - 1)
            total = max(int(opts.minutes * 60 / per_step), opts.warmup_steps + 1)
            bar.reset(total=total)
            bar.update(step)
            bar.write(f"{per_step:.2f} s/step: {total} steps fit in {opts.minutes:g} minutes "
                      f"(--steps {total} repeats this run)")
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{step * batch.numel() / elapsed:,.0f}")
        if step % opts.eval_every == 0 or step == total:
            held_loss = mean_loss(w, cfg, held, opts.batch)
            history.append({"step": step, "seconds": round(elapsed, 1), "train_loss": round(loss.item(), 4),
                            "held_out_loss": round(held_loss, 4)})
            bar.write(f"step {step}: train {loss.item():.3f}, held out {held_loss:.3f} nats/token")
    bar.close()
    seconds = time.perf_counter() - start
    result = TrainResult(
        steps=step, tokens_seen=step * opts.batch * opts.seq_len, seconds=round(seconds, 1),
        train_files=len(train_docs), held_out_files=len(held_paths), train_tokens=train_tokens,
        held_out_loss=round(mean_loss(w, cfg, held, opts.batch), 4), unseen_package=UNSEEN_PACKAGE,
        unseen_loss=round(mean_loss(w, cfg, unseen, opts.batch), 4), random_unseen_loss=round(random_unseen, 4),
        history=history,
    )
    save_checkpoint(w, opts, result)
    return result


def save_checkpoint(w: dict[str, torch.Tensor], opts: TrainOptions, result: TrainResult) -> None:
    """fp16 safetensors (the serving path computes in fp32 on CPU), tokenizer, config, model card."""
    opts.out.mkdir(parents=True, exist_ok=True)
    config = dict(TINY_HF_CONFIG, torch_dtype="float16")
    (opts.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_weights({k: v.detach().half().contiguous() for k, v in w.items()}, opts.out, gpt_bigcode.PREFIX)
    write_tokenizer_files(opts.out)
    record = {"options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
              "result": asdict(result), "torch": torch.__version__, "python": platform.python_version(),
              "unseen_package_version": importlib.metadata.version(UNSEEN_PACKAGE)}
    (opts.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    write_model_card(opts.out)


def write_model_card(model_dir: Path) -> None:
    """README.md beside the weights, from the run's training.json."""
    rec = json.loads((model_dir / "training.json").read_text())
    o, r = rec["options"], rec["result"]
    n_params = sum(math.prod(shape) for shape in checkpoint_shapes(model_config_from_dict(TINY_HF_CONFIG)).values())
    card = f"""# tiny: splitserve's built-in Python model

A {n_params / 1e6:.1f}M-parameter GPTBigCode (multi-query) model with the benchmarks' reference shape
(4 layers, 256 wide, 8 heads, 8192-token vocabulary, 2048 positions), trained from scratch on the
CPU by `splitserve train-tiny`. Weights are stored in fp16; splitserve computes in fp32 on the CPU.
It writes plausible-looking Python, not correct programs.

## Data
- The Python {rec["python"]} standard library's `.py` files (tests included; `site-packages` and
  `pydoc_data` excluded): {r["train_files"]} training files, {r["train_tokens"]:,} tokens.
- {r["held_out_files"]} files held out by a hash of their path, for the validation loss.
- {o["fim_rate"]:.0%} of the examples rearranged for fill-in-the-middle in StarCoder's PSM order
  (`<fim_prefix>` prefix `<fim_suffix>` suffix `<fim_middle>` middle).

## Training
- {r["steps"]:,} steps of {o["batch"]} x {o["seq_len"]} tokens: {r["tokens_seen"]:,} tokens seen, in
  {r["seconds"] / 60:.0f} minutes on {o["threads"]} CPU threads ({"bf16" if o["bf16"] else "fp32"} matmuls under autocast, fp32 weights).
- AdamW (betas 0.9/0.95, weight decay {o["weight_decay"]} on matrices), peak learning rate
  {o["lr"]:g}, {o["warmup_steps"]} warmup steps, cosine decay to {o["min_lr_ratio"]:g} of the peak,
  gradient clipping at 1.0, seed {o["seed"]}.

## Evaluation (cross-entropy, nats per token, {o["seq_len"]}-token windows)
| text | this model | random weights |
| --- | --- | --- |
| held-out standard library files | {r["held_out_loss"]:.3f} | |
| `{r["unseen_package"]}` {rec["unseen_package_version"]} source, never seen (license headers skipped) | {r["unseen_loss"]:.3f} | {r["random_unseen_loss"]:.3f} |

## Reproduce
```
splitserve train-tiny --steps {r["steps"]} --seed {o["seed"]} --threads {o["threads"]} --out DIR
```
Deterministic for a given seed, thread count and step count on the same interpreter and PyTorch
({rec["torch"]} here).
"""
    (model_dir / "README.md").write_text(card)
