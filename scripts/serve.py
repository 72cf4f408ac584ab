"""Serve a minillm model over an OpenAI-compatible HTTP API (minillm.serve), until Ctrl-C.

    python scripts/serve.py --checkpoint out/quickstart/model.pt --served-model-name tiny
    python scripts/serve.py --hf path/to/hf-folder --device cuda --dtype bfloat16 --port 8001

Then any OpenAI client talks to http://127.0.0.1:8000/v1 (see README, "Serve"). Requests are
batched continuously (`--max-batch` rows at once, `--max-queue` requests waiting, 503 beyond);
`--port 0` takes a free port and prints it.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch

from minillm.checkpoint import load_model
from minillm.cli import parse_config
from minillm.errors import UserError, run_main
from minillm.hf import load_hf, load_hf_tokenizer
from minillm.serve import Engine, serve_forever

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ServeConfig:
    checkpoint: str | None = field(default=None, metadata={
        "help": "a minillm model file (save_model, or a training ckpt_*.pt) with its tokenizer"})
    hf: str | None = field(default=None, metadata={
        "help": "a Hugging Face model folder (config.json, weights, tokenizer) instead"})
    served_model_name: str | None = field(default=None, metadata={
        "help": "the name clients send as `model`; default: --checkpoint or --hf as given"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8000, metadata={"help": "0: a free port (printed)"})
    max_batch: int = field(default=16, metadata={"help": "sequences generated at once"})
    max_queue: int = field(default=64, metadata={"help": "requests waiting for rows; more: 503"})
    context_length: int = field(default=0, metadata={
        "help": "prompt + max_tokens limit; 0: the model's block_size"})
    chat_template: str = field(default="auto", metadata={
        "help": "auto (chatml if the tokenizer has <|im_start|> / <|im_end|>, else plain), "
                "chatml or plain"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu, cuda"})
    dtype: str | None = field(default=None, metadata={
        "help": "float32, bfloat16 or float16; default: the checkpoint's"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})
    log_level: str = field(default="info", metadata={"help": "uvicorn's: warning, info, debug"})


def load(cfg: ServeConfig, device: str, dtype):
    """(model, tokenizer, default name) from --checkpoint or --hf."""
    if cfg.checkpoint:
        if not Path(cfg.checkpoint).is_file():
            raise UserError(f"--checkpoint {cfg.checkpoint}: no such file")
        model, tokenizer, _ = load_model(cfg.checkpoint, device=device)
        if dtype is not None:
            model = model.to(dtype)
        source = cfg.checkpoint
    else:
        if not Path(cfg.hf).is_dir():
            raise UserError(f"--hf {cfg.hf}: no such folder")
        model = load_hf(cfg.hf, device=device, dtype=dtype)
        folder = Path(cfg.hf)
        has_tokenizer = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
        tokenizer = load_hf_tokenizer(folder) if has_tokenizer else None
        source = cfg.hf
    if tokenizer is None:
        raise UserError(f"{source} carries no tokenizer, which serving text needs")
    return model, tokenizer, source


def check(cfg: ServeConfig) -> tuple[str, torch.dtype | None]:
    if (cfg.checkpoint is None) == (cfg.hf is None):
        raise UserError("give one of --checkpoint FILE and --hf FOLDER")
    for name in ("max_batch", "max_queue"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least 1")
    if cfg.context_length < 0 or cfg.threads < 0:
        raise UserError("--context-length and --threads must be at least 0 (0: the default)")
    if not 0 <= cfg.port < 65536:
        raise UserError(f"--port {cfg.port}: expected 0-65535")
    if cfg.dtype is not None and cfg.dtype not in DTYPES:
        raise UserError(f"--dtype {cfg.dtype!r}: expected one of {', '.join(DTYPES)}")
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.split(":")[0] not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is visible; pass --device cpu or auto")
    return device, getattr(torch, cfg.dtype) if cfg.dtype else None


def main(argv=None):
    cfg = parse_config(ServeConfig, argv, description=__doc__)
    device, dtype = check(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tokenizer, source = load(cfg, device, dtype)
    name = cfg.served_model_name or source
    engine = Engine(model, tokenizer, name, cfg.context_length or None, cfg.max_batch,
                    cfg.max_queue, cfg.chat_template)

    def announce(url):
        print(f"serving {name!r} ({model.num_params() / 1e6:.2f}M parameters, {device}, context "
              f"{engine.context_length}, {engine.template.kind} chat template) at {url}",
              flush=True)
    serve_forever(engine, cfg.host, cfg.port, cfg.log_level, announce)


if __name__ == "__main__":
    run_main(main)
