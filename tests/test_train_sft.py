"""The trainer on supervised batches: `sft.PackedLoader` as a data source (positions and the
block-diagonal mask reach the model, loss only on responses, exact resume, evaluation)."""

import random

import pytest
import torch

from minillm.corpus import stdlib_docstrings
from minillm.distributed import DistInfo
from minillm.errors import UserError
from minillm.model import GPT, preset
from minillm.sft import IGNORE_INDEX, PackedLoader, encode_example
from minillm.tokenizer import train_bpe
from minillm.train import TrainConfig, Trainer


@pytest.fixture(scope="module")
def tok():
    return train_bpe(list(stdlib_docstrings(max_files=30)), vocab_size=300)


def examples(tok, n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        out.append(encode_example(tok, f"What is {a} plus {b}? ", f"{a} + {b} = {a + b}."))
    return out


def loader(tok, **kw):
    return PackedLoader(examples(tok, 120, 0), block_size=96, batch_size=4, pad_id=tok.eot_id,
                        seed=3, val=examples(tok, 20, 1), **kw)


def config(out, **kw):
    base = dict(out_dir=str(out), preset="tiny-llama", n_layer=2, n_embd=32, block_size=96,
                batch_size=4, max_steps=8, warmup_steps=1, log_interval=2, eval_interval=0,
                ckpt_interval=0, progress=False)
    return TrainConfig(**{**base, **kw})


def test_packed_batches_reach_the_model_with_their_positions_and_mask(tok, tmp_path):
    x, y, kwargs = loader(tok).next_batch()
    assert set(kwargs) == {"position_ids", "attn_mask"} and (y == IGNORE_INDEX).any()
    torch.manual_seed(0)
    model = GPT(preset("tiny-llama", n_layer=2, n_embd=32, block_size=96, vocab_size=tok.vocab_size))
    with torch.no_grad():
        expected = model(x, y, **kwargs).loss.item()
        assert abs(model(x, y).loss.item() - expected) > 1e-4  # the kwargs matter
    history = Trainer(config(tmp_path, max_steps=1), DistInfo(), data_source=loader(tok),
                      tokenizer=tok).train()
    assert history[0]["loss"] == pytest.approx(expected, abs=1e-6)


def test_a_supervised_run_resumes_exactly(tok, tmp_path):
    full = Trainer(config(tmp_path / "full"), DistInfo(), data_source=loader(tok), tokenizer=tok).train()

    class Kill:
        def on_step_end(self, trainer, record):
            if trainer.step == 6:
                raise KeyboardInterrupt

    first = Trainer(config(tmp_path / "split", ckpt_interval=4), DistInfo(), data_source=loader(tok),
                    tokenizer=tok, callbacks=[Kill()])
    with pytest.raises(KeyboardInterrupt):
        first.train()
    resumed = Trainer(config(tmp_path / "split", ckpt_interval=4, resume=True), DistInfo(),
                      data_source=loader(tok), tokenizer=tok)
    assert resumed.step == 4 and resumed.loader.cursor == 16
    assert [h["loss"] for h in resumed.train()] == [h["loss"] for h in full[4:]]


def test_evaluation_on_packed_validation_windows(tok, tmp_path):
    trainer = Trainer(config(tmp_path, eval_interval=4, eval_batches=2), DistInfo(),
                      data_source=loader(tok), tokenizer=tok)
    result = trainer.evaluate()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y, kwargs in trainer.loader.eval_batches(8, 0, 1):
            n = int((y != IGNORE_INDEX).sum())
            total += trainer.model(x, y, **kwargs).loss.item() * n
            count += n
    assert result["val_loss/sft"] == pytest.approx(total / count, rel=1e-6)
    ranks = [list(trainer.loader.eval_batches(8, r, 3)) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1  # every rank runs the same number of batches


def test_a_data_source_without_tokenizer_or_eval_is_refused(tok, tmp_path):
    with pytest.raises(UserError, match="needs the tokenizer"):
        Trainer(config(tmp_path), DistInfo(), data_source=loader(tok))

    class NoEval:
        names = ["x"]

    with pytest.raises(UserError, match="no eval_batches; pass --eval-interval 0"):
        Trainer(config(tmp_path, eval_interval=2), DistInfo(), data_source=NoEval(), tokenizer=tok)


def test_a_data_source_is_checked_up_front(tok, tmp_path):
    no_val = PackedLoader(examples(tok, 120, 0), block_size=96, batch_size=4, pad_id=tok.eot_id)
    with pytest.raises(UserError, match="no validation examples"):
        Trainer(config(tmp_path, eval_interval=2), DistInfo(), data_source=no_val, tokenizer=tok)
    with pytest.raises(UserError, match="the data source has world_size 2, the run 1"):
        Trainer(config(tmp_path), DistInfo(), tokenizer=tok, data_source=PackedLoader(
            examples(tok, 120, 0), block_size=96, batch_size=4, pad_id=tok.eot_id, world_size=2))
    with pytest.raises(UserError, match="the data source has block_size 96, the run 64"):
        Trainer(config(tmp_path, block_size=64), DistInfo(), data_source=loader(tok), tokenizer=tok)
