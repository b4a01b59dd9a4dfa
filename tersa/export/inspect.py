"""Summarize a model folder: size, bits per parameter, a per-layer table and, for a lossless
export, each tensor's coder and coded bits per parameter."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError, safe_open

from tersa.compress.lossless import TensorInfo, read_index, read_some
from tersa.errors import ExportError
from tersa.export.load import is_tersa_config, lossless_file, read_config
from tersa.export.qconfig import read_plan
from tersa.quant.scheme import ActivationScheme, WeightScheme, describe_activation, describe_weight

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip
_ST_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64", "int8": "I8",
             "uint8": "U8", "int16": "I16", "int32": "I32", "int64": "I64", "bool": "BOOL"}  # fmt: skip


@dataclass
class LayerRow:
    """One module: its scheme tag, the parameters it represents and the bytes it stores."""

    name: str
    kind: str
    params: int
    bytes: int

    @property
    def bits_per_param(self) -> float:
        return 8 * self.bytes / self.params if self.params else 0.0


@dataclass
class Inspection:
    """``tensors``: the per-tensor coding of a lossless export (empty for safetensors)."""

    folder: Path
    model_type: str
    rows: list[LayerRow]
    tensors: list[TensorInfo] = field(default_factory=list)

    @property
    def size_bytes(self) -> int:
        return sum(r.bytes for r in self.rows)

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)


def inspect_folder(folder: str | Path) -> Inspection:
    """Read config.json and the safetensors headers (no tensor data but ``weight_shape``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"'{folder}' is not a folder; give an export or model folder")
    config = read_config(folder)
    qc = config.get("quantization_config")
    layers = _layer_schemes(qc, folder)
    lossless = lossless_file(qc, str(folder))
    if lossless:
        grouped, shapes, tensors = _container_tensors(folder / lossless)
    else:
        grouped, shapes = _safetensors_tensors(folder)
        tensors = []
    rows = [
        _row(name, leaves, layers.get(name), shapes.get(name)) for name, leaves in grouped.items()
    ]
    if lossless:  # stored bytes are the coded ones
        coded: dict[str, int] = {}
        for t in tensors:
            module = t.name.rpartition(".")[0]
            coded[module] = coded.get(module, 0) + t.stored_bytes
        for row in rows:
            row.bytes = coded[row.name]
    rows.sort(key=lambda r: _natural_key(r.name))
    return Inspection(folder, str(config.get("model_type", "?")), rows, tensors)


_Grouped = dict[str, dict[str, tuple[list[int], str]]]


def _container_tensors(path: Path) -> tuple[_Grouped, dict[str, list[int]], list[TensorInfo]]:
    """Per-module (shape, safetensors dtype) of a lossless container, its ``weight_shape`` values
    (decoded alone) and its per-tensor coding."""
    infos, _ = read_index(path)
    grouped: _Grouped = {}
    for t in infos:
        module, _, leaf = t.name.rpartition(".")
        grouped.setdefault(module, {})[leaf] = (list(t.shape), _ST_NAMES.get(t.dtype, t.dtype))
    wanted = [t.name for t in infos if t.name.endswith(".weight_shape")]
    shapes = {
        n.rpartition(".")[0]: [int(v) for v in t.tolist()]
        for n, t in read_some(path, wanted).items()
    }
    return grouped, shapes, infos


def _safetensors_tensors(folder: Path) -> tuple[_Grouped, dict[str, list[int]]]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ExportError(f"'{folder}' has no .safetensors files")
    grouped: _Grouped = {}
    shapes: dict[str, list[int]] = {}  # compressed-tensors weight_shape values: [out, in]
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open has no iter)
                    sl = f.get_slice(key)
                    module, _, leaf = key.rpartition(".")
                    grouped.setdefault(module, {})[leaf] = (list(sl.get_shape()), sl.get_dtype())
                    if leaf == "weight_shape":
                        shapes[module] = [int(v) for v in f.get_tensor(key).tolist()]
        except (SafetensorError, OSError) as e:
            raise ExportError(f"'{file}' is not a readable safetensors file ({e})") from None
    return grouped, shapes


@dataclass
class _Layer:
    weights: WeightScheme | None
    activations: ActivationScheme | None
    out_in: list[int] | None = None  # known from the config for layers in tersa's layout
    tag: str | None = None  # the kind shown instead of the schemes' (L2 layers)


def _layer_schemes(qc: object, folder: Path) -> dict[str, _Layer]:
    """The quantized layers the config names (groups that target classes or patterns, as other
    tools write them, are not resolved: those rows show dtypes)."""
    if not isinstance(qc, dict) or not qc:
        return {}
    try:
        plan = read_plan(qc, str(folder))
    except ExportError:
        if is_tersa_config(qc):
            raise
        return {}  # another tool's quantization: its rows show their dtypes
    table = {t: _Layer(g.weights, g.activations) for g in plan.groups for t in g.scheme.targets}
    for name, record in plan.native.items():
        w, a = record.get("weights"), record.get("activations")
        table[name] = _Layer(
            WeightScheme(**w) if w else None,
            ActivationScheme(**a) if a else None,
            [int(record["out_features"]), int(record["in_features"])],
        )
    for name, record in plan.l2.items():  # entropy-coded integer codes (tersa.export.l2)
        out_in = [int(record["out_features"]), int(record["in_features"])]
        table[name] = _Layer(None, None, out_in, f"l2 {record['codes_dtype']}")
    return table


def _row(
    name: str,
    tensors: dict[str, tuple[list[int], str]],
    layer: _Layer | None,
    weight_shape: list[int] | None,
) -> LayerRow:
    nbytes = sum(_numel(shape) * _DTYPE_BYTES.get(dtype, 4) for shape, dtype in tensors.values())
    if layer is None:
        params = sum(_numel(s) for s, d in tensors.values())
        kind = "/".join(sorted({d.lower() for _, d in tensors.values()}))
        return LayerRow(name, kind, params, nbytes)
    # [out, in]: from the config (tersa's layout), weight_shape (pack-quantized) or the stored
    # weight (int-quantized, activation-only)
    out_f, in_f = layer.out_in or weight_shape or tensors["weight"][0]
    params = out_f * in_f + (out_f if "bias" in tensors else 0)
    tag = layer.tag or _scheme_tag(layer.weights, layer.activations)
    return LayerRow(name, tag, params, nbytes)


def _scheme_tag(weights: WeightScheme | None, activations: ActivationScheme | None) -> str:
    parts = []
    if weights:
        parts.append(describe_weight(weights))
    if activations:
        parts.append(describe_activation(activations))
    return " ".join(parts)


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    """``layers.2`` before ``layers.10``: numeric parts compare as numbers."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in name.split(".")]


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
