"""``tersa train``: pretrain a RAT+ model (or its attention twin) from a training recipe.

Per batch (``joint`` set, RAT+ only), **active recurrence learning** as the official code does it
(wimh966/rat-plus ``src/trainer/trainer.py``): a forward/backward under the sparse pattern
(D = 64, no window, no sinks by default: each query sees only itself and every 64th recurrent
state, so the gate must carry the context) and an optimizer step, then a forward/backward of the
same batch dense and a second optimizer step, both at the step's learning rate. The attention twin
(``joint: null``) takes one dense step per batch: the same tokens, half the optimizer steps, as in
the official baseline.

**Resolution adaptation** (``adapt``, optional) continues after the main budget with one step per
batch at the target pattern (joint off), its own token budget and a cosine from ``adapt.lr`` with
no warmup (the official 1B adaptation: lr 8e-5 after 8e-4, 1 % of the pretraining tokens). The
saved config then carries the target as its ``kv_pattern``.

**Conversion** (``init``, instead of ``model`` and ``tokenizer``) starts from a pretrained
Llama-family checkpoint converted to RAT+ and keeps its tokenizer (:mod:`tersa.kv.train.converted`);
everything else is the same.

The run keeps its tokenizer and checkpoints in the work area next to the output
(``out/.name.work/``, :mod:`tersa.workarea`); ``resume`` continues from the last checkpoint and
gives the same weights as an uninterrupted run. The output folder is written under a temporary
name and renamed at the end. Under ``torchrun`` every process trains its rows of each global batch
(DDP averages the gradients); process 0 writes the files.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tersa.data.sources import load_text
from tersa.data.tokens import eval_windows, tokenize_text
from tersa.errors import DataError, ExportError, RecipeError
from tersa.kv.configuration_ratplus import RatPlusConfig
from tersa.kv.modeling_ratplus import RatPlusForCausalLM
from tersa.kv.train import checkpoint
from tersa.kv.train.converted import start_converted
from tersa.kv.train.data import batch_at, local_rows
from tersa.kv.train.dist import Dist, setup
from tersa.kv.train.optim import build_optimizer, lr_at, set_lr
from tersa.kv.train.recipe import TrainRecipe
from tersa.kv.train.tokenizer import train_tokenizer
from tersa.pipeline import check_output_folder
from tersa.progress import Reporter
from tersa.workarea import fingerprint, open_work_area, work_area

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.json"


@dataclass
class TrainResult:
    """What a run did. ``finished``: False when ``stop_after`` ended it early (checkpoint kept)."""

    output: Path
    finished: bool
    step: int
    metrics: dict[str, Any] = field(default_factory=dict)


def build_model(recipe: TrainRecipe, tokenizer: PreTrainedTokenizerBase) -> RatPlusForCausalLM:
    """A fresh model of the recipe's size, initialised from ``training.seed``."""
    m = recipe.model
    assert m is not None  # filled in without init
    config = RatPlusConfig(
        vocab_size=len(tokenizer),
        hidden_size=m.hidden,
        intermediate_size=m.intermediate,
        num_hidden_layers=m.layers,
        num_attention_heads=m.heads,
        num_key_value_heads=m.kv_heads,
        max_position_embeddings=m.max_positions,
        tie_word_embeddings=m.tie_embeddings,
        attention=m.attention,
        forget_gate_bias_init=m.forget_gate_bias_init,
        scan_chunk=m.scan_chunk,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(recipe.training.seed)
    return RatPlusForCausalLM(config)


def step_patterns(recipe: TrainRecipe, step: int) -> list[Any]:
    """The pattern of each optimizer step taken on batch ``step`` (None: dense)."""
    if step >= recipe.main_steps:
        assert recipe.adapt is not None
        return [recipe.adapt.kv_pattern()]
    if recipe.joint is not None:
        return [recipe.joint.pattern().to_dict(), None]
    return [None]


def step_lr(recipe: TrainRecipe, step: int) -> float:
    """Learning rate of batch ``step``: the main schedule, then the adaptation's."""
    t = recipe.training
    if step < recipe.main_steps:
        warmup = math.ceil(t.warmup * recipe.main_steps)
        return lr_at(step, recipe.main_steps, t.lr, t.min_lr, warmup)
    assert recipe.adapt is not None
    return lr_at(
        step - recipe.main_steps, recipe.adapt_steps, recipe.adapt.lr, recipe.adapt.min_lr, 0
    )


def train_step(
    model: nn.Module,
    core: RatPlusForCausalLM,
    optimizer: torch.optim.Optimizer,
    ids: torch.Tensor,
    patterns: list[Any],
    grad_clip: float | None,
) -> list[float]:
    """One optimizer step per pattern on the batch ``ids [B, T]``; returns each step's loss.

    :param model: ``core`` itself, or ``core`` under DDP.
    """
    losses = []
    for pattern in patterns:
        core.set_kv_pattern(pattern)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(core.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def train(
    recipe: TrainRecipe,
    output: Path,
    resume: bool = False,
    overwrite: bool = False,
    reporter: Reporter | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Run ``recipe`` and write the trained model, tokenizer, recipe and metrics into ``output``.

    :param resume: continue from the last checkpoint in the work area (a fresh start if none).
    :param overwrite: replace an existing ``output``.
    :param stop_after: stop once this many batches are done, with a checkpoint and no output (as
        if interrupted; for tests).
    """
    _keep_freed_memory()
    d = setup()
    try:
        return _train(
            recipe, output, resume, overwrite, reporter or Reporter(quiet=True), stop_after, d
        )
    finally:
        d.close()


@dataclass
class _Run:
    """Everything a run holds between its phases."""

    recipe: TrainRecipe
    output: Path
    work: Path
    d: Dist
    tokenizer: PreTrainedTokenizerBase
    ids: torch.Tensor  # [N] the tokenized training text
    model: RatPlusForCausalLM
    optimizer: torch.optim.Optimizer
    start: int = 0  # the first batch this invocation trains
    log: list[dict[str, Any]] = field(default_factory=list)


def _train(
    recipe: TrainRecipe,
    output: Path,
    resume: bool,
    overwrite: bool,
    reporter: Reporter,
    stop_after: int | None,
    d: Dist,
) -> TrainResult:
    _check_setup(recipe, output, overwrite, d)
    reporter = reporter if d.main else Reporter(quiet=True)
    started = time.perf_counter()
    run = _open(recipe, output, resume, reporter, d)
    total = recipe.main_steps + recipe.adapt_steps
    end = total if stop_after is None else min(stop_after, total)
    loop_started = time.perf_counter()
    _loop(run, end, total, reporter)
    loop_s = time.perf_counter() - loop_started
    d.barrier()
    if end < total:
        return TrainResult(output, False, end)
    model = run.model
    model.set_kv_pattern(recipe.adapt.kv_pattern() if recipe.adapt is not None else None)
    metrics: dict[str, Any] = {}
    if d.main:
        metrics = _metrics(recipe, model, run.log, started, loop_s, end - run.start)
        metrics["eval"] = _evaluate(recipe, model, run.tokenizer)
        _write_output(model, run.tokenizer, recipe, metrics, output, overwrite)
        shutil.rmtree(run.work, ignore_errors=True)
    d.barrier()
    return TrainResult(output, True, end, metrics)


def _open(recipe: TrainRecipe, output: Path, resume: bool, reporter: Reporter, d: Dist) -> _Run:
    """Work area, tokenizer, tokens, model and optimizer; restored from the last checkpoint when
    resuming."""
    work = work_area(output)
    if d.main:
        output.parent.mkdir(parents=True, exist_ok=True)
        open_work_area(work, fingerprint(recipe.to_dict()), resume)
    d.barrier()
    text = load_text(recipe.data.source, recipe.data.split, recipe.data.text_field)
    last = checkpoint.latest_checkpoint(work) if resume else None
    if recipe.init is not None:
        tokenizer, model = start_converted(recipe, work, d, restoring=last is not None)
    else:
        tokenizer = _tokenizer(recipe, text, work, d)
        model = build_model(recipe, tokenizer)
    model.train()
    optimizer = build_optimizer(model, recipe.training)
    run = _Run(recipe, output, work, d, tokenizer, tokenize_text(tokenizer, text), model, optimizer)
    if last is not None:
        meta = checkpoint.load_checkpoint(last, model, optimizer)
        run.start, run.log = meta["step"], meta["log"]
        reporter.info(f"resuming {output} from step {run.start} ({last.name})")
    return run


def _loop(run: _Run, end: int, total: int, reporter: Reporter) -> None:
    """Train batches ``run.start .. end − 1``; log, and checkpoint every ``checkpoint_every``
    batches and when stopping early."""
    recipe, d, t = run.recipe, run.d, run.recipe.training
    wrapped = d.wrap(run.model)
    with reporter.task(f"train {run.output.name}", end - run.start) as update:
        for step in range(run.start, end):
            batch = batch_at(run.ids, step, t.batch_size, t.seq_len, t.seed)
            rows = local_rows(batch, d.rank, d.world)
            set_lr(run.optimizer, step_lr(recipe, step))
            patterns = step_patterns(recipe, step)
            losses = train_step(wrapped, run.model, run.optimizer, rows, patterns, t.grad_clip)
            if (step + 1) % t.log_every == 0 or step + 1 == end:
                run.log.append(_record(recipe, step, d.mean(losses), run.optimizer))
                update(step + 1 - run.start, end - run.start, f"loss {run.log[-1]['loss']:.3f}")
            if d.main and ((step + 1) % t.checkpoint_every == 0 or step + 1 == end < total):
                state = {"log": run.log}
                checkpoint.save_checkpoint(run.work, step + 1, run.model, run.optimizer, state)


def _keep_freed_memory() -> None:
    """Keep freed activation buffers (4-32 MiB at 8 × 1024 tokens) in glibc's heap for the next
    step, instead of unmapping them and faulting fresh pages in every step: with glibc's default a
    forward/backward of 2 × 1024 tokens took 6-18 s on 2 busy cores, 4.2-6.2 s with this. No-op
    where glibc is not the C library."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameter numbers
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest allowed value
    libc.mallopt(m_trim_threshold, 1 << 30)


def _check_setup(recipe: TrainRecipe, output: Path, overwrite: bool, d: Dist) -> None:
    if recipe.training.batch_size % d.world:
        raise RecipeError(
            f"training.batch_size ({recipe.training.batch_size}) must be a multiple of the "
            f"number of processes ({d.world})"
        )
    check_output_folder(output, overwrite)


def _tokenizer(recipe: TrainRecipe, text: str, work: Path, d: Dist) -> PreTrainedTokenizerBase:
    """The run's tokenizer: trained once by process 0 into the work area, read by every process."""
    folder = work / "tokenizer"
    if d.main and not (folder / "tokenizer.json").is_file():
        assert recipe.tokenizer is not None  # filled in without init
        tok = train_tokenizer(text, recipe.tokenizer.vocab_size, recipe.tokenizer.min_frequency)
        tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.tmp-", dir=work))
        tok.save_pretrained(tmp)
        tmp.rename(folder)
    d.barrier()
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _record(recipe: TrainRecipe, step: int, losses: list[float], opt: Any) -> dict[str, Any]:
    """One log entry: the dense (last) loss, and the sparse one of a joint step."""
    entry: dict[str, Any] = {
        "step": step + 1,
        "tokens": (step + 1) * recipe.training.batch_tokens,
        "lr": opt.param_groups[0]["lr"],
        "loss": round(losses[-1], 5),
    }
    if len(losses) == 2:
        entry["loss_sparse"] = round(losses[0], 5)
    if step >= recipe.main_steps:
        entry["phase"] = "adapt"
    return entry


def _metrics(
    recipe: TrainRecipe, model: nn.Module, log: list, started: float, loop_s: float, batches: int
) -> dict[str, Any]:
    """What metrics.json records; ``loop_s`` and ``batches``: this invocation's training loop."""
    return {
        "attention": recipe.model.attention if recipe.model else "ratplus",  # init: RAT+
        "params": sum(p.numel() for p in model.parameters()),
        "steps": recipe.main_steps + recipe.adapt_steps,
        "main_steps": recipe.main_steps,
        "adapt_steps": recipe.adapt_steps,
        "tokens": (recipe.main_steps + recipe.adapt_steps) * recipe.training.batch_tokens,
        "wall_s": round(time.perf_counter() - started, 2),
        "train_s": round(loop_s, 2),
        "tokens_per_s": round(batches * recipe.training.batch_tokens / max(loop_s, 1e-9), 1),
        "log": log,
    }


@torch.no_grad()
def _evaluate(recipe: TrainRecipe, model: RatPlusForCausalLM, tokenizer: Any) -> dict[str, float]:
    """Mean next-token NLL (nats) on held-out windows: dense, and under each trained pattern."""
    from tersa.eval.ppl import perplexity

    data = recipe.data
    if data.eval_windows == 0:
        return {}
    try:
        text = load_text(data.source, data.eval_split, data.text_field)
        windows = eval_windows(
            tokenize_text(tokenizer, text), recipe.training.seq_len, data.eval_windows, spread=True
        )
    except DataError as e:
        return {"error": str(e)}
    final = model.config.kv_pattern
    patterns: dict[str, Any] = {"dense": None}
    if recipe.joint is not None:
        patterns["joint"] = recipe.joint.pattern().to_dict()
    if recipe.adapt is not None:
        patterns["adapt"] = recipe.adapt.kv_pattern()
    model.eval()
    out = {}
    for name, pattern in patterns.items():
        model.set_kv_pattern(pattern)
        out[f"nll_{name}"] = round(perplexity(model, windows, batch_size=1).nll, 5)
    model.set_kv_pattern(final)
    return out


def _write_output(
    model: RatPlusForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    recipe: TrainRecipe,
    metrics: dict[str, Any],
    output: Path,
    overwrite: bool,
) -> None:
    """Write everything into a temp folder next to ``output``, then rename it into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / RECIPE_FILE).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=1) + "\n")
        if output.exists():
            if not overwrite:
                raise ExportError(f"output '{output}' appeared while training; pass --overwrite")
            old = output.with_name(f".{output.name}.old-{time.time_ns()}")
            output.rename(old)
            tmp.rename(output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
