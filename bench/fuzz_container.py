"""Mutation fuzzing of the lossless container: every mutated input must end in a ContainerError.

A few small valid containers (bf16 with row and column contexts, packed 4-bit codes, int8, fp32,
a constant tensor, raw tensors) are mutated at random: bit flips, byte overwrites, inserts, deletes,
truncation, header field tampering (the header's crc32 recomputed, so the field checks run), and
payload tampering with the segment's crc32 recomputed (so table parsing and ANS decoding see
garbage). Each input is decoded with ``max_output_bytes`` of 4 MiB and a wall-clock alarm; an
input that raises anything but :class:`~tersa.errors.ContainerError`, or hangs, is a failure and
is saved under ``--out``. Inputs that decode are counted (header tampering can legitimately
re-label bytes, e.g. reshape a raw tensor).

    python bench/fuzz_container.py --iterations 100000
"""

from __future__ import annotations

import argparse
import json
import random
import re
import resource
import signal
import struct
import time
import traceback
import zlib
from collections import Counter
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from tersa.compress.lossless import VERSION, decode_container, encode_container
from tersa.compress.lossless.spec import MAGIC
from tersa.errors import ContainerError

MAX_OUTPUT = 4 << 20


def seeds() -> list[bytes]:
    """Small valid containers covering every codec and segment kind."""
    g = torch.Generator().manual_seed(0)
    rows = torch.logspace(-1, 1, 48)[:, None]
    w = (torch.randn(48, 100, generator=g) * 0.02 * rows).to(torch.bfloat16)
    codes = torch.randint(-(2**31), 2**31 - 1, (16, 8), generator=g, dtype=torch.int64)
    sets = [
        {"w": w, "n": torch.ones(8, dtype=torch.bfloat16)},
        {"q": codes.to(torch.int32), "s": torch.tensor([16, 64])},
        {"i8": torch.randint(-4, 4, (30, 20), generator=g, dtype=torch.int8)},
        {"f32": torch.randn(70, generator=g), "c": torch.zeros(500, dtype=torch.float16)},
        {"b": torch.rand(200, generator=g) > 0.9, "e": torch.zeros(0, 3)},
    ]
    return [b"".join(encode_container(s, {"seed": str(i)})[0]) for i, s in enumerate(sets)]


def _split(data: bytes) -> tuple[dict, bytes]:
    length = int.from_bytes(data[12:16], "little")
    return json.loads(data[20 : 20 + length]), data[20 + length :]


def _join(doc: dict, payload: bytes) -> bytes:
    header = json.dumps(doc, separators=(",", ":")).encode()
    return struct.pack("<8sIII", MAGIC, VERSION, len(header), zlib.crc32(header)) + header + payload


