"""Pretrain a model on a prepared dataset, alone or under torchrun.

    python scripts/prepare_data.py                                  # data/default
    python scripts/pretrain.py --preset tiny-gpt --max-steps 300
    torchrun --nproc_per_node=8 scripts/pretrain.py --preset gpt2 --block-size 1024 \\
        --batch-size 16 --grad-accum 32 --data data/web --out-dir out/gpt2
    python scripts/pretrain.py --resume true                        # continue the latest checkpoint

Every field of minillm.train.TrainConfig is a flag (see --help).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minillm import distributed  # noqa: E402
from minillm.cli import parse_config  # noqa: E402
from minillm.train import TrainConfig, Trainer  # noqa: E402


def main():
    cfg = parse_config(TrainConfig, description=__doc__)
    dist = distributed.setup(cfg.device)
    try:
        Trainer(cfg, dist).train()
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    main()
