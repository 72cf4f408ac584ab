"""torchrun worker: each rank reads its windows of a shard and saves their first tokens."""

import os
import sys
from datetime import timedelta

import numpy as np
import torch.distributed as dist

from minillm.data import TokenDataset, TokenLoader

shard, out_dir = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo", timeout=timedelta(seconds=int(os.environ["MINILLM_DIST_TIMEOUT_S"])))
loader = TokenLoader(TokenDataset(shard), block_size=10, seed=7)  # rank and world from torch.distributed
starts = loader.next_windows(loader.windows_per_rank)[:, 0]
np.save(os.path.join(out_dir, f"rank{dist.get_rank()}.npy"), starts)
dist.barrier()
dist.destroy_process_group()
