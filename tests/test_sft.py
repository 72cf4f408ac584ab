import pytest
import torch
import torch.nn.functional as F

from minillm.sft import IGNORE_INDEX, attention_mask, encode_example, pack
from minillm.tokenizer import train_bpe


@pytest.fixture(scope="module")
def tok():
    return train_bpe(["question: what is two plus two? answer: four."] * 4, vocab_size=300)


def test_loss_only_on_response_and_end_of_text(tok):
    inputs, targets = encode_example(tok, "question: what?", " answer: four.")
    prompt = tok.encode_ordinary("question: what?")
    response = tok.encode_ordinary(" answer: four.")
    assert inputs == prompt + response
    assert targets == [IGNORE_INDEX] * (len(prompt) - 1) + response + [tok.eot_id]


def test_packing_keeps_every_example_in_order(tok):
    examples = [encode_example(tok, f"q{i}", " a" * (i + 1)) for i in range(8)]
    batch = pack(examples, block_size=16, pad_id=0)
    assert batch.stats == {"examples": 8, "truncated": 0, "dropped": 0}
    got = []
    for row in range(batch.inputs.shape[0]):
        for seg in batch.segment_ids[row].unique().tolist():
            if seg == 0:
                assert (batch.targets[row][batch.segment_ids[row] == 0] == IGNORE_INDEX).all()
                continue
            sel = batch.segment_ids[row] == seg
            got.append((batch.inputs[row][sel].tolist(), batch.targets[row][sel].tolist()))
            assert batch.position_ids[row][sel].tolist() == list(range(int(sel.sum())))
    assert got == [(list(x), list(y)) for x, y in examples]


def test_long_examples_are_truncated_and_promptonly_ones_dropped(tok):
    long = encode_example(tok, "q", " a" * 40)
    prompt_only = encode_example(tok, "a long prompt " * 10, "four")
    batch = pack([long, prompt_only], block_size=8, pad_id=0)
    assert batch.stats == {"examples": 1, "truncated": 2, "dropped": 1}
    assert batch.inputs.shape == (1, 8)


def test_block_diagonal_mask_equals_attention_per_example():
    torch.manual_seed(0)
    lengths = [5, 3, 6]
    pieces = [torch.randn(1, 2, n, 8) for n in lengths]  # (B, heads, T, head_dim)
    T = 16
    q_BHTD = torch.zeros(1, 2, T, 8)
    q_BHTD[:, :, :14] = torch.cat(pieces, dim=2)
    segments = torch.tensor([[1] * 5 + [2] * 3 + [3] * 6 + [0] * 2])
    packed = F.scaled_dot_product_attention(q_BHTD, q_BHTD, q_BHTD, attn_mask=attention_mask(segments))
    assert not packed.isnan().any()
    start = 0
    for piece in pieces:
        alone = F.scaled_dot_product_attention(piece, piece, piece, is_causal=True)
        n = piece.shape[2]
        torch.testing.assert_close(packed[:, :, start:start + n], alone)
        start += n


def test_attend_across_is_plain_causal(tok):
    examples = [encode_example(tok, "q", " a a") for _ in range(3)]
    batch = pack(examples, block_size=32, pad_id=0, attend_across=True)
    assert batch.position_ids[0].tolist() == list(range(32))
    used = sum(len(x) for x, _ in examples)
    assert (batch.segment_ids[0, :used] == 1).all() and (batch.segment_ids[0, used:] == 0).all()
    mask = attention_mask(batch.segment_ids)[0, 0, :used, :used]
    assert torch.equal(mask, torch.ones(used, used, dtype=torch.bool).tril())


def test_packed_examples_through_the_model_equal_each_example_alone(tok):
    from minillm.model import GPT, ModelConfig

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2,
                            n_embd=16, position="rope", norm="rmsnorm", activation="swiglu")).eval()
    examples = [encode_example(tok, "question:", " four" * k) for k in (1, 3, 2)]
    batch = pack(examples, block_size=32, pad_id=0)
    out = model(batch.inputs, batch.targets, position_ids=batch.position_ids,
                attn_mask=attention_mask(batch.segment_ids))
    start = 0
    for x, y in examples:
        alone = model(torch.tensor([x]), torch.tensor([y]))
        torch.testing.assert_close(out.logits[0, start:start + len(x)], alone.logits[0], atol=1e-5, rtol=1e-5)
        start += len(x)
