"""Generation: lmforge's batched, KV-cached `generate` against the plain loop it replaced, same prompts.

The default decoder's shape (GPT-2 style, hidden 128, 2 layers, 128 positions) with a character
tokenizer of about 2,000 entries; 64 prompts of 12 characters, 24 new tokens each, greedy. Both paths
give the same tokens (tests/lmforge/test_inference.py), so the ratio of their times is the speed-up.
Median of --repeats, interleaved.

    python -m bench.generate_speed [--repeats 3]

Prints a table and writes bench/results/generate_speed.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from bench.machine import describe
from lmforge.artifacts import TaskMeta
from lmforge.inference import TaskModel, generate, generate_one_by_one, load_task_model
from lmforge.schema import LoraParams, TokenizerParams, TrainingParams
from lmforge.tokenization import save_hf_tokenizer, train_tokenizer

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS, PROMPT_CHARS, NEW_TOKENS, MAX_LENGTH = 64, 12, 24, 128


def task_model(folder: Path) -> tuple[TaskModel, list[str]]:
    rng = random.Random(0)
    characters = [chr(0x4E00 + i) for i in range(2000)]
    (folder / "corpus.txt").write_text("\n".join("".join(rng.choices(characters, k=40)) for _ in range(500)))
    tokenizer = train_tokenizer(TokenizerParams(kind="char", vocab_size=4000, min_frequency=1), folder / "corpus.txt",
                                100, MAX_LENGTH)  # fmt: skip
    save_hf_tokenizer(tokenizer, folder / "model", MAX_LENGTH)
    vocab = tokenizer.get_vocab()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(vocab), n_positions=MAX_LENGTH, n_embd=128, n_layer=2, n_head=2,
                        bos_token_id=vocab["[CLS]"], eos_token_id=vocab["[SEP]"])  # fmt: skip
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # [SEP] scores 0 among thousands of random logits: all new tokens, on both paths
        model.lm_head.weight[vocab["[SEP]"]].zero_()
    model.save_pretrained(str(folder / "model"))
    TaskMeta(
        task="bench", dataset="bench", kind="generation", base="decoder", method="full", lora=LoraParams(),
        prompt_chars=PROMPT_CHARS, training=TrainingParams(), base_resolved="-", seed=0, dropout=None, labels=[],
        max_length=MAX_LENGTH, test_sha256="0" * 64, finetune_run_id=None,
    ).write(folder / "model" / "lmforge_task.json")  # fmt: skip
    prompts = ["".join(rng.choices(characters, k=PROMPT_CHARS)) for _ in range(PROMPTS)]
    return load_task_model(folder / "model"), prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        tm, prompts = task_model(Path(folder))
        paths = {
            "plain loop (one prompt at a time, no cache)": lambda: [generate_one_by_one(tm, p, NEW_TOKENS)
                                                                     for p in prompts],
            "lmforge generate (batched, KV cache)": lambda: generate(tm, prompts, NEW_TOKENS),
        }  # fmt: skip
        seconds: dict[str, list[float]] = {name: [] for name in paths}
        outputs = {}
        for _ in range(args.repeats):
            for name, run in paths.items():
                started = time.perf_counter()
                outputs[name] = run()
                seconds[name].append(time.perf_counter() - started)
    same = len({tuple(texts) for texts in outputs.values()}) == 1
    base = statistics.median(seconds["plain loop (one prompt at a time, no cache)"])
    rows = [{"path": name, "seconds": statistics.median(values), "runs": values,
             "new_tokens_per_s": PROMPTS * NEW_TOKENS / statistics.median(values),
             "speedup": base / statistics.median(values)} for name, values in seconds.items()]  # fmt: skip
    print(f"{PROMPTS} prompts x {NEW_TOKENS} new tokens; same outputs on both paths: {same}")
    print(f"{'path':<46} {'seconds':>8} {'tokens/s':>9} {'speed-up':>9}")
    for row in rows:
        print(f"{row['path']:<46} {row['seconds']:>8.2f} {row['new_tokens_per_s']:>9.0f} {row['speedup']:>8.1f}x")
    RESULTS.mkdir(exist_ok=True)
    machine = describe()
    (RESULTS / "generate_speed.json").write_text(json.dumps({"machine": machine, "same_outputs": same, "rows": rows},
                                                            indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
