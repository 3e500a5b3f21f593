import hashlib

import pytest
import torch

from tiedlm import data
from tiedlm.data import EOS, batchify, bptt_windows, load_corpus, num_windows, tokenize
from tiedlm.errors import TiedlmError

# docs/method.md §9: tokens with one <eos> per line (blank lines included), vocabulary with <eos>.
EXPECTED = {
    "ptb": ((929_589, 73_760, 82_430), 10_000),
    "wikitext-2": ((2_088_628, 217_646, 245_569), 33_278),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bundled_corpus_matches_spec(name):
    corpus = load_corpus(name)
    tokens, vocab = EXPECTED[name]
    assert (corpus.train.numel(), corpus.valid.numel(), corpus.test.numel()) == tokens
    assert len(corpus.vocab) == vocab
    assert corpus.vocab.unk_id is not None and EOS in corpus.vocab.stoi
    assert corpus.vocab.itos[0] == "the"  # most frequent word first


def test_bundled_checksum_mismatch_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(data, "_bundled_checksums", lambda: {"ptb/valid.txt": hashlib.sha256(b"other").hexdigest()})
    with pytest.raises(TiedlmError, match=r"ptb/valid.txt: SHA-256 .* does not match"):
        data.read_bundled("ptb", "valid")


def test_tokenize_counts_blank_lines_and_crlf():
    assert tokenize("a b\n \n\r\nc") == [["a", "b", EOS], [EOS], [EOS], ["c", EOS]]


def test_custom_corpus_maps_unknown_words_to_unk(tmp_path):
    (tmp_path / "train.txt").write_text("a b <unk>\nb a\n")
    (tmp_path / "valid.txt").write_text("a zebra\n")
    (tmp_path / "test.txt").write_text("b\n")
    corpus = load_corpus(str(tmp_path))
    assert corpus.vocab.decode(corpus.valid.tolist()) == ["a", "<unk>", EOS]


def test_unknown_word_without_unk_names_word_and_line(tmp_path):
    (tmp_path / "train.txt").write_text("a b\nb a\n")
    (tmp_path / "valid.txt").write_text("a b\nb zebra a\n")
    (tmp_path / "test.txt").write_text("b\n")
    with pytest.raises(TiedlmError, match=r"valid.txt:2: word 'zebra' is not in the training vocabulary"):
        load_corpus(str(tmp_path))


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "no such file"), (b"", "file is empty"), (b"ok\n\xff\xfe\n", r"not valid UTF-8 \(line 2")],
)
def test_bad_split_file_is_named(tmp_path, content, message):
    for split in ("train", "valid"):
        (tmp_path / f"{split}.txt").write_text("a b\n")
    if content is not None:
        (tmp_path / "test.txt").write_bytes(content)
    with pytest.raises(TiedlmError, match=rf"test.txt: {message}"):
        load_corpus(str(tmp_path))


def test_unknown_corpus_name():
    with pytest.raises(TiedlmError, match="not a bundled corpus"):
        load_corpus("no-such-corpus")


def test_batchify_lays_sequences_in_columns():
    source = batchify(torch.arange(26), 4)  # 6 rows, 2 tokens dropped
    assert source.shape == (6, 4)
    assert source[:, 1].tolist() == [6, 7, 8, 9, 10, 11]


def test_bptt_windows_cover_stream_once_with_shifted_targets():
    source = batchify(torch.arange(40), 4)  # (10, 4)
    windows = list(bptt_windows(source, 3))
    assert len(windows) == num_windows(source, 3) == 3
    inputs = torch.cat([x for x, _ in windows])
    targets = torch.cat([y for _, y in windows])
    assert torch.equal(inputs, source[:-1]) and torch.equal(targets, source[1:])
    assert [x.size(0) for x, _ in windows] == [3, 3, 3]
    assert [x.size(0) for x, _ in bptt_windows(source, 4)] == [4, 4, 1]
    assert torch.equal(next(bptt_windows(source, 3, start=2))[0], source[6:9])
