"""Rectify-Router at small scale: tiny MoE language models with vanilla top-1 / top-2 routing and
with Intra-GPU and Fill-in Rectification, same data, same budget, capacity factor 1.0.

    python scripts/rectify_router.py                     # minutes on a laptop CPU
    python scripts/rectify_router.py --max-steps 2000 --n-embd 256 --num-experts 16

Prints, per variant: final validation loss, and the shares of dropped (token, choice) entries, of
tokens left with no expert at all, and of padding slots, averaged over the last training steps.
Every MoE layer replaces the FFN of every other block (minillm.moe.moefy_layers).
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minillm import distributed  # noqa: E402
from minillm.cli import parse_config  # noqa: E402
from minillm.corpus import stdlib_docstrings  # noqa: E402
from minillm.data import prepare  # noqa: E402
from minillm.moe import MoE, MoEConfig, moefy_layers  # noqa: E402
from minillm.rectify_router import FillInRectification, IntraGPURectification  # noqa: E402
from minillm.tokenizer import train_bpe  # noqa: E402
from minillm.train import TrainConfig, Trainer  # noqa: E402


@dataclass
class RectifyConfig:
    data_dir: str = field(default="data/rectify", metadata={"help": "prepared here if missing"})
    out_dir: str = "out/rectify_router"
    max_steps: int = 300
    n_layer: int = 4
    n_embd: int = 128
    num_experts: int = 8
    expert_hidden: int = 128
    capacity_factor: float = 1.0
    num_devices: int = 2
    dropped_when: str = field(default="all", metadata={"help": "all, any or all_but_one"})
    seed: int = 0


class RoutingStats:
    """Averages the MoE layers' routing statistics over the last `window` training steps."""

    def __init__(self, window: int = 50):
        self.window, self.rows = window, []

    def on_step_end(self, trainer, record):
        layers = [m for m in trainer.model.modules() if isinstance(m, MoE)]
        keys = ("dropped_fraction", "dropped_tokens_fraction", "padding_fraction")
        self.rows.append([sum(float(m.stats[k]) for m in layers) / len(layers) for k in keys])
        self.rows = self.rows[-self.window:]

    def mean(self):
        return [sum(col) / len(col) for col in zip(*self.rows)]


def main():
    cfg = parse_config(RectifyConfig, description=__doc__)
    data = Path(cfg.data_dir)
    if not (data / "meta.json").is_file():
        docs = list(stdlib_docstrings())
        prepare(docs, train_bpe(docs, vocab_size=2048), data, val_fraction=0.02)
    variants = {
        "top-1": (1, []),
        "top-2": (2, []),
        "top-1 + Intra-GPU": (1, ["intra"]),
        "top-1 + Fill-in": (1, ["fill"]),
        "top-1 + both": (1, ["intra", "fill"]),
    }
    dist = distributed.setup("auto")
    results = []
    for name, (k, steps) in variants.items():
        moe_cfg = MoEConfig(num_experts=cfg.num_experts, top_k=k, expert_hidden=cfg.expert_hidden,
                            capacity_factor=cfg.capacity_factor, min_capacity=1)
        transforms = [IntraGPURectification(cfg.num_devices, cfg.dropped_when) if s == "intra"
                      else FillInRectification() for s in steps]
        train_cfg = TrainConfig(data=[str(data)], out_dir=f"{cfg.out_dir}/{name.replace(' ', '')}",
                                preset="tiny-gpt", n_layer=cfg.n_layer, n_embd=cfg.n_embd,
                                block_size=128, batch_size=16, max_steps=cfg.max_steps,
                                warmup_steps=20, eval_interval=cfg.max_steps, eval_batches=20,
                                ckpt_interval=0, seed=cfg.seed, progress=False,
                                log_interval=max(cfg.max_steps // 5, 1))
        stats = RoutingStats()
        trainer = Trainer(train_cfg, dist, callbacks=[stats],
                          model_transform=lambda m: moefy_layers(m, moe_cfg, plan_transforms=transforms))
        print(f"--- {name}")
        trainer.train()
        val = trainer.evaluate()["val_loss"]
        results.append((name, val, *stats.mean()))
    print(f"\n{'variant':<22}{'val loss':>10}{'dropped entries':>17}{'dropped tokens':>16}{'padding':>9}")
    for name, val, dropped, dropped_tokens, padding in results:
        print(f"{name:<22}{val:>10.4f}{dropped:>17.3f}{dropped_tokens:>16.3f}{padding:>9.3f}")
    distributed.cleanup()


if __name__ == "__main__":
    main()
