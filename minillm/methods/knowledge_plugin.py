"""Knowledge plugin: map-tuning (Zhang et al. 2023, "Plug-and-Play Knowledge Injection for
Pre-trained Language Models").

Knowledge is injected into a *frozen* language model through its input embeddings:

1. **Knowledge embeddings.** TransE (Bordes et al. 2013) over a triple file (TSV: head, relation,
   tail names): h + r ~ t, trained with the margin ranking loss max(0, margin + d(h, r, t) -
   d(h', r, t')) against corrupted triples (head or tail replaced by a random entity, each with
   probability 1/2); entity vectors are renormalised to unit L2 norm before every batch and
   relation vectors once at the start (the paper's norm constraints). Filtered link prediction
   (mean rank, MRR, hits@10 over heads and tails, other true triples removed from the candidates)
   measures them. Saved and loaded with their vocabularies (`save_knowledge` / `load_knowledge`).
2. **Mapping network.** One affine layer `KnowledgeMapper` from knowledge space (k) to the model's
   input-embedding space (d).
3. **Injection.** Before each linked mention a pseudo-token is inserted whose input embedding is the
   mapped knowledge vector, followed by `separator` (" /"): "[E] / mention", as in the paper. The
   sequence goes through `GPT.forward(inputs_embeds=...)`; the model is never changed.
4. **Map-tuning.** Mention-masked language modelling with the model frozen; only the mapper
   trains. Causal adaptation of the paper's MLM objective: a causal model never sees a token
   when predicting it, so "masking" the mention is the loss itself: the targets are the mention's
   tokens only (every other target is -100), each predicted from the left context, the injected
   "[E] /" and the mention tokens before it (teacher forcing). The right context, which BERT's
   MLM also uses, is not available to a causal model.
5. **Plug-and-play.** A mapper tuned once on the base model plugs into a fine-tuned copy of it
   without retraining; the task-specific variant tunes only a mapper on the task loss of the
   frozen fine-tuned model (`tune_mapper` with task examples).

Entity links are character spans of the text. Span -> token rule (byte-level BPE attaches the
leading space to a word): whitespace at either end of the span is dropped; the span becomes the
tokens whose bytes overlap it; the extra bytes this widening pulls in must be whitespace, else the
span cuts a token in the middle of a word and `SpanError` says which token.

Scoring and generation with injected embeddings: `plugin_continuation_logprobs`,
`plugin_generate_ids`, and `PluginLM`, a `minillm.generate.LanguageModel` whose text inputs are
linked by a `NameLinker`, so `minillm.evaluate.multiple_choice` / `exact_match` run with the plugin.

Knobs (defaults): TransEConfig(dim=32, margin=1.0, p_norm=1, lr=0.01, epochs=100, batch_size=128),
separator " /", MapperConfig(steps=300, batch_size=32, lr=3e-3).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import regex
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from ..model import GPT, IGNORE_INDEX
from ..checkpoint import load_torch_file
from ..tokenizer import Tokenizer

FILE_FORMAT = "minillm.knowledge"


class TripleFileError(UserError):
    """A triple file that is missing, empty or has a malformed line (the line is named)."""


class UnknownEntityError(UserError):
    """An entity or relation name that the knowledge embeddings do not hold."""


class SpanError(UserError):
    """An entity link whose character span cannot be mapped to whole tokens."""


# --- triples and vocabularies -----------------------------------------------------------------------

def read_triples(path) -> list[tuple[str, str, str]]:
    """(head, relation, tail) names from a TSV file, one triple a line; blank lines and lines
    starting with '#' are skipped. Empty or malformed input is a `TripleFileError` naming the line."""
    path = Path(path)
    if not path.is_file():
        raise TripleFileError(f"{path}: triple file not found")
    triples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.startswith("#"):
                continue
            fields = line.split("\t")
            if len(fields) != 3 or any(not x.strip() for x in fields):
                raise TripleFileError(f"{path}:{number}: expected 3 non-empty tab-separated fields "
                                      f"(head, relation, tail), got {line!r}")
            triples.append(tuple(x.strip() for x in fields))
    if not triples:
        raise TripleFileError(f"{path}: no triples (the file is empty or holds only comments)")
    return triples


@dataclass
class KGVocab:
    """Entity and relation names in order of first appearance; ids are list positions."""
    entities: list[str]
    relations: list[str]

    def __post_init__(self):
        self.entity_index = {e: i for i, e in enumerate(self.entities)}
        self.relation_index = {r: i for i, r in enumerate(self.relations)}

    @classmethod
    def from_triples(cls, triples: Sequence[tuple[str, str, str]]) -> "KGVocab":
        entities = dict.fromkeys(x for h, _, t in triples for x in (h, t))
        return cls(list(entities), list(dict.fromkeys(r for _, r, _ in triples)))

    def entity_id(self, name: str) -> int:
        if name not in self.entity_index:
            raise UnknownEntityError(f"unknown entity {name!r}: the knowledge embeddings hold "
                                     f"{len(self.entities)} entities (e.g. {self.entities[:3]})")
        return self.entity_index[name]

    def encode(self, triples: Sequence[tuple[str, str, str]]) -> torch.Tensor:
        """(N, 3) ids (head, relation, tail); an unknown name is an `UnknownEntityError`."""
        rows = []
        for h, r, t in triples:
            if r not in self.relation_index:
                raise UnknownEntityError(f"unknown relation {r!r}")
            rows.append((self.entity_id(h), self.relation_index[r], self.entity_id(t)))
        return torch.tensor(rows, dtype=torch.long).view(-1, 3)


# --- TransE ------------------------------------------------------------------------------------------

@dataclass
class TransEConfig:
    dim: int = 32
    margin: float = 1.0
    p_norm: int = 1  # distance ||h + r - t||_p
    lr: float = 0.01
    epochs: int = 100
    batch_size: int = 128
    seed: int = 0


class TransE(nn.Module):
    def __init__(self, n_entities: int, n_relations: int, dim: int, p_norm: int = 1):
        super().__init__()
        self.p_norm = p_norm
        bound = 6 / dim ** 0.5  # Bordes et al.'s uniform initialisation
        self.entity = nn.Embedding(n_entities, dim)
        self.relation = nn.Embedding(n_relations, dim)
        nn.init.uniform_(self.entity.weight, -bound, bound)
        nn.init.uniform_(self.relation.weight, -bound, bound)
        with torch.no_grad():
            self.relation.weight.div_(self.relation.weight.norm(dim=1, keepdim=True))
            self.normalize_entities()

    @torch.no_grad()
    def normalize_entities(self) -> None:
        self.entity.weight.div_(self.entity.weight.norm(dim=1, keepdim=True).clamp(min=1e-12))

    def distance(self, triples_N3: torch.Tensor) -> torch.Tensor:
        h, r, t = (self.entity(triples_N3[:, 0]), self.relation(triples_N3[:, 1]),
                   self.entity(triples_N3[:, 2]))
        return (h + r - t).norm(p=self.p_norm, dim=-1)


def corrupt(triples_N3: torch.Tensor, n_entities: int, generator: torch.Generator) -> torch.Tensor:
    """Each triple with its head (probability 1/2) or its tail replaced by a uniform random entity."""
    out = triples_N3.clone()
    n = len(out)
    replace_head = torch.rand(n, generator=generator) < 0.5
    random_ids = torch.randint(n_entities, (n,), generator=generator)
    out[replace_head, 0] = random_ids[replace_head]
    out[~replace_head, 2] = random_ids[~replace_head]
    return out


def train_transe(triples_N3: torch.Tensor, n_entities: int, n_relations: int,
                 cfg: TransEConfig = TransEConfig()) -> tuple[TransE, list[float]]:
    """TransE trained with the margin ranking loss (Adam); returns the model and the mean loss of
    every epoch."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = TransE(n_entities, n_relations, cfg.dim, cfg.p_norm)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    history = []
    for _ in range(cfg.epochs):
        order = torch.randperm(len(triples_N3), generator=gen)
        total = 0.0
        for start in range(0, len(order), cfg.batch_size):
            pos = triples_N3[order[start:start + cfg.batch_size]]
            neg = corrupt(pos, n_entities, gen)
            model.normalize_entities()  # the constraint ||e|| = 1, enforced before each batch
            loss = F.relu(cfg.margin + model.distance(pos) - model.distance(neg)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(pos)
        history.append(total / len(triples_N3))
    model.normalize_entities()
    return model, history


@torch.no_grad()
def link_prediction(model: TransE, test_N3: torch.Tensor, known_N3: torch.Tensor) -> dict:
    """Filtered link prediction: for each test triple, rank the true tail among all entities (and
    the true head likewise), after removing candidates that form another known true triple. Returns
    mean rank, mean reciprocal rank and hits@10 over both sides."""
    known = {tuple(x) for x in known_N3.tolist()} | {tuple(x) for x in test_N3.tolist()}
    E = model.entity.weight  # (n_entities, k)
    ranks = []
    for h, r, t in test_N3.tolist():
        rel = model.relation.weight[r]
        for side in ("tail", "head"):
            if side == "tail":
                d_E = (E[h] + rel - E).norm(p=model.p_norm, dim=-1)
                true, others = t, [c for c in range(len(E)) if c != t and (h, r, c) in known]
            else:
                d_E = (E + rel - E[t]).norm(p=model.p_norm, dim=-1)
                true, others = h, [c for c in range(len(E)) if c != h and (c, r, t) in known]
            d_E = d_E.clone()
            d_E[others] = float("inf")
            ranks.append(int((d_E < d_E[true]).sum()) + 1)
    ranks_t = torch.tensor(ranks, dtype=torch.float)
    return {"mean_rank": ranks_t.mean().item(), "mrr": (1 / ranks_t).mean().item(),
            "hits@10": (ranks_t <= 10).float().mean().item(), "n": len(ranks)}


@dataclass
class KnowledgeEmbeddings:
    """Entity vectors (n_entities, k) with the vocabulary that names their rows."""
    vectors: torch.Tensor
    vocab: KGVocab
    relation_vectors: torch.Tensor | None = None

    @classmethod
    def from_transe(cls, model: TransE, vocab: KGVocab) -> "KnowledgeEmbeddings":
        return cls(model.entity.weight.detach().clone(), vocab, model.relation.weight.detach().clone())


def save_knowledge(path, emb: KnowledgeEmbeddings) -> None:
    blob = {"format": FILE_FORMAT, "version": 1, "entities": emb.vocab.entities,
            "relations": emb.vocab.relations, "entity_vectors": emb.vectors,
            "relation_vectors": emb.relation_vectors}
    tmp = f"{path}.tmp"
    torch.save(blob, tmp)
    Path(tmp).replace(path)


def load_knowledge(path) -> KnowledgeEmbeddings:
    blob = load_torch_file(path, expected="knowledge embeddings (save_knowledge)")
    if not isinstance(blob, dict) or blob.get("format") != FILE_FORMAT:
        raise UserError(f"{path}: a PyTorch file, but not knowledge embeddings (save_knowledge)")
    vocab = KGVocab(list(blob["entities"]), list(blob["relations"]))
    if blob["entity_vectors"].shape[0] != len(vocab.entities):
        raise UserError(f"{path}: {blob['entity_vectors'].shape[0]} vectors for "
                        f"{len(vocab.entities)} entity names")
    return KnowledgeEmbeddings(blob["entity_vectors"], vocab, blob.get("relation_vectors"))


# --- entity links: character spans -> token positions -----------------------------------------------

@dataclass
class Link:
    """Characters text[start:end] mention `entity`."""
    start: int
    end: int
    entity: str


def token_byte_spans(tokenizer: Tokenizer, ids: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) byte offsets of every token in the concatenation of their bytes."""
    spans, pos = [], 0
    for i in ids:
        n = len(tokenizer.token_bytes(i))
        spans.append((pos, pos + n))
        pos += n
    return spans


def span_to_tokens(text: str, byte_spans: Sequence[tuple[int, int]], start: int, end: int
                   ) -> tuple[int, int]:
    """Token range [first, last) of the character span text[start:end] (see the module docstring:
    outer whitespace dropped, widened to whole tokens, widening may add whitespace only)."""
    if not 0 <= start < end <= len(text):
        raise SpanError(f"span [{start}, {end}) is not a non-empty span of a text of {len(text)} "
                        "characters")
    mention = text[start:end]
    start += len(mention) - len(mention.lstrip())
    end -= len(mention) - len(mention.rstrip())
    if start >= end:
        raise SpanError(f"span {mention!r} holds only whitespace")
    data = text.encode("utf-8")
    b_start, b_end = len(text[:start].encode("utf-8")), len(text[:end].encode("utf-8"))
    covering = [i for i, (s, e) in enumerate(byte_spans) if s < b_end and e > b_start]
    first, last = covering[0], covering[-1] + 1
    extra = data[byte_spans[first][0]:b_start] + data[b_end:byte_spans[last - 1][1]]
    if extra.decode("utf-8", errors="replace").strip():
        cut = byte_spans[first] if byte_spans[first][0] < b_start else byte_spans[last - 1]
        piece = data[cut[0]:cut[1]].decode("utf-8", errors="replace")
        raise SpanError(f"span {text[start:end]!r} at characters [{start}, {end}) cuts the token "
                        f"{piece!r} in the middle of a word: link whole words")
    return first, last


# --- injection ----------------------------------------------------------------------------------------

@dataclass
class PluginSequence:
    """Token ids with pseudo-token slots. `slots`: (position, entity id); the id at a slot is a
    placeholder replaced by the mapped knowledge vector. `mentions`: token ranges [first, last) of
    the linked mentions in `ids`. `targets`: next-token targets (len(ids)), -100 where no loss."""
    ids: list[int]
    slots: list[tuple[int, int]] = field(default_factory=list)
    mentions: list[tuple[int, int]] = field(default_factory=list)
    targets: list[int] | None = None


def build_sequence(tokenizer: Tokenizer, text: str, links: Sequence[Link], vocab: KGVocab,
                   inject: bool = True, separator: str = " /", bos: bool = True) -> PluginSequence:
    """Tokenize `text` and, when `inject`, insert "[E]" + `separator` before every linked mention.
    `bos` starts the sequence with <|endoftext|> (as documents start in training data), so a
    mention at the very start has a left context. Targets are the mention tokens (map-tuning)."""
    text_ids = tokenizer.encode_ordinary(text)
    spans = token_byte_spans(tokenizer, text_ids)
    ranges = sorted((*span_to_tokens(text, spans, l.start, l.end), vocab.entity_id(l.entity))
                    for l in links)
    for (_, a_end, _), (b_start, _, _) in zip(ranges, ranges[1:]):
        if b_start < a_end:
            raise SpanError(f"two entity links in {text!r} share a token")
    sep_ids = tokenizer.encode_ordinary(separator) if separator else []
    placeholder = tokenizer.eot_id
    ids = [tokenizer.eot_id] if bos else []
    seq = PluginSequence(ids)
    cursor = 0
    for first, last, entity in ranges:
        ids.extend(text_ids[cursor:first])
        if inject:
            seq.slots.append((len(ids), entity))
            ids.append(placeholder)
            ids.extend(sep_ids)
        seq.mentions.append((len(ids), len(ids) + last - first))
        ids.extend(text_ids[first:last])
        cursor = last
    ids.extend(text_ids[cursor:])
    seq.targets = mention_targets(seq)
    return seq


def mention_targets(seq: PluginSequence) -> list[int]:
    """Targets for masked-mention LM: the token at position p (inside a mention) is the target of
    position p - 1; all other targets are -100."""
    targets = [IGNORE_INDEX] * len(seq.ids)
    for first, last in seq.mentions:
        for p in range(max(first, 1), last):
            targets[p - 1] = seq.ids[p]
    return targets


class KnowledgeMapper(nn.Module):
    """The mapping network: one affine layer, knowledge space (k) -> input embeddings (d)."""

    def __init__(self, knowledge_dim: int, embed_dim: int, init_std: float = 0.02):
        super().__init__()
        self.proj = nn.Linear(knowledge_dim, embed_dim)
        nn.init.normal_(self.proj.weight, std=init_std)
        nn.init.zeros_(self.proj.bias)

    def forward(self, vectors_Nk: torch.Tensor) -> torch.Tensor:
        return self.proj(vectors_Nk)


class KnowledgePlugin(nn.Module):
    """Frozen entity vectors + a trainable mapper. `permutation` (n_entities,) feeds entity i the
    vector of entity permutation[i]: the shuffled-embeddings baseline."""

    def __init__(self, knowledge: KnowledgeEmbeddings, embed_dim: int,
                 permutation: torch.Tensor | None = None):
        super().__init__()
        self.vocab = knowledge.vocab
        vectors = knowledge.vectors.float()
        if permutation is not None:
            vectors = vectors[permutation]
        self.register_buffer("vectors", vectors.clone())
        self.mapper = KnowledgeMapper(vectors.shape[1], embed_dim)

    def forward(self, entity_ids: torch.Tensor) -> torch.Tensor:
        return self.mapper(self.vectors[entity_ids])


def embed_inputs(model: GPT, ids_BT: torch.Tensor, slots: Sequence[Sequence[tuple[int, int]]],
                 plugin: KnowledgePlugin | None) -> torch.Tensor:
    """Input embeddings (B, T, d): token embeddings, with row b's slots replaced by the plugin's
    mapped vectors (the placeholder's embedding stays when `plugin` is None)."""
    x_BTd = model.wte(ids_BT)
    rows = [(b, p, e) for b, row in enumerate(slots) for p, e in row]
    if plugin is None or not rows:
        return x_BTd
    b, p, e = (torch.tensor(c, device=ids_BT.device) for c in zip(*rows))
    return x_BTd.index_put((b, p), plugin(e).to(x_BTd.dtype))


def _right_pad(seqs: Sequence[PluginSequence], device, pad_id: int = 0):
    T = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    targets = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s.ids)] = torch.tensor(s.ids)
        if s.targets is not None:
            targets[b, :len(s.targets)] = torch.tensor(s.targets)
    return ids.to(device), targets.to(device)


