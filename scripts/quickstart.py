"""The main job: from raw text to a trained GPT and samples, on a laptop CPU in a few minutes.

    python scripts/quickstart.py            # about 2 minutes on 2 CPU cores
    python scripts/quickstart.py --tiny true  # seconds: a smoke run

1. trains a BPE tokenizer on the embedded default corpus (the standard library's docstrings) and
   writes token shards (skipped when the dataset folder is already complete);
2. samples from the untrained model, trains a small GPT with a progress bar and a log line every
   `--log-interval` steps, samples again;
3. leaves `model.pt` (weights + config + tokenizer), checkpoints, `metrics.jsonl` and `loss.png`
   (or a printed loss table when matplotlib is absent) in `--out-dir`.
"""

from dataclasses import dataclass, field
from pathlib import Path

from minillm import distributed
from minillm.cli import parse_config
from minillm.errors import run_main
from minillm.corpus import stdlib_docstrings
from minillm.data import prepare
from minillm.generate import LocalLM
from minillm.checkpoint import save_model
from minillm.plotting import loss_table, plot_metrics, read_metrics
from minillm.tokenizer import train_bpe
from minillm.train import TrainConfig, Trainer

PROMPTS = ["Return the", "This module provides"]


@dataclass
class QuickstartConfig:
    out_dir: str = field(default="out/quickstart", metadata={"help": "model, checkpoints, metrics"})
    data_dir: str = field(default="data/default", metadata={"help": "where the shards are written"})
    max_steps: int = 500
    tiny: bool = field(default=False, metadata={"help": "a seconds-long smoke run"})
    seed: int = 0


def main(argv=None):
    cfg = parse_config(QuickstartConfig, argv, description=__doc__)
    data_dir, out_dir = Path(cfg.data_dir), Path(cfg.out_dir)
    if not (data_dir / "meta.json").is_file():
        docs = list(stdlib_docstrings(max_files=40 if cfg.tiny else None))
        print(f"training a tokenizer on {len(docs)} standard-library docstrings ...")
        tok = train_bpe(docs, vocab_size=512 if cfg.tiny else 4096)
        prepare(docs, tok, data_dir, val_fraction=0.02)
    train_cfg = TrainConfig(data=[str(data_dir)], out_dir=str(out_dir), preset="tiny-gpt",
                            block_size=32 if cfg.tiny else 128, batch_size=16,
                            max_steps=20 if cfg.tiny else cfg.max_steps,
                            warmup_steps=5 if cfg.tiny else 50, eval_interval=10 if cfg.tiny else 100,
                            ckpt_interval=10 if cfg.tiny else 250, log_interval=5 if cfg.tiny else 50,
                            seed=cfg.seed, overwrite=True)  # a rerun starts over
    trainer = Trainer(train_cfg, distributed.setup("auto"))
    lm = LocalLM(trainer.model, trainer.tokenizer)
    new_tokens = 16 if cfg.tiny else 40
    print(f"model: {trainer.model.num_params() / 1e6:.2f}M parameters; samples before training:")
    for prompt, out in zip(PROMPTS, lm.generate(PROMPTS, new_tokens, temperature=0.8, top_k=40, seed=0)):
        print(f"  {prompt!r} -> {out!r}")
    trainer.train()
    print("samples after training:")
    for prompt, out in zip(PROMPTS, lm.generate(PROMPTS, new_tokens, temperature=0.8, top_k=40, seed=0)):
        print(f"  {prompt!r} -> {out!r}")
    save_model(out_dir / "model.pt", trainer.model, trainer.tokenizer)
    print(f"saved {out_dir / 'model.pt'}; sample more with "
          f"python scripts/sample.py --checkpoint {out_dir / 'model.pt'}")
    if plot_metrics(out_dir / "metrics.jsonl", out_dir / "loss.png"):
        print(f"loss plot: {out_dir / 'loss.png'}")
    else:
        print("losses (pip install matplotlib for loss.png):")
        print(loss_table(read_metrics(out_dir / "metrics.jsonl")))


if __name__ == "__main__":
    run_main(main)
