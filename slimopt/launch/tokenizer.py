"""The run's tokenizer: a byte-level BPE trained on a bounded sample of the corpus and cached
(the default), or a pretrained one named by ``--tokenizer`` and loaded offline.

- Trained: ``tokenizers``' byte-level BPE of ``--vocab-size`` tokens, trained on the corpus's
  first ``TOKENIZER_SAMPLE_CHARS`` characters (50 million; streamed, never more), with the
  end-of-text token ``<|endoftext|>``; cached under ``--cache-dir`` by corpus, vocabulary and
  sample.
- Pretrained: ``--tokenizer PATH`` (a ``tokenizer.json`` file, or a folder saved by
  ``save_pretrained``) or ``--tokenizer NAME`` already in the Hugging Face cache, read with
  ``local_files_only=True``: nothing is downloaded; anything else is a one-line error. The
  model's vocabulary is the tokenizer's (a different ``--vocab-size`` is refused).

Either way the run holds a ``tokenizers.Tokenizer`` and the id of the token that ends each
document, and encodes without the tokenizer's own special tokens (no BOS/EOS added per text).
"""
from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass

from .cli_errors import first_line
from .data import Corpus, DataError

EOS = "<|endoftext|>"
#: the text a BPE is trained on: the corpus's first this many characters
TOKENIZER_SAMPLE_CHARS = 50_000_000
#: a bare ``tokenizer.json`` names no end-of-text token: the first of these it holds is used
EOS_NAMES = (EOS, "</s>", "<eos>", "<|end_of_text|>")


@dataclass(frozen=True)
class RunTokenizer:
    backend: object   # a tokenizers.Tokenizer
    eos_id: int       # appended after every document
    name: str         # how the run describes it

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def sha256(self) -> str:
        """The tokenizer's content digest (a checkpoint records it); the end-of-text token is
        hashed too when it is not ``<|endoftext|>``."""
        digest = hashlib.sha256()
        eos = self.backend.id_to_token(self.eos_id)
        if eos != EOS:
            digest.update(f"eos={eos}\0".encode())
        digest.update(self.backend.to_str().encode())
        return digest.hexdigest()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [enc.ids for enc in self.backend.encode_batch(texts, add_special_tokens=False)]


def note_rebuilding(path: str, err: BaseException) -> None:
    """Say on stderr that a damaged cache file is rebuilt (never silently)."""
    first = first_line(err, limit=200)
    print(f"note: the cache file {path} is unreadable ({type(err).__name__}: {first}); "
          "rebuilding it", file=sys.stderr)


def _sample(corpus: Corpus, chars: int):
    total = 0
    for doc in corpus.documents():
        yield doc
        total += len(doc)
        if total >= chars:
            return


def trained_bpe(corpus: Corpus, vocab_size: int, cache_dir: str, say=print,
                sample_chars: int = TOKENIZER_SAMPLE_CHARS) -> RunTokenizer:
    """A byte-level BPE trained on the corpus's first ``sample_chars`` characters, cached by
    corpus, vocabulary and sample (the name has no sample part when ``--max-chars`` is within
    it: the sample is then the whole corpus, as before samples existed)."""
    from tokenizers import ByteLevelBPETokenizer, Tokenizer
    whole = corpus.max_chars is not None and corpus.max_chars <= sample_chars
    name = f"bpe-{corpus.corpus_id}-{vocab_size}" + ("" if whole else f"-sample{sample_chars}")
    path = os.path.join(cache_dir, name + ".json")
    if os.path.exists(path):
        try:
            return _with_eos(Tokenizer.from_file(path), path, EOS)
        except Exception as err:  # noqa: BLE001 -- a damaged cache entry is rebuilt, and said
            note_rebuilding(path, err)
    say(f"tokenizer: training a byte-level BPE of {vocab_size:,} tokens on up to the corpus's "
        f"first {min(sample_chars, corpus.max_chars or sample_chars):,} characters (whole "
        "documents)")
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(_sample(corpus, sample_chars), vocab_size=vocab_size,
                            min_frequency=2, special_tokens=[EOS], show_progress=False)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + f".tmp{os.getpid()}"
    tok.save(tmp)
    os.replace(tmp, path)
    return _with_eos(Tokenizer.from_file(path), path, EOS)


def _with_eos(backend, name: str, eos: str | None) -> RunTokenizer:
    """``backend`` with its end-of-text token: ``eos`` when given, else the first of
    ``EOS_NAMES`` it holds."""
    for token in (eos,) if eos else EOS_NAMES:
        eos_id = backend.token_to_id(token)
        if eos_id is not None:
            return RunTokenizer(backend, eos_id, name)
    raise DataError(f"--tokenizer {name}: no end-of-text token (none of {', '.join(EOS_NAMES)}); "
                    "pass a folder saved by save_pretrained whose tokenizer_config.json sets "
                    "eos_token")


def pretrained_tokenizer(name_or_path: str) -> RunTokenizer:
    """``--tokenizer``: a ``tokenizer.json`` file, a tokenizer folder, or a name already in the
    Hugging Face cache; never downloaded."""
    if os.path.isfile(name_or_path):
        from tokenizers import Tokenizer
        try:
            backend = Tokenizer.from_file(name_or_path)
        except Exception as err:  # noqa: BLE001 -- any unreadable file is the same one line
            raise DataError(f"--tokenizer {name_or_path}: not a readable tokenizer.json "
                            f"({type(err).__name__}: {first_line(err)})") from None
        return _with_eos(backend, name_or_path, None)
    import transformers
    try:
        tok = transformers.AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    except Exception as err:  # noqa: BLE001 -- not found, not a tokenizer: the same one line
        raise DataError(f"--tokenizer {name_or_path}: not found offline ({type(err).__name__}: "
                        f"{first_line(err, limit=160)}); it must be a local tokenizer.json or "
                        "tokenizer folder, or a name already in the Hugging Face cache "
                        "(slimopt-pretrain never downloads it)") from None
    if not getattr(tok, "is_fast", False):
        raise DataError(f"--tokenizer {name_or_path}: {type(tok).__name__} is a slow (Python) "
                        "tokenizer; slimopt-pretrain needs a fast one (a folder with a "
                        "tokenizer.json)")
    if tok.eos_token is None:
        raise DataError(f"--tokenizer {name_or_path}: it has no end-of-text token; set eos_token "
                        "in its tokenizer_config.json")
    return _with_eos(tok.backend_tokenizer, name_or_path, tok.eos_token)


def run_tokenizer(args, corpus: Corpus, say=print) -> RunTokenizer:
    """``--tokenizer`` when given (then ``args.vocab_size`` becomes its vocabulary, and a
    different ``--vocab-size`` given with it is refused), else the trained BPE of
    ``--vocab-size``."""
    if not args.tokenizer:
        return trained_bpe(corpus, args.vocab_size, args.cache_dir, say)
    tokenizer = pretrained_tokenizer(args.tokenizer)
    if args.vocab_size_given and args.vocab_size != tokenizer.vocab_size:
        raise DataError(f"--vocab-size {args.vocab_size} conflicts with --tokenizer "
                        f"{args.tokenizer}, whose vocabulary has {tokenizer.vocab_size:,} tokens; "
                        "leave out --vocab-size (the model's vocabulary follows the tokenizer)")
    args.vocab_size = tokenizer.vocab_size
    return tokenizer
