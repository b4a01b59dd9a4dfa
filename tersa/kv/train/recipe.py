"""Training recipes: the YAML ``tersa train`` reads, validated completely before any work starts.

A training recipe is told apart from a compression recipe by its ``training`` section. Every
problem is reported in one message that names the key path (``training.tokens``) and what is
allowed, as for compression recipes (:mod:`tersa.recipe`).

```yaml
version: 1
model: {attention: ratplus, layers: 4, hidden: 256, heads: 4, intermediate: 688}
tokenizer: {vocab_size: 4096}
data: {source: embedded:shakespeare, split: calibration}
training: {seq_len: 1024, batch_size: 8, tokens: 1000000, lr: 1.0e-3}
joint: {dilation: 64, window: 0, sinks: 0}   # active recurrence learning; null: dense only
adapt: null                                   # resolution adaptation to a target pattern
```

Instead of a model built from scratch, ``init`` continues training a pretrained Llama-family
checkpoint converted to RAT+ (:func:`tersa.kv.llama_to_ratplus`); the architecture and the
tokenizer are then the checkpoint's, so ``model`` and ``tokenizer`` must be absent (or null): a
recipe giving ``init`` and either of them is refused, rather than one side silently ignored.

```yaml
init: {source: embedded:smollm2-135m, forget_gate_bias_init: -6.0}
data: {source: embedded:shakespeare, split: calibration}
training: {seq_len: 256, batch_size: 2, tokens: 32768, lr: 1.0e-4}
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from tersa.config import STRICT, Bool, Float, Int, Str
from tersa.errors import RecipeError
from tersa.kv.masks import KVPattern
from tersa.recipe import _format_errors, read_yaml

TRAIN_RECIPE_VERSION = 1


@dataclass(config=STRICT)
class ModelSection:
    """The architecture of a :class:`~tersa.kv.RatPlusForCausalLM` built from scratch."""

    attention: Annotated[
        Literal["ratplus", "attention"],
        Field(description="ratplus (gated recurrence on k, v) or attention (the twin)"),
    ] = "ratplus"
    layers: Annotated[Int, Field(ge=1, description="decoder blocks")] = 4
    hidden: Annotated[Int, Field(ge=2, description="model width")] = 256
    heads: Annotated[Int, Field(ge=1, description="query heads")] = 4
    kv_heads: Annotated[Int | None, Field(ge=1, description="key/value heads (null: heads)")] = None
    intermediate: Annotated[Int, Field(ge=1, description="SwiGLU MLP width")] = 688
    forget_gate_bias_init: Annotated[
        Float, Field(description="initial forget gate bias; +3 starts g = σ(3) ≈ 0.95")
    ] = 3.0
    scan_chunk: Annotated[Int, Field(ge=1, description="chunk of the parallel scan")] = 16
    max_positions: Annotated[Int, Field(ge=2, description="max_position_embeddings")] = 4096
    tie_embeddings: Annotated[Bool, Field(description="share the input and output embeddings")] = (
        False
    )

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if (self.hidden // self.heads) % 2:
            raise ValueError(
                f"the head size hidden/heads ({self.hidden}/{self.heads}) must be even"
            )
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise ValueError(
                f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})"
            )


@dataclass(config=STRICT)
class TokenizerSection:
    """A byte-level BPE trained on the training text (deterministic)."""

    vocab_size: Annotated[
        Int, Field(ge=258, description="tokens, the 256 bytes and <|endoftext|> included")
    ] = 4096
    min_frequency: Annotated[Int, Field(ge=1, description="least count of a merged pair")] = 2


@dataclass(config=STRICT)
class InitSection:
    """Start from a pretrained Llama-family checkpoint, converted to RAT+ with the forget gate
    closed (``k̃ ≈ k``: the converted model computes what the checkpoint computes)."""

    source: Annotated[
        Str, Field(description="embedded:smollm2-135m or a Llama/Mistral checkpoint folder")
    ]
    forget_gate_bias_init: Annotated[
        Float,
        Field(description="initial forget gate bias; -6 starts g = σ(-6) ≈ 0.0025, so k̃ ≈ k"),
    ] = -6.0


@dataclass(config=STRICT)
class DataSection:
    """The training text, and the text of the final held-out check."""

    source: Annotated[Str, Field(description="embedded:shakespeare or a local file")] = (
        "embedded:shakespeare"
    )
    split: Annotated[Str | None, Field(description="split of the training text")] = "calibration"
    text_field: Annotated[Str, Field(description="text field of json/jsonl/parquet records")] = (
        "text"
    )
    eval_split: Annotated[Str | None, Field(description="split of the held-out text")] = (
        "evaluation"
    )
    eval_windows: Annotated[
        Int, Field(ge=0, description="held-out windows of seq_len scored at the end (0: none)")
    ] = 8


@dataclass(config=STRICT)
class TrainingSection:
    """Batches, the token budget, AdamW and its warmup + cosine schedule."""

    tokens: Annotated[Int, Field(ge=1, description="token budget: steps = tokens // (batch·seq)")]
    seq_len: Annotated[Int, Field(ge=2, description="tokens per sequence")] = 1024
    batch_size: Annotated[
        Int, Field(ge=1, description="sequences per step, all processes together")
    ] = 8
    lr: Annotated[Float, Field(gt=0, description="peak learning rate")] = 1e-3
    min_lr: Annotated[Float, Field(ge=0, description="learning rate at the end of the cosine")] = (
        1e-5
    )
    warmup: Annotated[
        Float, Field(ge=0, lt=1, description="linear warmup, as a fraction of the steps")
    ] = 0.05
    weight_decay: Annotated[
        Float, Field(ge=0, description="AdamW decay of matrices (not of biases, norms)")
    ] = 0.1
    betas: Annotated[tuple[Float, Float], Field(description="AdamW betas")] = (0.9, 0.95)
    grad_clip: Annotated[Float | None, Field(gt=0, description="max grad norm (null: none)")] = 1.0
    seed: Annotated[Int, Field(ge=0, description="seed of the initial weights and the batches")] = 0
    checkpoint_every: Annotated[Int, Field(ge=1, description="steps between checkpoints")] = 50
    log_every: Annotated[Int, Field(ge=1, description="steps between loss records")] = 10

    def __post_init__(self) -> None:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {list(self.betas)}")

    @property
    def batch_tokens(self) -> int:
        return self.batch_size * self.seq_len


@dataclass(config=STRICT)
class PatternSection:
    """A KV pattern (:class:`~tersa.kv.KVPattern`): dilated states, local window, sinks."""

    dilation: Annotated[Int | None, Field(ge=1, description="D (1: dense, null: none)")] = 1
    window: Annotated[Int, Field(ge=0, description="W: the current token and W before it")] = 4
    sinks: Annotated[Int, Field(ge=0, description="P: the first P tokens")] = 0

    def pattern(self) -> KVPattern:
        return KVPattern(self.dilation, self.window, self.sinks)


@dataclass(config=STRICT)
class JointSection:
    """The sparse pattern of the joint step; the defaults are the official pretraining pattern
    (wimh966/rat-plus ``configs/model/backbone/layer/ratplus.yaml``: D = 64, no window, no sinks)."""

    dilation: Annotated[Int | None, Field(ge=2, description="D (null: none)")] = 64
    window: Annotated[Int, Field(ge=0, description="W: the current token and W before it")] = 0
    sinks: Annotated[Int, Field(ge=0, description="P: the first P tokens")] = 0

    def pattern(self) -> KVPattern:
        return KVPattern(self.dilation, self.window, self.sinks)


@dataclass(config=STRICT)
class AdaptSection:
    """Resolution adaptation: after the main budget, train at one target pattern (no joint)."""

    tokens: Annotated[Int, Field(ge=1, description="token budget of the adaptation")]
    pattern: Annotated[
        PatternSection | None, Field(description="the target pattern of every layer")
    ] = None
    layers: Annotated[
        list[PatternSection] | None,
        Field(description="or one target pattern per layer (a hybrid)"),
    ] = None
    lr: Annotated[Float, Field(gt=0, description="peak lr (no warmup, cosine to min_lr)")] = 1e-4
    min_lr: Annotated[Float, Field(ge=0, description="lr at the end")] = 1e-6

    def __post_init__(self) -> None:
        if (self.pattern is None) == (self.layers is None):
            raise ValueError("give exactly one of pattern (every layer) and layers (per layer)")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")

    def kv_pattern(self) -> Any:
        """The target in ``set_kv_pattern`` form (one dict or a per-layer list)."""
        if self.layers is not None:
            return [p.pattern().to_dict() for p in self.layers]
        assert self.pattern is not None
        return self.pattern.pattern().to_dict()


@dataclass(config=STRICT)
class TrainRecipe:
    """A complete, validated training recipe."""

    training: TrainingSection
    version: Annotated[
        Int, Field(ge=1, le=TRAIN_RECIPE_VERSION, description="recipe format version")
    ] = TRAIN_RECIPE_VERSION
    init: Annotated[
        InitSection | None,
        Field(description="continue a converted checkpoint (no model, tokenizer sections)"),
    ] = None
    model: Annotated[
        ModelSection | None, Field(description="architecture from scratch (default without init)")
    ] = None
    tokenizer: Annotated[
        TokenizerSection | None, Field(description="BPE trained on the text (default without init)")
    ] = None
    data: DataSection = Field(default_factory=DataSection)
    joint: Annotated[
        JointSection | None,
        Field(description="sparse pattern of the joint step (active recurrence learning)"),
    ] = Field(default_factory=JointSection)
    adapt: AdaptSection | None = None

    def __post_init__(self) -> None:
        if self.init is not None:
            self._check_init()
            return
        if self.model is None:
            self.model = ModelSection()
        if self.tokenizer is None:
            self.tokenizer = TokenizerSection()
        if self.joint is not None and self.model.attention != "ratplus":
            raise ValueError(
                "joint: active recurrence learning needs model.attention: ratplus; "
                "set 'joint: null' for the attention twin"
            )
        if self.training.seq_len > self.model.max_positions:
            raise ValueError(
                f"training.seq_len ({self.training.seq_len}) exceeds model.max_positions "
                f"({self.model.max_positions})"
            )
        self._check_budgets()
        layers = None if self.adapt is None else self.adapt.layers
        if layers is not None and len(layers) != self.model.layers:
            raise ValueError(
                f"adapt.layers needs one pattern per layer, {self.model.layers} "
                f"(model.layers), got {len(layers)}"
            )

    def _check_init(self) -> None:
        """A converted checkpoint brings its architecture and tokenizer; the checks against its
        sizes (seq_len, adapt.layers) run once it is loaded (:mod:`tersa.kv.train.converted`)."""
        given = [name for name in ("model", "tokenizer") if getattr(self, name) is not None]
        if given:
            what = " and ".join(f"'{name}'" for name in given)
            raise ValueError(
                f"init: the architecture and the tokenizer come from init.source; remove {what} "
                f"(or remove init to train from scratch)"
            )
        self._check_budgets()

    def _check_budgets(self) -> None:
        batch = self.training.batch_tokens
        if self.training.tokens < batch:
            raise ValueError(
                f"training.tokens ({self.training.tokens}) is less than one batch "
                f"(batch_size × seq_len = {batch})"
            )
        if self.adapt is not None and self.adapt.tokens < batch:
            raise ValueError(
                f"adapt.tokens ({self.adapt.tokens}) is less than one batch "
                f"(batch_size × seq_len = {batch})"
            )

    @property
    def main_steps(self) -> int:
        """Steps of the main phase."""
        return self.training.tokens // self.training.batch_tokens

    @property
    def adapt_steps(self) -> int:
        """Steps of the resolution adaptation (0 without one)."""
        return 0 if self.adapt is None else self.adapt.tokens // self.training.batch_tokens

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe (every default filled in), as plain YAML-able data.

        ``init`` is left out when unused, so recipes written before it existed keep their
        fingerprint (``--resume``) and their saved ``recipe.yaml``.
        """
        data = TypeAdapter(TrainRecipe).dump_python(self, mode="json")
        if data.get("init") is None:
            data.pop("init", None)
        return data


