"""Sample from a saved minillm model (weights, config and tokenizer in one checkpoint file).

    python scripts/sample.py --checkpoint out/quickstart/model.pt --prompt "The module" --prompt "Return"
    python scripts/sample.py --checkpoint out/run/ckpt_0000300.pt --temperature 0 --max-new-tokens 50
    python scripts/sample.py                     # the newest model.pt / ckpt_*.pt under out/

Prompts of different lengths run as one batch with the KV cache. `--stop` ends a sample at a string.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minillm.cli import parse_config
from minillm.errors import UserError, run_main
from minillm.generate import LocalLM
from minillm.checkpoint import load_model


@dataclass
class SampleConfig:
    checkpoint: str | None = field(default=None, metadata={
        "help": "file from save_model or a training ckpt_*.pt; default: the newest under out/"})
    prompt: list[str] = field(default_factory=lambda: [""], metadata={"help": "one or more prompts"})
    num_samples: int = field(default=1, metadata={"help": "samples per prompt"})
    max_new_tokens: int = 100
    temperature: float = field(default=0.8, metadata={"help": "0 for greedy"})
    top_k: int | None = 50
    top_p: float | None = None
    stop: list[str] = field(default_factory=list, metadata={"help": "stop strings"})
    seed: int = 0
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu or cuda"})


def newest_checkpoint(root: Path = Path("out")) -> Path:
    """The most recently written model.pt or ckpt_*.pt in a run folder under `root`."""
    found = [*root.glob("*/model.pt"), *root.glob("*/ckpt_*.pt")]
    if not found:
        raise UserError(f"no --checkpoint given and no model.pt or ckpt_*.pt under {root}/: pass "
                        "--checkpoint FILE (scripts/quickstart.py writes out/quickstart/model.pt)")
    return max(found, key=lambda p: p.stat().st_mtime)


def check(cfg: SampleConfig) -> str:
    """The device to run on; every out-of-range flag is a UserError."""
    if cfg.num_samples < 1 or cfg.max_new_tokens < 1:
        raise UserError("--num-samples and --max-new-tokens must be at least 1")
    if cfg.temperature < 0:
        raise UserError(f"--temperature {cfg.temperature}: must be >= 0 (0 is greedy)")
    if cfg.top_k is not None and cfg.top_k < 1:
        raise UserError(f"--top-k {cfg.top_k}: must be at least 1")
    if cfg.top_p is not None and not 0 < cfg.top_p <= 1:
        raise UserError(f"--top-p {cfg.top_p}: must be in (0, 1]")
    device = cfg.device
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is visible; pass --device cpu or auto")
    return device


def main(argv=None):
    cfg = parse_config(SampleConfig, argv, description=__doc__)
    device = check(cfg)
    if cfg.checkpoint is None:
        cfg.checkpoint = str(newest_checkpoint())
        print(f"no --checkpoint given; sampling from {cfg.checkpoint}, the newest under out/",
              file=sys.stderr)
    if not Path(cfg.checkpoint).is_file():
        raise UserError(f"--checkpoint {cfg.checkpoint}: no such file")
    model, tokenizer, _ = load_model(cfg.checkpoint, device=device)
    if tokenizer is None:
        raise UserError(f"{cfg.checkpoint} carries no tokenizer: save it with save_model(..., tokenizer)")
    for p in cfg.prompt:
        try:
            tokenizer.encode(p)
        except ValueError as e:  # a special token's string in the prompt
            raise UserError(f"--prompt {p!r}: {e}") from None
    lm = LocalLM(model, tokenizer)
    prompts = [p for p in cfg.prompt for _ in range(cfg.num_samples)]
    try:
        outputs = lm.generate(prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                              cfg.stop, cfg.seed)
    except ValueError as e:  # a prompt too long for the model's block size
        raise UserError(str(e)) from None
    for prompt, out in zip(prompts, outputs):
        print(f"--- {prompt!r}\n{prompt}{out}")


if __name__ == "__main__":
    run_main(main)
