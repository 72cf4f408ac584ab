"""Evaluation: held-out loss / perplexity / bits per byte, multiple choice, exact match.

The method files report their accuracies through these functions. Multiple choice and exact match
take a `LanguageModel` (minillm.generate), so they work for any model that implements it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import torch

from .data import TokenDataset, eval_batches
from .generate import LanguageModel
from .model import GPT
from .tokenizer import Tokenizer


@torch.no_grad()
def evaluate_loss(model: GPT, dataset: TokenDataset, block_size: int, batch_size: int = 8,
                  max_batches: int | None = None, tokenizer: Tokenizer | None = None,
                  rank: int | None = None, world_size: int | None = None) -> dict:
    """Mean next-token loss (nats), perplexity and, with a tokenizer, bits per byte: the summed
    loss in bits over the UTF-8 bytes of the predicted tokens (special tokens count 0 bytes), which
    compares models with different tokenizers. Uses the fixed windows of `eval_batches` (at most
    `max_batches * batch_size` of them); with `rank` / `world_size`, this rank's share only."""
    device = model.wte.weight.device
    byte_len = None
    if tokenizer is not None:
        byte_len = torch.tensor([len(tokenizer.token_bytes(i)) if i not in tokenizer.special_tokens.values()
                                 else 0 for i in range(tokenizer.vocab_size)], device=device)
    was_training = model.training
    model.eval()
    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    max_windows = None if max_batches is None else max_batches * batch_size
    for x, y, rows in eval_batches(dataset, block_size, batch_size, max_windows, rank, world_size,
                                   device):
        if rows == 0:  # this rank's share ran out (see eval_batches)
            continue
        logits = model(x).logits.float()
        nats = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1),
                                                 reduction="sum")
        total_nats += nats.item()
        total_tokens += y.numel()
        if byte_len is not None:
            total_bytes += int(byte_len[y].sum())
    model.train(was_training)
    if total_tokens == 0:
        raise ValueError(f"no evaluation window of {block_size + 1} tokens for this rank")
    loss = total_nats / total_tokens
    result = {"loss": loss, "perplexity": math.exp(loss), "tokens": total_tokens}
    if byte_len is not None:
        result["bits_per_byte"] = total_nats / math.log(2) / max(total_bytes, 1)
    return result


def multiple_choice(lm: LanguageModel, items: Sequence[dict]) -> dict:
    """Accuracy of picking the most likely choice. Each item: {"context": str, "choices": [str],
    "answer": index}. `acc` compares summed log-likelihoods; `acc_norm` divides each by the choice's
    length in UTF-8 bytes, so that longer answers are not penalised for their length."""
    contexts, conts, owners = [], [], []
    for i, item in enumerate(items):
        for choice in item["choices"]:
            contexts.append(item["context"])
            conts.append(choice)
            owners.append(i)
    scores = lm.score(contexts, conts)
    correct = correct_norm = 0
    start = 0
    for i, item in enumerate(items):
        n = len(item["choices"])
        logps = [s[0] for s in scores[start:start + n]]
        norms = [lp / max(len(c.encode()), 1) for lp, c in zip(logps, item["choices"])]
        correct += max(range(n), key=logps.__getitem__) == item["answer"]
        correct_norm += max(range(n), key=norms.__getitem__) == item["answer"]
        start += n
    return {"acc": correct / len(items), "acc_norm": correct_norm / len(items), "n": len(items)}


# --- exact match -------------------------------------------------------------------------------------

def last_number(text: str) -> str | None:
    """The last number in `text` (commas removed, a trailing '.0' dropped), e.g. for GSM8K."""
    found = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    if not found:
        return None
    number = found[-1].replace(",", "")
    return number[:-2] if number.endswith(".0") else number


def first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip()


def regex_extractor(pattern: str) -> Callable[[str], str | None]:
    """Extractor returning group 1 (or the whole match) of the first match of `pattern`."""
    compiled = re.compile(pattern)

    def extract(text: str) -> str | None:
        m = compiled.search(text)
        return None if m is None else (m.group(1) if compiled.groups else m.group(0))
    return extract


def exact_match(lm: LanguageModel, items: Sequence[dict],
                extract: Callable[[str], str | None] = first_line, **generate_kwargs) -> dict:
    """Share of items whose extracted answer equals the reference after stripping whitespace and
    case. Each item: {"prompt": str, "answer": str}. Generation defaults to greedy."""
    generate_kwargs.setdefault("temperature", 0.0)
    outputs = lm.generate([item["prompt"] for item in items], **generate_kwargs)
    hits = []
    for item, out in zip(items, outputs):
        got = extract(out)
        hits.append(got is not None and got.strip().lower() == str(item["answer"]).strip().lower())
    return {"exact_match": sum(hits) / len(items), "n": len(items), "outputs": outputs}
