"""A thin SentencePiece tokenizer, its trainer and the shipped tiny model.

The shipped model (`assets/tiny_sp.model`) is a character model over printable ASCII plus newline, trained from
`assets/tiny_corpus.txt` (arithmetic problems in the exact prompt format of the arithmetic task). Every digit,
operator and `=` is its own piece, so `"12+7="` is five tokens and the encoding of a prompt followed by the
encoding of its answer equals the encoding of the joined text. See docs/tasks.md for the training command.

Special ids are fixed for every model this module trains: pad 0, unk 1, bos 2, eos 3.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
ASSETS_DIR = Path(__file__).parent / "assets"
TINY_MODEL_NAME = "tiny_sp.model"
TINY_CORPUS_NAME = "tiny_corpus.txt"
TRAIN_COMMAND = "python -m vespo_megatron.tokenizer --input CORPUS.txt --output PREFIX --vocab-size N"


def default_tokenizer_path() -> Path:
    """Path of the tiny tokenizer shipped with the package (100 pieces, for CPU demos and tests)."""
    return ASSETS_DIR / TINY_MODEL_NAME


def default_corpus_path() -> Path:
    """Path of the text the shipped tokenizer is trained from."""
    return ASSETS_DIR / TINY_CORPUS_NAME


class RunTokenizer(Protocol):
    """What the RL loop uses of a tokenizer: :class:`Tokenizer` (sentencepiece) and
    :class:`~vespo_megatron.models.hf_tokenizer.HFTokenizer` both provide it."""

    bos_id: int
    eos_id: int
    pad_id: int
    stop_ids: list[int]
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def encode_prompt(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class Tokenizer:
    """SentencePiece model with the ids the RL loop needs: `bos_id`, `eos_id`, `pad_id`.

    `encode` adds no bos/eos; callers place them. `decode` drops pad/bos/eos/unk control ids.
    """

    def __init__(self, model_path: str | Path):
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(
                f"tokenizer model {str(self.model_path)!r} does not exist; train one with `{TRAIN_COMMAND}` "
                f"(or `vespo-megatron train-tokenizer ...`), or use the shipped model at {default_tokenizer_path()}"
            )
        self._sp = spm.SentencePieceProcessor(model_file=str(self.model_path))
        for name, value in (("bos", self._sp.bos_id()), ("eos", self._sp.eos_id()), ("pad", self._sp.pad_id())):
            if value < 0:
                raise ValueError(
                    f"tokenizer model {str(self.model_path)!r} has no {name} id ({name}_id=-1); the RL loop needs "
                    f"bos, eos and pad. Retrain it with `{TRAIN_COMMAND}`, which reserves pad=0 unk=1 bos=2 eos=3"
                )

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end a response (eos)."""
        return [self.eos_id]

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt as the model sees it: bos, then the text."""
        return [self.bos_id] + self.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(
                f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size}) of {self.model_path}"
            )
        return self._sp.decode(ids)

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size})"


def load_tokenizer(model_path: str | Path | None = None) -> Tokenizer:
    """The tokenizer at `model_path`, or the shipped tiny one when it is None."""
    return Tokenizer(default_tokenizer_path() if model_path is None else model_path)


def load_run_tokenizer(config) -> RunTokenizer:
    """The run's tokenizer: ``task.tokenizer`` (a sentencepiece file or an HF folder), else
    ``model.hf_path``'s tokenizer when that folder has one, else the shipped tiny model."""
    from vespo_megatron.models.hf_tokenizer import HFTokenizer, has_tokenizer

    chosen = config.task.tokenizer
    if chosen is not None and Path(chosen).is_dir():
        return HFTokenizer(chosen, chat_template=config.task.chat_template)
    if chosen is None and config.model.hf_path and has_tokenizer(config.model.hf_path):
        return HFTokenizer(config.model.hf_path, chat_template=config.task.chat_template)
    if config.task.chat_template:
        raise ValueError(f"task.chat_template=true needs a Hugging Face tokenizer, but the run uses the sentencepiece "
                         f"model {chosen or default_tokenizer_path()}; point task.tokenizer or model.hf_path at an "
                         "HF folder with tokenizer files")
    return load_tokenizer(chosen)


def train_tokenizer(
    text_files: Sequence[str | Path],
    model_prefix: str | Path,
    vocab_size: int,
    *,
    model_type: str = "bpe",
    split_digits: bool = True,
    character_coverage: float = 1.0,
    user_defined_symbols: Sequence[str] = ("\n",),
    num_threads: int = 1,
    quiet: bool = True,
) -> Path:
    """Train a SentencePiece model; write `<model_prefix>.model` and `.vocab`; return the `.model` path.

    Text is kept as is (identity normalisation, no dummy prefix, spaces kept) so decode(encode(x)) == x for text
    made of known characters. One thread and no sentence sampling make the result depend only on the input.
    For `model_type="char"` sentencepiece takes the vocabulary from the characters seen and ignores vocab_size.
    """
    files = [Path(f) for f in text_files]
    if not files:
        raise ValueError("train_tokenizer needs at least one text file in text_files")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"tokenizer training text {str(f)!r} does not exist")
    if model_type not in ("bpe", "unigram", "char"):
        raise ValueError(f"model_type={model_type!r} is not supported; use one of 'bpe', 'unigram', 'char'")
    prefix = Path(str(model_prefix).removesuffix(".model"))
    prefix.parent.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            input=",".join(str(f) for f in files),
            model_prefix=str(prefix),
            vocab_size=int(vocab_size),
            model_type=model_type,
            split_digits=split_digits,
            character_coverage=character_coverage,
            user_defined_symbols=list(user_defined_symbols),
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=num_threads,
            minloglevel=2 if quiet else 0,
        )
    except RuntimeError as err:
        raise RuntimeError(
            f"sentencepiece could not train a {model_type} model with vocab_size={vocab_size} from "
            f"{[str(f) for f in files]}: {err}"
        ) from err
    return prefix.with_suffix(".model")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m vespo_megatron.tokenizer",
        description="Train a SentencePiece tokenizer with pad=0 unk=1 bos=2 eos=3 and digits split into pieces.",
    )
    parser.add_argument("--input", nargs="+", required=True, help="one or more plain-text files, one sentence a line")
    parser.add_argument("--output", required=True, help="model prefix; writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, required=True, help="number of pieces, special ids included")
    parser.add_argument("--model-type", default="bpe", choices=("bpe", "unigram", "char"))
    parser.add_argument("--no-split-digits", action="store_true", help="let digits merge into multi-digit pieces")
    parser.add_argument("--num-threads", type=int, default=1, help="more threads train faster, less reproducibly")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    path = train_tokenizer(
        args.input,
        args.output,
        args.vocab_size,
        model_type=args.model_type,
        split_digits=not args.no_split_digits,
        num_threads=args.num_threads,
    )
    tok = Tokenizer(path)
    print(f"wrote {path} (vocab_size={tok.vocab_size}, pad={tok.pad_id}, bos={tok.bos_id}, eos={tok.eos_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
