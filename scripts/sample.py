"""Sample from a saved minillm model (weights, config and tokenizer in one checkpoint file).

    python scripts/sample.py --checkpoint out/model.pt --prompt "The module" --prompt "Return"
    python scripts/sample.py --checkpoint out/model.pt --temperature 0 --max-new-tokens 50

Prompts of different lengths run as one batch with the KV cache. `--stop` ends a sample at a string.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minillm.cli import parse_config  # noqa: E402
from minillm.generate import LocalLM  # noqa: E402
from minillm.model import load_model  # noqa: E402


@dataclass
class SampleConfig:
    checkpoint: str = field(default="out/model.pt", metadata={"help": "file from save_model"})
    prompt: list[str] = field(default_factory=lambda: [""], metadata={"help": "one or more prompts"})
    num_samples: int = field(default=1, metadata={"help": "samples per prompt"})
    max_new_tokens: int = 100
    temperature: float = field(default=0.8, metadata={"help": "0 for greedy"})
    top_k: int | None = 50
    top_p: float | None = None
    stop: list[str] = field(default_factory=list, metadata={"help": "stop strings"})
    seed: int = 0
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu")


def main():
    cfg = parse_config(SampleConfig, description=__doc__)
    model, tokenizer, _ = load_model(cfg.checkpoint, device=cfg.device)
    if tokenizer is None:
        sys.exit(f"{cfg.checkpoint} carries no tokenizer: save it with save_model(..., tokenizer)")
    lm = LocalLM(model, tokenizer)
    prompts = [p for p in cfg.prompt for _ in range(cfg.num_samples)]
    outputs = lm.generate(prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                          cfg.stop, cfg.seed)
    for prompt, out in zip(prompts, outputs):
        print(f"--- {prompt!r}\n{prompt}{out}")


if __name__ == "__main__":
    main()
