"""Training tokens/s with glibc's allocator as it comes and as lmforge.allocator sets it, side by side.

The setting is per process, so every run is a fresh child process (`LMFORGE_MALLOC_TUNING=off` for
the reference), the two interleaved --repeats times so a slow moment of the machine hits both.
Each child trains the default model (`pretrain.models.<name>`, its own batch size) with
lmforge.training.train on synthetic blocks of the default shape (128 tokens, vocabulary 8,000),
bf16 where the CPU computes it, as the pretrain stage does. Median tokens/s and the ratio per model.

    python -m bench.allocator [--models decoder encoder] [--steps 120] [--repeats 3]

Prints a table and writes bench/results/allocator.json (with the machine it ran on).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.machine import describe

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB, BLOCK = 8000, 128


def child(model_name: str, steps: int) -> None:
    """Train `steps` steps of the default `model_name` in this process and print its tokens/s as JSON."""
    import numpy as np

    from lmforge.allocator import keep_freed_memory
    from lmforge.models import build_pretrain_model
    from lmforge.pretrain import SpecialIds, batch_maker, loss_for
    from lmforge.schema import PretrainParams, TrainingParams
    from lmforge.training import train

    ids = SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4, vocab_size=VOCAB)
    arch = PretrainParams().models[model_name]
    batch = arch.batch_size or TrainingParams().batch_size
    model = build_pretrain_model(arch, VOCAB, ids.pad, ids.cls, ids.sep, seed=0)
    blocks = np.random.default_rng(0).integers(5, VOCAB, size=(batch * (steps + 1), BLOCK))
    blocks[:, 0] = ids.cls
    params = TrainingParams(max_steps=steps, batch_size=batch, eval_every=10**6, checkpoint_every=10**6,
                            log_every=10**6, warmup_ratio=0.0, learning_rate=1e-3)  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        result = train(model, len(blocks), batch_maker(arch.objective, blocks, ids, 0.15), lambda m: 0.0, params, 0,
                       Path(folder), "bench", log=lambda metrics, step: None, description="bench",
                       loss_of=loss_for(arch.objective))  # fmt: skip
    print(json.dumps({"tokens_per_s": result.tokens_per_second, "tuned": keep_freed_memory()}))


def run_child(model_name: str, steps: int, tuned: bool) -> float:
    env = {**os.environ, "LMFORGE_MALLOC_TUNING": "on" if tuned else "off"}
    command = [sys.executable, "-m", "bench.allocator", "--child", model_name, "--steps", str(steps)]
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    found = json.loads(out.strip().splitlines()[-1])
    if found["tuned"] != tuned:
        raise SystemExit(f"bench.allocator: the child's allocator was {'' if found['tuned'] else 'not '}tuned")
    return float(found["tokens_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["decoder", "encoder"])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps)
        return
    rows = []
    for model_name in args.models:
        runs: dict[str, list[float]] = {"glibc defaults": [], "lmforge.allocator": []}
        for _ in range(args.repeats):
            for variant, values in runs.items():
                values.append(run_child(model_name, args.steps, tuned=variant == "lmforge.allocator"))
        reference = statistics.median(runs["glibc defaults"])
        for variant, values in runs.items():
            rows.append({"model": model_name, "variant": variant, "tokens_per_s": statistics.median(values),
                         "ratio": statistics.median(values) / reference, "runs": values})  # fmt: skip
    print(f"{'model':<8} {'allocator':<18} {'tokens/s':>9} {'ratio':>6}")
    for row in rows:
        print(f"{row['model']:<8} {row['variant']:<18} {row['tokens_per_s']:>9.0f} {row['ratio']:>5.2f}x")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "allocator.json").write_text(json.dumps(
        {"machine": describe(), "steps": args.steps, "repeats": args.repeats, "rows": rows}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
