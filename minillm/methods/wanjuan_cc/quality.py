"""Quality scoring (WanJuan-CC stage 7): a fastText-style linear classifier and a perplexity scorer.

`HashedNgramClassifier` (Joulin et al. 2017, "Bag of Tricks"): a text is the average of embeddings of
its hashed word unigrams and bigrams (no vocabulary to store), followed by one linear layer. Trained
in torch on (text, label) pairs the user supplies, e.g. advertisement vs. not, fluent vs. not. It
trains in seconds on the CPU and scores thousands of documents per second.

`PerplexityScorer` scores a text's perplexity under any `LanguageModel` (minillm.generate), e.g. a
small minillm model trained on reference text (CCNet's approach with a KenLM model).
"""

from __future__ import annotations

import math
import re
import zlib
from pathlib import Path

import torch
import torch.nn as nn

_WORD = re.compile(r"[^\W_]+")


def hashed_features(text: str, buckets: int, max_tokens: int = 2000) -> list[int]:
    """Bucket ids of the text's lower-cased word unigrams and bigrams (CRC-32, stable across runs)."""
    words = _WORD.findall(text.lower())[:max_tokens]
    feats = [zlib.crc32(w.encode()) % buckets for w in words]
    feats += [zlib.crc32(f"{a} {b}".encode()) % buckets for a, b in zip(words, words[1:])]
    return feats or [0]


class HashedNgramClassifier(nn.Module):
    def __init__(self, num_classes: int = 2, buckets: int = 2**18, dim: int = 32):
        super().__init__()
        self.buckets, self.num_classes = buckets, num_classes
        self.embed = nn.EmbeddingBag(buckets, dim, mode="mean")
        self.out = nn.Linear(dim, num_classes)

    def _batch(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        feats = [hashed_features(t, self.buckets) for t in texts]
        offsets = torch.tensor([0] + [len(f) for f in feats[:-1]]).cumsum(0)
        return torch.tensor([i for f in feats for i in f]), offsets

    def forward(self, texts: list[str]) -> torch.Tensor:
        """Logits (len(texts), num_classes)."""
        return self.out(self.embed(*self._batch(texts)))

    def fit(self, texts: list[str], labels: list[int], epochs: int = 10, lr: float = 0.5,
            batch_size: int = 32, seed: int = 0) -> "HashedNgramClassifier":
        """Train with SGD on cross-entropy, shuffled each epoch (seeded)."""
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        nn.init.uniform_(self.embed.weight, -1 / self.embed.embedding_dim, 1 / self.embed.embedding_dim)
        opt = torch.optim.SGD(self.parameters(), lr=lr)
        y_all = torch.tensor(labels)
        for _ in range(epochs):
            for batch in torch.randperm(len(texts), generator=g).split(batch_size):
                loss = nn.functional.cross_entropy(self([texts[i] for i in batch]), y_all[batch])
                opt.zero_grad()
                loss.backward()
                opt.step()
        return self.eval()

    @torch.no_grad()
    def predict_proba(self, texts: list[str], positive: int = 1) -> torch.Tensor:
        """Probability of class `positive` for each text."""
        return self(texts).softmax(-1)[:, positive]

    def save(self, path: str | Path) -> None:
        torch.save({"buckets": self.buckets, "num_classes": self.num_classes,
                    "dim": self.embed.embedding_dim, "state": self.state_dict()}, path)

    @classmethod
    def load(cls, path: str | Path) -> "HashedNgramClassifier":
        blob = torch.load(path, weights_only=True)
        model = cls(blob["num_classes"], blob["buckets"], blob["dim"])
        model.load_state_dict(blob["state"])
        return model.eval()


class PerplexityScorer:
    """Perplexity of a text under a `LanguageModel`, from its first `max_chars` characters."""

    def __init__(self, lm, max_chars: int = 2000):
        self.lm, self.max_chars = lm, max_chars

    def __call__(self, texts: list[str]) -> list[float]:
        scores = self.lm.score([""] * len(texts), [t[:self.max_chars] or " " for t in texts])
        return [math.exp(-logp / max(n, 1)) for logp, n in scores]
