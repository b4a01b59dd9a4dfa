"""tersa train under torchrun: two gloo processes on the CPU take the single-process step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from tersa.eval.numerics import err_ratio
from tersa.kv.train import load_train_recipe, train
from tersa.kv.train.loop import build_model
from tests.kv.train_helpers import write_train_recipe

# Adam divides by sqrt(v): a gradient summed in another order moves an update by ~1e-6 of itself
# for typical entries, more for the few whose gradient is ~eps; 1e-4 of the whole update is far
# below a real difference (a process training on the wrong rows moves it by O(1)).
UPDATE_TOL = 1e-4


def test_two_process_ddp_step_equals_single_process_step(tmp_path: Path) -> None:
    recipe_path = write_train_recipe(tmp_path, training={"tokens": 128})  # one batch of 4 × 32
    recipe = load_train_recipe(recipe_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process (and fast for this tiny model)
    try:
        single = train(recipe, tmp_path / "single")
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tersa.cli", "train", str(recipe_path), "-o", str(tmp_path / "ddp"), "-q"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert single.step == 1 and "wrote" in proc.stdout  # one batch: a sparse and a dense step
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "single")
    start = build_model(recipe, tokenizer).state_dict()
    a = load_file(str(tmp_path / "single/model.safetensors"))
    b = load_file(str(tmp_path / "ddp/model.safetensors"))
    assert a.keys() == b.keys()
    delta_a = torch.cat([(a[k] - start[k]).flatten() for k in sorted(a)])
    delta_b = torch.cat([(b[k] - start[k]).flatten() for k in sorted(a)])
    assert delta_a.abs().max() > 1e-4  # the step moved the weights
    print(f"update error ratio {err_ratio(delta_a, delta_b):.2e}")
    assert err_ratio(delta_a, delta_b) < UPDATE_TOL
