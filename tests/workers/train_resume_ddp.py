"""torchrun worker: with two ranks and two domains, a run interrupted after its checkpoint and
resumed gives the same losses as an uninterrupted run (each rank resumes its own loader state)."""

import sys

from minillm import distributed
from minillm.train import TrainConfig, Trainer

data, out = sys.argv[1], sys.argv[2]
dist = distributed.setup("cpu")


def cfg(out_dir, **kw):
    return TrainConfig(data=[f"a={data}:2", f"b={data}:1"], out_dir=out_dir, preset="tiny-gpt",
                       block_size=16, batch_size=2, grad_accum=2, max_steps=6, warmup_steps=1,
                       eval_interval=0, ckpt_interval=3, progress=False, **kw)


full = [r["loss"] for r in Trainer(cfg(f"{out}/full"), dist).train()]


class StopAfter4:
    def on_step_end(self, trainer, record):
        if trainer.step == 4:
            raise KeyboardInterrupt


try:
    Trainer(cfg(f"{out}/split"), dist, callbacks=[StopAfter4()]).train()
except KeyboardInterrupt:
    pass
resumed = Trainer(cfg(f"{out}/split", resume=True), dist)
assert resumed.step == 3, resumed.step
tail = [r["loss"] for r in resumed.train()]
assert tail == full[3:], (tail, full[3:])
distributed.cleanup()
if dist.is_main:
    print("OK")