def _tamper_value(rng: random.Random, v: object) -> object:
    choices = [-1, 0, 1, 2**31, 2**40, 2**64, "x", None, [], {}, 1.5, True]
    if isinstance(v, int) and not isinstance(v, bool):
        choices += [v + 1, v - 1, v * 2, v // 2, v ^ (1 << rng.randrange(32))]
    return rng.choice(choices)


def tamper_header(rng: random.Random, data: bytes) -> bytes:
    """Change one field anywhere in the header (or delete it), then fix the header crc32."""
    doc, payload = _split(data)
    paths: list[tuple[object, object]] = []

    def walk(node: object) -> None:
        items = (
            node.items()
            if isinstance(node, dict)
            else enumerate(node)
            if isinstance(node, list)
            else []
        )
        for key, child in list(items):
            paths.append((node, key))
            walk(child)

    walk(doc)
    node, key = rng.choice(paths)
    if rng.random() < 0.15 and isinstance(node, dict):
        del node[key]
    else:
        node[key] = _tamper_value(rng, node[key])  # type: ignore[index]
    return _join(doc, payload)


def tamper_segment(rng: random.Random, data: bytes) -> bytes:
    """Flip bytes inside one segment and fix its crc32 (and the header's)."""
    doc, payload = _split(data)
    segs = [s for t in doc["tensors"] for s in t["segments"]]
    if not segs or not payload:
        return data
    i = rng.randrange(len(segs))
    start = sum(s[1] for s in segs[:i])
    seg = bytearray(payload[start : start + segs[i][1]])
    if not seg:
        return data
    for _ in range(rng.randint(1, 4)):
        seg[rng.randrange(len(seg))] = rng.randrange(256)
    segs[i][2] = zlib.crc32(seg)
    return _join(doc, payload[:start] + bytes(seg) + payload[start + len(seg) :])


def mutate(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    kind = rng.choice(["flip", "overwrite", "insert", "delete", "truncate", "header", "segment"])
    b = bytearray(data)
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == "overwrite":
        i = rng.randrange(len(b))
        b[i : i + 4] = rng.randbytes(4)
    elif kind == "insert":
        i = rng.randrange(len(b) + 1)
        b[i:i] = rng.randbytes(rng.randint(1, 16))
    elif kind == "delete":
        i = rng.randrange(len(b))
        del b[i : i + rng.randint(1, 16)]
    elif kind == "truncate":
        del b[rng.randrange(len(b)) :]
    elif kind == "header":
        return kind, tamper_header(rng, data)
    else:
        return kind, tamper_segment(rng, data)
    return kind, bytes(b)


class Hang(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise Hang


def run(iterations: int, seed: int, out: Path, timeout: float) -> tuple[Counter, Counter]:
    rng = random.Random(seed)
    valid = seeds()
    originals = [decode_container(v)[0] for v in valid]
    signal.signal(signal.SIGALRM, _alarm)
    counts: Counter = Counter()
    messages: Counter = Counter()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for it in range(iterations):
        which = rng.randrange(len(valid))
        kind, data = mutate(rng, valid[which])
        counts[f"mutation {kind}"] += 1
        if data == valid[which]:  # e.g. a segment tamper that drew the same bytes
            counts["input unchanged by the mutation"] += 1
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            tensors, _ = decode_container(data, max_output_bytes=MAX_OUTPUT)
            same = list(tensors) == list(originals[which]) and all(
                t.dtype == o.dtype
                and t.shape == o.shape
                and torch.equal(
                    t.view(-1).view(torch.uint8) if t.numel() else t,
                    o.view(-1).view(torch.uint8) if o.numel() else o,
                )
                for t, o in zip(tensors.values(), originals[which].values(), strict=True)
            )
            counts["decoded, identical" if same else "decoded, header re-labelled"] += 1
        except ContainerError as e:
            counts["ContainerError"] += 1
            messages[re.sub(r"'[^']*'|\d+", "_", str(e))[:90]] += 1
        except (Exception, Hang) as e:  # anything else is a bug: keep the input
            counts["FAILURE"] += 1
            out.mkdir(parents=True, exist_ok=True)
            (out / f"fail-{it}.bin").write_bytes(data)
            (out / f"fail-{it}.txt").write_text(
                f"{kind}\n{type(e).__name__}: {e}\n{traceback.format_exc()}"
            )
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    counts["peak RSS growth (MiB)"] = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    ) // 1024
    return counts, messages


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("fuzz-failures"))
    p.add_argument("--top", type=int, default=25, help="error messages listed")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds allowed per input")
    args = p.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    counts, messages = run(args.iterations, args.seed, args.out, args.timeout)
    table = Table(
        title=f"fuzz_container: {args.iterations} inputs, seed {args.seed}, {time.perf_counter() - start:.0f} s"
    )
    table.add_column("outcome")
    table.add_column("count", justify="right")
    for key in sorted(counts):
        table.add_row(key, str(counts[key]))
    Console().print(table)
    kinds = Table(
        title=f"ContainerError messages ({len(messages)} kinds; quoted names and numbers as _)"
    )
    kinds.add_column("message")
    kinds.add_column("count", justify="right")
    for msg, n in messages.most_common(args.top):
        kinds.add_row(msg, str(n))
    Console().print(kinds)
    if counts["FAILURE"]:
        raise SystemExit(f"{counts['FAILURE']} failures saved under {args.out}")


if __name__ == "__main__":
    main()
