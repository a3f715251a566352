"""slimopt-pretrain's data: documents streamed into memory-mapped token shards that equal the
in-memory packing, no cap on documents, the cache reused and rebuilt when damaged, the batch
order (a seeded bijection, O(1) memory) and its exact position on resume, ``--tokenizer`` from a
local path (never a download), and bad input as one line."""
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("datasets")

from slimopt.launch import batch_order, pretrain, token_shards as shards_mod  # noqa: E402
from slimopt.launch import train_step  # noqa: E402
from slimopt.launch.data import DataError, open_corpus  # noqa: E402
from slimopt.launch.token_shards import token_shards  # noqa: E402
from slimopt.launch.tokenizer import pretrained_tokenizer, trained_bpe  # noqa: E402
import test_pretrain_contract as contract  # noqa: E402  (its cache fixture and refusal check)

SMALL = ["--preset", "tiny", "--seq-len", "32", "--batch-size", "4", "--vocab-size", "300",
         "--max-chars", "150000", "--eval-every", "3", "--eval-batches", "1", "--no-progress",
         "--rank", "8", "--update-interval", "3", "--threads", "1", "--no-tensorboard"]


def quiet(*args, **kwargs):
    pass


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with open(path, "w") as f:
        for i in range(300):
            f.write(json.dumps({"text": f"doc {i}: " + "the quick brown fox jumps " * (i % 7 + 1)
                                + "\u00e9t\u00e9 " * (i % 3)}) + "\n")
    return str(path)


cache = contract.cache  # the module's token cache fixture


def _packed(docs, tokenizer, seq_len):
    """The packing slimopt-pretrain did in memory before shards: documents joined with the
    end-of-text token, the last 2% of the documents held out, each part cut to whole blocks."""
    n_eval = max(1, int(len(docs) * 0.02))

    def pack(part):
        ids = []
        for enc in tokenizer.backend.encode_batch(part):
            ids += enc.ids + [tokenizer.eos_id]
        return torch.tensor(ids[:len(ids) // seq_len * seq_len]).view(-1, seq_len)
    return pack(docs[:-n_eval]), pack(docs[-n_eval:])


def test_shards_equal_the_in_memory_packing(corpus_file, tmp_path, monkeypatch):
    monkeypatch.setattr(shards_mod, "CHUNK_CHARS", 500)  # many chunks, documents across them
    corpus = open_corpus(corpus_file, max_chars=10**9)
    docs = list(corpus.documents())
    assert len(docs) == 300 and corpus.truncated is False
    tokenizer = trained_bpe(corpus, 300, str(tmp_path), say=quiet)
    shards = token_shards(corpus, tokenizer, str(tmp_path), say=quiet)
    assert shards.record["documents"] == 300 and shards.record["held_out_documents"] == 6
    for seq_len in (16, 7):  # one file serves every block length
        train, held = shards.blocks(seq_len)
        want_train, want_held = _packed(docs, tokenizer, seq_len)
        assert torch.equal(train[0:len(train)], want_train)
        assert torch.equal(held[0:len(held)], want_held)
        assert train.rows([3, 0, 3]).tolist() == want_train[[3, 0, 3]].tolist()
    import hashlib
    digest = hashlib.sha256()
    for doc in docs:
        digest.update(f"{len(doc)}:".encode() + doc.encode())
    assert shards.record["data_sha256"] == digest.hexdigest()
    assert np.dtype(shards.record["dtype"]) == np.uint16
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_no_cap_on_documents(tmp_path):
    """250,000 one-word documents (more than the old silent cap of 200,000): every one is
    tokenized, each followed by its end-of-text token."""
    path = tmp_path / "words.txt"
    words = ("alpha", "beta", "gamma", "delta", "omega")
    path.write_text("".join(words[i % 5] + "\n" for i in range(250_000)))
    corpus = open_corpus(str(path), max_chars=10**9)
    tokenizer = trained_bpe(corpus, 300, str(tmp_path), say=quiet)
    shards = token_shards(corpus, tokenizer, str(tmp_path), say=quiet)
    assert shards.record["documents"] == 250_000 and not shards.record["truncated"]
    tokens = np.fromfile(shards.path, dtype=np.uint16)
    assert int((tokens == tokenizer.eos_id).sum()) == 250_000


def test_max_chars_is_the_only_limit_and_is_said(corpus_file, tmp_path):
    args = pretrain.parse_args(SMALL + ["--data", corpus_file, "--max-chars", "2000",
                                        "--seq-len", "8", "--cache-dir", str(tmp_path)])
    lines = []
    from slimopt.launch.run_setup import load_data
    train, held, _ = load_data(args, lines.append)
    record = train.shards.record
    assert record["truncated"] and 2000 <= record["chars"] < 2200 and record["documents"] < 300
    assert any("cut at --max-chars 2,000" in line for line in lines), lines
    args = pretrain.parse_args(SMALL + ["--data", corpus_file, "--seq-len", "8",
                                        "--cache-dir", str(tmp_path)])
    lines.clear()
    train, _, _ = load_data(args, lines.append)
    assert train.shards.record["documents"] == 300
    assert not any("--max-chars" in line for line in lines), lines


def test_cache_is_reused_and_rebuilt_when_damaged(corpus_file, tmp_path, monkeypatch, capsys):
    corpus = open_corpus(corpus_file, max_chars=10**9)
    tokenizer = trained_bpe(corpus, 300, str(tmp_path), say=quiet)
    shards = token_shards(corpus, tokenizer, str(tmp_path), say=quiet)
    good = open(shards.path, "rb").read()
    record_path = shards.path[:-4] + ".json"
    write = shards_mod._write

    def refuse(*args):
        raise AssertionError("the cache was rewritten")
    monkeypatch.setattr(shards_mod, "_write", refuse)
    assert token_shards(corpus, tokenizer, str(tmp_path), say=quiet).record == shards.record
    monkeypatch.setattr(shards_mod, "_write", write)
    flipped = bytearray(good)
    flipped[10] ^= 1
    damages = {"flipped": lambda: open(shards.path, "wb").write(bytes(flipped)),
               "truncated": lambda: open(shards.path, "wb").write(good[:-2]),
               "missing": lambda: os.remove(shards.path),
               "record": lambda: open(record_path, "w").write("{not json")}
    for name, damage in damages.items():
        damage()
        capsys.readouterr()
        again = token_shards(corpus, tokenizer, str(tmp_path), say=quiet)
        assert f"the cache file {record_path} is unreadable" in capsys.readouterr().err, name
        assert open(again.path, "rb").read() == good, name
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_a_full_disk_while_writing_is_one_line_and_leaves_no_temp_file(corpus_file, tmp_path,
                                                                       monkeypatch):
    import errno
    corpus = open_corpus(corpus_file, max_chars=10**9)
    tokenizer = trained_bpe(corpus, 300, str(tmp_path), say=quiet)

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(shards_mod, "_boundary", full)
    with pytest.raises(DataError, match="No space left on device.*free space under --cache-dir"):
        token_shards(corpus, tokenizer, str(tmp_path), say=quiet)
    assert not [f for f in os.listdir(tmp_path) if f.startswith("tokens-")]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, 4097])