_TOP_KEYS = list(TrainRecipe.__pydantic_fields__)  # type: ignore[attr-defined]


def load_train_recipe(path: str | Path) -> TrainRecipe:
    """Read and validate a training recipe file; :class:`RecipeError` on any problem."""
    return parse_train_recipe(read_yaml(path, "training recipe"), source=str(path))


def parse_train_recipe(data: Any, source: str = "recipe") -> TrainRecipe:
    """Validate training recipe data (the YAML as Python objects)."""
    if not isinstance(data, dict):
        raise RecipeError(
            f"{source}: a training recipe is a mapping with keys {', '.join(_TOP_KEYS)}"
        )
    if "stages" in data and "training" not in data:
        raise RecipeError(
            f"{source}: this is a compression recipe (it has 'stages'); run it with `tersa run`"
        )
    if "training" not in data:
        raise RecipeError(
            f"{source}: missing key 'training' (at least training.tokens, the token budget)"
        )
    try:
        return TypeAdapter(TrainRecipe).validate_python(data)
    except ValidationError as e:
        # a cross-field check of the top level has no key path: drop the empty prefix
        problems = [p.removeprefix(": ") for p in _format_errors(e, TrainRecipe, prefix="")]
    head = f"{source}: " + ("invalid recipe" if len(problems) > 1 else problems[0])
    raise RecipeError(head if len(problems) == 1 else head + "\n  " + "\n  ".join(problems))
