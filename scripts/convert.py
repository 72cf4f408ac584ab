"""Convert between Hugging Face model folders and minillm checkpoints, both ways.

    python scripts/convert.py --source path/to/hf-folder --dest out/model.pt
    python scripts/convert.py --source out/model.pt --dest out/hf-folder --dtype bfloat16

A folder as `--source` is read as Hugging Face (GPT2LMHeadModel or LlamaForCausalLM, with its
tokenizer.json or tokenizer.model) and written as one self-contained minillm checkpoint (weights,
config, tokenizer). A file as `--source` (a `save_model` file or a training `ckpt_*.pt`) is written
as a Hugging Face folder that `transformers` loads: config.json, model.safetensors, tokenizer, and
the tokenizer's bos / eos ids in config.json.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch

from minillm.cli import parse_config
from minillm.errors import UserError, run_main
from minillm.hf import load_hf, load_hf_tokenizer, save_hf
from minillm.checkpoint import load_model, save_model

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ConvertConfig:
    source: str = field(default="", metadata={"help": "Hugging Face folder or minillm checkpoint"})
    dest: str = field(default="", metadata={"help": "minillm checkpoint file or Hugging Face folder"})
    dtype: str | None = field(default=None, metadata={"help": "float32, bfloat16 or float16; "
                                                               "default: keep the source's"})


def main(argv=None):
    cfg = parse_config(ConvertConfig, argv, description=__doc__)
    if not cfg.source or not cfg.dest:
        raise UserError("both --source and --dest are required (see --help)")
    if cfg.dtype is not None and cfg.dtype not in DTYPES:
        raise UserError(f"--dtype {cfg.dtype!r} is not one of {', '.join(DTYPES)}")
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
    source, dest = Path(cfg.source), Path(cfg.dest)
    if not source.exists():
        raise UserError(f"--source {source}: no such file or folder")
    if source.is_dir():
        if dest.is_dir():
            raise UserError(f"--dest {dest} is a folder; a Hugging Face folder converts to one "
                            "checkpoint file (e.g. --dest out/model.pt)")
        model = load_hf(source, dtype=dtype)
        has_tokenizer = (source / "tokenizer.json").is_file() or (source / "tokenizer.model").is_file()
        tok = load_hf_tokenizer(source) if has_tokenizer else None
        if tok is None:
            print(f"note: {source} has no tokenizer; the checkpoint will carry none")
        dest.parent.mkdir(parents=True, exist_ok=True)
        save_model(dest, model, tok)
        print(f"{source} -> {dest} ({model.num_params() / 1e6:.1f}M parameters)")
    else:
        if dest.is_file():
            raise UserError(f"--dest {dest} is a file; a checkpoint converts to a Hugging Face folder")
        model, tok, _ = load_model(source)
        save_hf(model, dest, dtype=dtype, tokenizer=tok)
        print(f"{source} -> {dest} (Hugging Face layout)")


if __name__ == "__main__":
    run_main(main)
