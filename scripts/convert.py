"""Convert between Hugging Face model folders and minillm checkpoints, both ways.

    python scripts/convert.py --source path/to/hf-folder --dest out/model.pt
    python scripts/convert.py --source out/model.pt --dest out/hf-folder --dtype bfloat16

A folder as `--source` is read as Hugging Face (GPT2LMHeadModel or LlamaForCausalLM, with its
tokenizer.json or tokenizer.model) and written as one self-contained minillm checkpoint (weights,
config, tokenizer). A file as `--source` (a `save_model` file or a training `ckpt_*.pt`) is written
as a Hugging Face folder that `transformers` loads: config.json, model.safetensors, tokenizer.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minillm.cli import parse_config  # noqa: E402
from minillm.hf import load_hf, load_hf_tokenizer, save_hf, save_hf_tokenizer  # noqa: E402
from minillm.model import load_model, save_model  # noqa: E402


@dataclass
class ConvertConfig:
    source: str = field(default="", metadata={"help": "Hugging Face folder or minillm checkpoint"})
    dest: str = field(default="", metadata={"help": "minillm checkpoint file or Hugging Face folder"})
    dtype: str | None = field(default=None, metadata={"help": "float32, bfloat16 or float16; "
                                                               "default: keep the source's"})


def main(argv=None):
    cfg = parse_config(ConvertConfig, argv, description=__doc__)
    if not cfg.source or not cfg.dest:
        sys.exit("both --source and --dest are required")
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
    source = Path(cfg.source)
    if source.is_dir():
        model = load_hf(source, dtype=dtype)
        try:
            tok = load_hf_tokenizer(source)
        except FileNotFoundError:
            tok = None
            print(f"note: {source} has no tokenizer; the checkpoint will carry none")
        Path(cfg.dest).parent.mkdir(parents=True, exist_ok=True)
        save_model(cfg.dest, model, tok)
        print(f"{source} -> {cfg.dest} ({model.num_params() / 1e6:.1f}M parameters)")
    else:
        model, tok, _ = load_model(source)
        save_hf(model, cfg.dest, dtype=dtype)
        if tok is not None:
            save_hf_tokenizer(tok, cfg.dest)
        print(f"{source} -> {cfg.dest} (Hugging Face layout)")


if __name__ == "__main__":
    main()
