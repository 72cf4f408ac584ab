"""torchrun worker: an SSD run under DDP (switching dense -> sparse -> dense); rank 0 saves the
final parameters and the phase of every step."""

import json
import sys

import torch

from minillm import distributed
from minillm.model import preset
from minillm.methods.ssd import SSD, SSDConfig
from minillm.train import TrainConfig, Trainer

data, out = sys.argv[1], sys.argv[2]
dist = distributed.setup("cpu")
cfg = TrainConfig(data=[data], out_dir=out, block_size=32, batch_size=2, grad_accum=4, max_steps=12,
                  warmup_steps=1, eval_interval=0, ckpt_interval=0, progress=False)
ssd = SSD(SSDConfig(num_experts=4, top_k=2, check_interval=2, stable_ari=-1.0, drift_ari=-1.0,
                    min_dense_steps=4, redense_steps=2, sparse_steps=4, final_dense_steps=2,
                    kmeans_iters=5))
model_config = preset("tiny-gpt", vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=32,
                      activation="relu")
trainer = Trainer(cfg, dist, callbacks=[ssd], model_config=model_config)
history = trainer.train()
summary = ssd.summary(trainer)  # a collective: FLOPs summed over the ranks
if dist.is_main:
    torch.save(trainer.model.state_dict(), f"{out}/final.pt")
    with open(f"{out}/phases.json", "w") as f:
        json.dump({"sparse": [h["ssd_sparse"] for h in history], "loss": [h["loss"] for h in history],
                   "flops": summary["flops"]["executed"],
                   "useful": summary["flops"]["useful"]}, f)
distributed.cleanup()
