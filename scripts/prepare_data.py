"""Tokenize a corpus into token shards (train / val) ready for training.

    python scripts/prepare_data.py                       # default corpus -> data/default
    python scripts/prepare_data.py --data web/*.jsonl --tokenizer out/tokenizer.json --out data/web

Without `--tokenizer`, a BPE tokenizer of `--vocab-size` is first trained on the same documents.
The output folder holds `train_*.bin`, `val_*.bin`, `tokenizer.json` and `meta.json`; `meta.json`
is written last, so a folder that has it is complete. A folder that is already complete for the
same inputs is left as it is unless `--overwrite true`.
"""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from minillm.cli import parse_config
from minillm.errors import UserError, run_main
from minillm.corpus import read_documents
from minillm.data import prepare
from minillm.hf import load_any_tokenizer
from minillm.tokenizer import EOT, PATTERNS, train_bpe


@dataclass
class PrepareConfig:
    data: list[str] = field(default_factory=lambda: ["default"],
                            metadata={"help": "text / JSONL files or folders, or 'default'"})
    text_field: str = field(default="text", metadata={"help": "JSONL field holding the text"})
    out: str = field(default="data/default", metadata={"help": "output folder"})
    tokenizer: str | None = field(default=None, metadata={
        "help": "minillm tokenizer file or Hugging Face folder / tokenizer.json / tokenizer.model; "
                "none: train one"})
    vocab_size: int = field(default=4096, metadata={"help": "vocab of the tokenizer trained here"})
    pattern: str = field(default="gpt4", metadata={"help": "split pattern of that tokenizer"})
    val_fraction: float = field(default=0.01, metadata={"help": "share of documents held out"})
    shard_tokens: int = field(default=100_000_000, metadata={"help": "tokens per shard file"})
    workers: int = field(default=4, metadata={"help": "encoding threads"})
    overwrite: bool = field(default=False, metadata={"help": "redo a folder that is complete"})


def main():
    cfg = parse_config(PrepareConfig, description=__doc__)
    out = Path(cfg.out)
    meta_path = out / "meta.json"
    if meta_path.is_file() and not cfg.overwrite:
        meta = json.loads(meta_path.read_text())
        if meta.get("config") == vars(cfg):
            print(f"{out} is already prepared for these settings; --overwrite true to redo it")
            return
    t0 = time.perf_counter()
    if cfg.tokenizer:
        tok = load_any_tokenizer(cfg.tokenizer)
    else:
        if cfg.pattern not in PATTERNS:
            raise UserError(f"--pattern must be one of {sorted(PATTERNS)}, got {cfg.pattern!r}")
        tok = train_bpe(read_documents(cfg.data, cfg.text_field), cfg.vocab_size,
                        PATTERNS[cfg.pattern], [EOT])
        print(f"trained {tok} in {time.perf_counter() - t0:.1f} s")
    meta = prepare(read_documents(cfg.data, cfg.text_field), tok, out, cfg.val_fraction,
                   cfg.shard_tokens, cfg.workers)
    meta["config"] = vars(cfg)
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(meta_path)
    splits = meta["splits"]
    print(f"{out}: {meta['num_documents']} documents; train {splits['train']['tokens']:,} tokens in "
          f"{len(splits['train']['shards'])} shard(s), val {splits['val']['tokens']:,} tokens "
          f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    run_main(main)
