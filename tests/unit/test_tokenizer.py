"""The tokenizer wrapper, the shipped tiny model and the training command."""

import subprocess
import sys

import pytest

from vespo_megatron.tasks.tiny_corpus import corpus_lines
from vespo_megatron.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    Tokenizer,
    default_corpus_path,
    default_tokenizer_path,
    load_tokenizer,
    main,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_shipped_model_ids(tok):
    assert default_tokenizer_path().is_file()
    assert tok.vocab_size == 100
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (PAD_ID, 1, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3


@pytest.mark.parametrize("text", ["12+7=19", "3*4-2=10", "Hello, world! x = 3/4", "  two  spaces ", "a\nb", ""])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_digits_are_single_pieces(tok):
    ids = tok.encode("1234+56=1290")
    assert [tok.id_to_piece(i) for i in ids] == list("1234+56=1290")
    assert tok.unk_id not in ids


def test_prompt_and_answer_encode_separately(tok):
    # The RL loop encodes the prompt and appends response ids; the result must equal encoding the joined text.
    assert tok.encode("12+7=") + tok.encode("19") == tok.encode("12+7=19")


def test_decode_drops_special_ids(tok):
    ids = [tok.bos_id] + tok.encode("5+5=10") + [tok.eos_id, tok.pad_id, tok.pad_id]
    assert tok.decode(ids) == "5+5=10"


def test_decode_rejects_out_of_range(tok):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_missing_model_names_path_and_fix(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model") as info:
        Tokenizer(missing)
    assert "python -m vespo_megatron.tokenizer" in str(info.value)


def test_shipped_corpus_is_reproducible():
    assert default_corpus_path().read_text().splitlines() == corpus_lines()


def test_retraining_reproduces_shipped_model(tmp_path, tok):
    path = train_tokenizer([default_corpus_path()], tmp_path / "again", 100, model_type="char")
    again = Tokenizer(path)
    assert [again.id_to_piece(i) for i in range(again.vocab_size)] == [
        tok.id_to_piece(i) for i in range(tok.vocab_size)
    ]


def test_train_command_in_process(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(corpus_lines(num_problems=300)) + "\n")
    assert main(["--input", str(corpus), "--output", str(tmp_path / "bpe"), "--vocab-size", "110"]) == 0
    assert "vocab_size=110" in capsys.readouterr().out
    tok = Tokenizer(tmp_path / "bpe.model")
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 2, 3, 110)
    assert [tok.id_to_piece(i) for i in tok.encode("907")] == ["9", "0", "7"]
    assert tok.decode(tok.encode("41*2=82")) == "41*2=82"


def test_train_command_as_module(tmp_path):
    out = tmp_path / "sub" / "tok"
    cmd = [sys.executable, "-m", "vespo_megatron.tokenizer", "--input", str(default_corpus_path())]
    cmd += ["--output", str(out), "--vocab-size", "100", "--model-type", "char"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert Tokenizer(out.with_suffix(".model")).vocab_size == 100


def test_too_large_vocab_is_a_clear_error(tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("1+1=2\n2+2=4\n")
    with pytest.raises(RuntimeError, match="vocab_size=500"):
        train_tokenizer([corpus], tmp_path / "m", 500)


def test_missing_training_text(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        train_tokenizer([tmp_path / "absent.txt"], tmp_path / "m", 50)