def test_the_batch_permutation_is_a_deterministic_bijection(n):
    keys = batch_order.round_keys(seed=7, epoch=0)
    perm = batch_order.permute(np.arange(n), n, keys)
    assert sorted(perm.tolist()) == list(range(n))
    assert np.array_equal(perm, batch_order.permute(np.arange(n), n, keys))
    assert np.array_equal(perm[[4 % n, 0]], batch_order.permute([4 % n, 0], n, keys))
    if n >= 64:
        other = batch_order.permute(np.arange(n), n, batch_order.round_keys(seed=7, epoch=1))
        assert not np.array_equal(perm, other)
        assert (perm == np.arange(n)).sum() < n // 8  # shuffled, not near the identity
    with pytest.raises(ValueError):
        batch_order.permute([n], n, keys)


def test_batches_cover_each_epoch_once(corpus_file, tmp_path):
    corpus = open_corpus(corpus_file, max_chars=10**9)
    tokenizer = trained_bpe(corpus, 300, str(tmp_path), say=quiet)
    train, _ = token_shards(corpus, tokenizer, str(tmp_path), say=quiet).blocks(8)
    per_epoch = len(train) // 4
    seen = np.concatenate([batch_order.batch_blocks(len(train), i, 4, 0)
                           for i in range(per_epoch)])
    assert len(set(seen.tolist())) == per_epoch * 4
    first, next_epoch = (batch_order.batch_blocks(len(train), i, 4, 0) for i in (0, per_epoch))
    assert not np.array_equal(first, next_epoch)
    reopened, _ = token_shards(corpus, tokenizer, str(tmp_path), say=quiet).blocks(8)
    for step in (0, 5, per_epoch + 2):
        assert torch.equal(batch_order.batch_at(train, step, 4, 3),
                           batch_order.batch_at(reopened, step, 4, 3))
    with pytest.raises(DataError, match="fewer than one batch"):
        batch_order.batch_at(train, 0, len(train) + 1, 0)


