"""Train a byte-level BPE tokenizer and save it to one JSON file.

    python scripts/train_tokenizer.py --data default --vocab-size 4096 --out out/tokenizer.json
    python scripts/train_tokenizer.py --data my_corpus/ --vocab-size 32768 --pattern gpt4

`--data` takes text files, JSONL files (field `--text-field`), folders of them, or `default` (the
standard library's docstrings, no download). `--max-mb` caps how much text is used for training.
"""

import time
from dataclasses import dataclass, field
from pathlib import Path

from minillm.cli import parse_config
from minillm.errors import UserError, run_main
from minillm.corpus import read_documents
from minillm.tokenizer import EOT, PATTERNS, train_bpe


@dataclass
class TokenizerConfig:
    data: list[str] = field(default_factory=lambda: ["default"],
                            metadata={"help": "text / JSONL files or folders, or 'default'"})
    text_field: str = field(default="text", metadata={"help": "JSONL field holding the text"})
    vocab_size: int = field(default=4096, metadata={"help": "total ids incl. 256 bytes and specials"})
    pattern: str = field(default="gpt4", metadata={"help": "split pattern: gpt2 or gpt4"})
    special_tokens: list[str] = field(default_factory=lambda: [EOT],
                                      metadata={"help": "special tokens, given the last ids"})
    max_mb: float = field(default=100.0, metadata={"help": "train on at most this many MB of text"})
    out: str = field(default="out/tokenizer.json", metadata={"help": "output file"})


def take_megabytes(docs, max_mb: float):
    """Documents until `max_mb` megabytes (of UTF-8) have been yielded."""
    budget = int(max_mb * 1e6)
    for doc in docs:
        if budget <= 0:
            return
        budget -= len(doc.encode("utf-8"))
        yield doc


def train_from_config(cfg: TokenizerConfig):
    if cfg.pattern not in PATTERNS:
        raise UserError(f"--pattern must be one of {sorted(PATTERNS)}, got {cfg.pattern!r}")
    docs = take_megabytes(read_documents(cfg.data, cfg.text_field), cfg.max_mb)
    return train_bpe(docs, cfg.vocab_size, PATTERNS[cfg.pattern], cfg.special_tokens)


def main():
    cfg = parse_config(TokenizerConfig, description=__doc__)
    t0 = time.perf_counter()
    tok = train_from_config(cfg)
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    tok.save(cfg.out)
    print(f"trained {tok} in {time.perf_counter() - t0:.1f} s -> {cfg.out}")


if __name__ == "__main__":
    run_main(main)
