"""The text the shipped tiny tokenizer is trained from: arithmetic problems with answers, plus every ASCII character.

    python -m vespo_megatron.tasks.tiny_corpus --write-corpus vespo_megatron/assets/tiny_corpus.txt
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from vespo_megatron.tasks.arithmetic import ArithmeticTask

# Every printable ASCII character, so the shipped character tokenizer has no unknown ASCII text.
CHARSET_LINES = (
    "the quick brown fox jumps over the lazy dog",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
    "".join(chr(c) for c in range(33, 127)),
)


def corpus_lines(num_problems: int = 3000, seed: int = 1234) -> list[str]:
    """Problems joined with their answers (`"12+7=19"`) from a mix of task settings, then the charset lines."""
    mixes = [
        ArithmeticTask(max_operand=20, operators="+-", seed=seed),
        ArithmeticTask(max_operand=99, operators="+-*", allow_negative=True, seed=seed + 1),
        ArithmeticTask(max_operand=9, operators="+-*", num_operands=3, allow_negative=True, seed=seed + 2),
    ]
    lines = []
    for i in range(num_problems):
        s = mixes[i % len(mixes)].sample(i)
        lines.append(s.prompt + s.answer)
    return lines + list(CHARSET_LINES)


def write_corpus(path: str | Path, num_problems: int = 3000, seed: int = 1234) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(corpus_lines(num_problems, seed)) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vespo_megatron.tasks.tiny_corpus",
        description="Write the arithmetic text the shipped tokenizer is trained from.",
    )
    parser.add_argument("--write-corpus", required=True, metavar="PATH")
    parser.add_argument("--num-problems", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    print(f"wrote {write_corpus(args.write_corpus, args.num_problems, args.seed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
