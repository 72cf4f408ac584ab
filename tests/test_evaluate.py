import math

import numpy as np
import torch

from minillm.data import ShardWriter, TokenDataset
from minillm.evaluate import (evaluate_loss, exact_match, first_line, last_number,
                              multiple_choice, regex_extractor)
from minillm.generate import LocalLM
from minillm.model import GPT, ModelConfig
from minillm.tokenizer import train_bpe


class FixedLM:
    """A LanguageModel with scripted answers: scores from a table, one canned completion."""

    def __init__(self, scores=None, completion=""):
        self.scores, self.completion = scores or {}, completion

    def score(self, contexts, continuations):
        return [self.scores[(c, x)] for c, x in zip(contexts, continuations)]

    def generate(self, prompts, **kwargs):
        return [self.completion.format(p) for p in prompts]


def test_uniform_model_has_loss_log_vocab_and_matching_bits_per_byte(tmp_path):
    tok = train_bpe(["evaluation text for bits per byte"] * 4, vocab_size=300)
    ids = tok.encode_ordinary("evaluation text for bits per byte " * 30)
    with ShardWriter(tmp_path, "val", tok.vocab_size, tok.eot_id) as w:
        w.add(ids)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    model.lm_head.weight = torch.nn.Parameter(torch.zeros_like(model.lm_head.weight))  # untie, zero
    result = evaluate_loss(model, TokenDataset(w.paths), block_size=16, batch_size=2, tokenizer=tok)
    assert math.isclose(result["loss"], math.log(tok.vocab_size), rel_tol=1e-6)
    assert math.isclose(result["perplexity"], tok.vocab_size, rel_tol=1e-5)
    n = result["tokens"]
    targets = np.array(ids + [tok.eot_id])[1:n + 1]
    n_bytes = sum(len(tok.token_bytes(int(t))) for t in targets if t != tok.eot_id)
    assert math.isclose(result["bits_per_byte"], n * math.log2(tok.vocab_size) / n_bytes, rel_tol=1e-6)


def test_multiple_choice_raw_and_length_normalised():
    scores = {("Q", " long answer"): (-8.0, 3), ("Q", " b"): (-3.0, 1),
              ("R", " yes"): (-1.0, 1), ("R", " no"): (-2.0, 1)}
    items = [{"context": "Q", "choices": [" long answer", " b"], "answer": 0},
             {"context": "R", "choices": [" yes", " no"], "answer": 0}]
    result = multiple_choice(FixedLM(scores), items)
    # Q: raw picks " b" (-3 > -8); per byte " long answer" wins (-8/12 > -3/2).
    assert result == {"acc": 0.5, "acc_norm": 1.0, "n": 2}


def test_multiple_choice_with_a_model_trained_to_force_the_answer():
    text = "abcdefgh" * 40
    tok = train_bpe([text], vocab_size=257)  # bytes only: one token per letter
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32))
    ids = torch.tensor(tok.encode_ordinary(text))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(60):
        starts = torch.randint(0, len(ids) - 33, (8,))
        batch = torch.stack([ids[s:s + 33] for s in starts])
        loss = model(batch[:, :-1], batch[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    items = [{"context": "abcdefghabc", "choices": ["x", "d", "a"], "answer": 1},
             {"context": "efghab", "choices": ["c", "h", "e"], "answer": 0}]
    result = multiple_choice(LocalLM(model.eval(), tok), items)
    assert result["acc"] == 1.0


def test_exact_match_and_extractors():
    assert last_number("so 3 + 4 = 7, total 1,234.0 apples") == "1234"
    assert last_number("no digits") is None
    assert first_line("  Paris\nmore text") == "Paris"
    assert regex_extractor(r"answer is (\w+)")("the answer is B.") == "B"
    items = [{"prompt": "2+2", "answer": "4"}, {"prompt": "3+3", "answer": "6"}]
    result = exact_match(FixedLM(completion="The answer to {} is 4."), items, extract=last_number)
    assert result["exact_match"] == 0.5 and result["outputs"][0] == "The answer to 2+2 is 4."