def test_a_resumed_run_reads_exactly_the_batches_it_would_have(tmp_path, cache, monkeypatch):
    read = []
    real = train_step.batch_at

    def recording(blocks, index, batch_size, seed):
        batch = real(blocks, index, batch_size, seed)
        read.append((index, batch.clone()))
        return batch
    monkeypatch.setattr(train_step, "batch_at", recording)
    base = SMALL + ["--cache-dir", cache, "--steps", "6", "--optimizer", "adamw"]
    pretrain.execute(base + ["--output-dir", str(tmp_path / "a")])
    straight, read[:] = list(read), []
    pretrain.execute(base + ["--output-dir", str(tmp_path / "b"), "--save-every", "2",
                             "--halt-after", "3"])
    pretrain.execute(base + ["--output-dir", str(tmp_path / "b"), "--resume",
                             str(tmp_path / "b" / "checkpoint-2.pt")])
    assert [i for i, _ in read] == [0, 1, 2, 2, 3, 4, 5]
    resumed = read[:2] + read[3:]
    assert all(i == j and torch.equal(a, b) for (i, a), (j, b) in zip(straight, resumed))


def _tiny_tokenizer(folder):
    """A byte-level BPE trained here, saved as tokenizer.json and as a save_pretrained folder
    (nothing downloaded)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["def f(x):\n    return x + 1\n" * 50, "import os\nclass A:\n"],
                            vocab_size=290, min_frequency=1, special_tokens=["</s>", "<pad>"])
    os.makedirs(folder, exist_ok=True)
    bpe.save(os.path.join(folder, "tokenizer.json"))
    fast = PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"),
                                   eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(os.path.join(folder, "hf"))
    return fast


_refused = contract._refused  # one stderr line holding every needle, exit 2, nothing trained


def test_pretrained_tokenizer_from_a_local_path(tmp_path, cache, capsys):
    fast = _tiny_tokenizer(str(tmp_path / "tok"))
    folder, file = str(tmp_path / "tok" / "hf"), str(tmp_path / "tok" / "tokenizer.json")
    for source in (folder, file):
        tokenizer = pretrained_tokenizer(source)
        assert tokenizer.vocab_size == len(fast) and tokenizer.eos_id == fast.eos_token_id
        assert tokenizer.encode_batch(["return x"]) == [fast("return x")["input_ids"]]
    base = SMALL + ["--cache-dir", cache, "--steps", "2", "--optimizer", "adamw"]
    result = pretrain.execute([a for a in base if a not in ("--vocab-size", "300")]
                              + ["--tokenizer", folder, "--output-dir", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert f"vocab {len(fast)} ({folder})" in out and result["eval_loss"] < 7
    model = torch.load(tmp_path / "o" / "checkpoint-2.pt", weights_only=True)["model"]
    assert model["model.embed_tokens.weight"].shape[0] == len(fast)
    _refused(base + ["--tokenizer", folder, "--output-dir", str(tmp_path / "p")], capsys,
             "--vocab-size 300 conflicts with --tokenizer", f"{len(fast)} tokens")
    _refused(base + ["--tokenizer", "no-such-org/no-such-tokenizer", "--output-dir",
                     str(tmp_path / "q")], capsys, "not found offline", "never downloads")


def test_bad_data_input_is_one_line(tmp_path, cache, capsys):
    garbage = tmp_path / "tokenizer.json"
    garbage.write_text("{not json")
    base = SMALL + ["--cache-dir", cache, "--steps", "2", "--output-dir", str(tmp_path / "o")]
    _refused(base + ["--tokenizer", str(garbage)], capsys, "not a readable tokenizer.json")
    from tokenizers import Tokenizer, models
    Tokenizer(models.BPE()).save(str(tmp_path / "plain.json"))
    _refused(base + ["--tokenizer", str(tmp_path / "plain.json")], capsys, "no end-of-text token")
    one = tmp_path / "one.txt"
    one.write_text("a single document\n")
    _refused(base + ["--data", str(one)], capsys, "at least two documents")
    _refused(base + ["--seq-len", "100000"], capsys, "too little text for one block")
    blocks, _ = token_shards(open_corpus(None, max_chars=150_000),
                             trained_bpe(open_corpus(None, max_chars=150_000), 300, cache,
                                         say=quiet), cache, say=quiet).blocks(32)
    with pytest.raises(IndexError):
        blocks.rows([len(blocks)])