def sequence_loss(model: GPT, plugin: KnowledgePlugin | None, seqs: Sequence[PluginSequence]
                  ) -> torch.Tensor:
    """Mean cross-entropy over the targets of `seqs` (right-padded: causal attention suffices)."""
    ids_BT, targets_BT = _right_pad(seqs, model.wte.weight.device)
    x_BTd = embed_inputs(model, ids_BT, [s.slots for s in seqs], plugin)
    return model(inputs_embeds=x_BTd, targets=targets_BT).loss


@torch.no_grad()
def evaluate_loss(model: GPT, plugin: KnowledgePlugin | None, seqs: Sequence[PluginSequence],
                  batch_size: int = 64) -> float:
    """Mean loss per target token over all `seqs` (e.g. the masked-mention loss)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(seqs), batch_size):
        batch = seqs[start:start + batch_size]
        n = sum(t != IGNORE_INDEX for s in batch for t in s.targets)
        total += sequence_loss(model, plugin, batch).item() * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


# --- map-tuning: only the mapper trains -----------------------------------------------------------

@dataclass
class MapperConfig:
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0
    seed: int = 0


def tune_mapper(model: GPT, plugin: KnowledgePlugin, examples: Sequence[PluginSequence],
                cfg: MapperConfig = MapperConfig(), log: Callable[[int, float], None] | None = None
                ) -> list[float]:
    """Train only `plugin.mapper` on the targets of `examples` (masked-mention LM for map-tuning, a
    task's answer tokens for the task-specific mapper) with `model` frozen: its parameters get no
    gradient and it runs in eval mode (no dropout). Returns the loss of every step.

    Not `minillm.train.Trainer`: the trainer optimizes the model's own parameters on (x, y) token
    windows, while here the optimized parameters live outside the model and the inputs are
    embeddings built per batch from entity links."""
    gen = random.Random(cfg.seed)
    was_training = model.training
    requires = [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    opt = torch.optim.AdamW(plugin.mapper.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = []
    try:
        for step in range(cfg.steps):
            batch = gen.sample(list(examples), min(cfg.batch_size, len(examples)))
            loss = sequence_loss(model, plugin, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(loss.item())
            if log is not None:
                log(step, history[-1])
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)
    return history


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of every tensor's bytes in the state dict: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --- scoring and generation with injected embeddings ------------------------------------------------

@torch.no_grad()
def plugin_continuation_logprobs(model: GPT, plugin: KnowledgePlugin | None,
                                 contexts: Sequence[PluginSequence],
                                 continuations: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Log-probability of each continuation token given its context (ids with slots), from one
    right-padded forward pass over context + continuation through `inputs_embeds`."""
    seqs = []
    for c, x in zip(contexts, continuations):
        if not c.ids or not x:
            raise ValueError("contexts and continuations must each hold at least one token")
        seqs.append(PluginSequence(list(c.ids) + list(x), c.slots))
    ids_BT, _ = _right_pad(seqs, model.wte.weight.device)
    was_training = model.training
    model.eval()
    x_BTd = embed_inputs(model, ids_BT, [s.slots for s in seqs], plugin)
    logp_BTV = F.log_softmax(model(inputs_embeds=x_BTd).logits.float(), dim=-1)
    model.train(was_training)
    out = []
    for b, (c, x) in enumerate(zip(contexts, continuations)):
        pos = torch.arange(len(c.ids) - 1, len(c.ids) + len(x) - 1)
        out.append(logp_BTV[b, pos, torch.tensor(list(x))].cpu())
    return out


@torch.no_grad()
def plugin_generate_ids(model: GPT, plugin: KnowledgePlugin | None, prompt: PluginSequence,
                        max_new_tokens: int, eos_id: int | None = None,
                        should_stop: Callable[[list[int]], bool] | None = None) -> list[int]:
    """Greedy new ids for one prompt: the prompt goes in once as embeddings (pseudo-tokens
    included) into a KV cache, then one token id at a time."""
    T = len(prompt.ids)
    if model.wpe is not None and T + max_new_tokens - 1 > model.config.block_size:
        raise ValueError(f"prompt of {T} tokens + {max_new_tokens} new tokens exceeds block_size "
                         f"{model.config.block_size}")
    was_training = model.training
    model.eval()
    device = model.wte.weight.device
    cache = model.new_kv_cache(1, T + max_new_tokens)
    x_1Td = embed_inputs(model, torch.tensor([prompt.ids], device=device), [prompt.slots], plugin)
    logits_V = model(inputs_embeds=x_1Td, kv_cache=cache).logits[0, -1]
    new: list[int] = []
    for step in range(max_new_tokens):
        token = int(logits_V.argmax())
        if token == eos_id:
            break
        new.append(token)
        if (should_stop is not None and should_stop(new)) or step == max_new_tokens - 1:
            break
        logits_V = model(torch.tensor([[token]], device=device), kv_cache=cache).logits[0, -1]
    model.train(was_training)
    return new


class NameLinker:
    """Links every whole-word occurrence of a known name (longest name first) to that entity."""

    def __init__(self, names: Sequence[str]):
        self.names = sorted(set(names), key=len, reverse=True)
        alternatives = "|".join(regex.escape(n) for n in self.names)
        self.pattern = regex.compile(rf"(?<![\p{{L}}\p{{N}}])(?:{alternatives})(?![\p{{L}}\p{{N}}])")

    def __call__(self, text: str) -> list[Link]:
        return [Link(m.start(), m.end(), m.group(0)) for m in self.pattern.finditer(text)]


class PluginLM:
    """`minillm.generate.LanguageModel` with knowledge injected: each context / prompt is linked by
    `linker` and gets "[E] /" before its mentions; `plugin=None` scores the same inputs without
    pseudo-tokens (the no-plugin baseline). Generation is greedy (temperature 0) only."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, plugin: KnowledgePlugin | None,
                 linker: Callable[[str], list[Link]], vocab: KGVocab, separator: str = " /",
                 batch_size: int = 32):
        self.model, self.tokenizer, self.plugin = model, tokenizer, plugin
        self.linker, self.vocab, self.separator, self.batch_size = linker, vocab, separator, batch_size

    def _context(self, text: str) -> PluginSequence:
        # As LocalLM: <|endoftext|> starts only an empty context.
        return build_sequence(self.tokenizer, text, self.linker(text), self.vocab,
                              inject=self.plugin is not None, separator=self.separator, bos=not text)

    def score(self, contexts, continuations):
        results = []
        for start in range(0, len(contexts), self.batch_size):
            ctx = [self._context(c) for c in contexts[start:start + self.batch_size]]
            cont = [self.tokenizer.encode_ordinary(x)
                    for x in continuations[start:start + self.batch_size]]
            for logp in plugin_continuation_logprobs(self.model, self.plugin, ctx, cont):
                results.append((float(logp.sum()), len(logp)))
        return results

    def generate(self, prompts, max_new_tokens=128, temperature=0.0, top_k=None, top_p=None,
                 stop=(), seed=None):
        if temperature != 0:
            raise UserError("PluginLM generates greedily only: pass temperature=0")
        results = []
        for prompt in prompts:
            def should_stop(new_ids):
                return any(s in self.tokenizer.decode(new_ids[-32:]) for s in stop)
            ids = plugin_generate_ids(self.model, self.plugin, self._context(prompt), max_new_tokens,
                                      eos_id=self.tokenizer.eot_id,
                                      should_stop=should_stop if stop else None)
            text = self.tokenizer.decode(ids)
            cut = min((text.find(s) for s in stop if s in text), default=len(text))
            results.append(text[:cut])
        return results


__all__ = ["TripleFileError", "UnknownEntityError", "SpanError", "read_triples", "KGVocab",
           "TransEConfig", "TransE", "corrupt", "train_transe", "link_prediction",
           "KnowledgeEmbeddings", "save_knowledge", "load_knowledge", "Link", "token_byte_spans",
           "span_to_tokens", "PluginSequence", "build_sequence", "mention_targets",
           "KnowledgeMapper", "KnowledgePlugin", "embed_inputs", "sequence_loss", "evaluate_loss",
           "MapperConfig", "tune_mapper", "weights_digest", "plugin_continuation_logprobs",
           "plugin_generate_ids", "NameLinker", "PluginLM"]
