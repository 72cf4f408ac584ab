"""Pretrain a model on a prepared dataset, alone or under torchrun.

    python scripts/prepare_data.py                                  # data/default
    python scripts/pretrain.py --preset tiny-gpt --max-steps 300
    torchrun --nproc_per_node=8 scripts/pretrain.py --preset gpt2 --block-size 1024 \\
        --batch-size 16 --grad-accum 32 --data data/web --out-dir out/gpt2
    python scripts/pretrain.py --out-dir out/gpt2 --resume true     # continue the latest checkpoint
    python scripts/pretrain.py --moe-experts 8 --moe-top-k 1 --moe-rectify intra fill  # an MoE model
    torchrun --nproc_per_node=8 scripts/pretrain.py --moe-experts 8 --expert-parallel 4  # experts
        # sharded over groups of 4 ranks, 2 such groups data-parallel

Every field of minillm.train.TrainConfig is a flag (see --help). `--resume true` continues with the
settings saved in the checkpoint: flags given with it override them where that is safe (such as
`--max-steps` or `--lr`, each change printed); a flag that would change the model, the data stream
or the random state is refused by name.
"""


from minillm import distributed
from minillm.cli import given_fields, parse_config
from minillm.errors import run_main
from minillm.methods.rectify_router import FillInRectification, IntraGPURectification
from minillm.train import TrainConfig, Trainer
from minillm.checkpoint import resume_config


def plan_transforms(cfg: TrainConfig) -> list:
    """--moe-rectify names as Rectify-Router plan transforms, Intra-GPU first (as in the paper).
    Under --expert-parallel N, Intra-GPU uses the real ranks; its recorded device count is N (what
    a single process loading the checkpoint simulates)."""
    devices = cfg.expert_parallel if cfg.expert_parallel > 1 else cfg.moe_devices
    made = {"intra": lambda: IntraGPURectification(num_devices=devices),
            "fill": lambda: FillInRectification()}
    return [made[name]() for name in ("intra", "fill") if name in cfg.moe_rectify]


def main(argv=None):
    cfg = parse_config(TrainConfig, argv, description=__doc__)
    if cfg.resume:  # the saved run's settings, except for the flags given now
        cfg = resume_config(cfg, given_fields(TrainConfig, argv))
    dist = distributed.setup(cfg.device)
    try:
        Trainer(cfg, dist, plan_transforms=plan_transforms(cfg)).train()
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    run_main(main)
