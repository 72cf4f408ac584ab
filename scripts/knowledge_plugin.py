"""Knowledge plugin (map-tuning) at small scale, on a synthetic knowledge graph.

    python scripts/knowledge_plugin.py                 # the default run (README: time measured)
    python scripts/knowledge_plugin.py --people 60 --pretrain-steps 30 ...   # tiny (the test)

The world: people with a profession and a city, professions with a workplace, cities in countries,
friendships. All of it is in the triple file (`OUT_DIR/kg.tsv`) that TransE learns. A share of
the people (`--held-out`) is held out from map-tuning and from fine-tuning. The text says:

- for training people: "the doctor Tamiku read a book." and "the doctor Tamiku works at the
  hospital." (their professions are in the text);
- for every person: "Tamiku went home.", "Tamiku met Bosale.", "the Lumera resident Tamiku
  went home." (names and cities, never professions);
- in general: "a doctor works at the hospital."

So a held-out person's profession, hence workplace, is never stated: it is only in the graph.

Steps: TransE on the graph (filtered link prediction on the profession triples); a tiny GPT
pretrained on the text (minillm Trainer); map-tuning of a mapper on the frozen model (masked-mention
LM on the training people's "NAME went home." sentences), and of a second mapper fed shuffled entity
vectors; a fully fine-tuned copy on the downstream task "NAME works at the" -> workplace (training
people); on held-out people: masked-mention loss (base model) and downstream accuracy (fine-tuned
copy: no plugin, the plug-and-play mapper, a task-specific mapper tuned on the task loss), with the
weights' SHA-256 before and after.
"""

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minillm.cli import parse_config
from minillm.distributed import DistInfo
from minillm.errors import UserError, run_main
from minillm.evaluate import multiple_choice
from minillm.methods.knowledge_plugin import (KGVocab, KnowledgeEmbeddings, KnowledgePlugin, Link,
                                              MapperConfig, NameLinker, PluginLM, PluginSequence,
                                              TransEConfig, build_sequence, evaluate_loss, link_prediction,
                                              load_knowledge, read_triples, save_knowledge, train_transe,
                                              tune_mapper, weights_digest)
from minillm.model import IGNORE_INDEX, ModelConfig
from minillm.sft import PackedLoader, encode_example, pack
from minillm.tokenizer import train_bpe
from minillm.train import TrainConfig, Trainer

PROFESSIONS = {"doctor": "hospital", "baker": "bakery", "farmer": "farm", "sailor": "harbour",
               "teacher": "school", "painter": "studio"}
CITIES = {"Lumera": "Astovia", "Pexton": "Astovia", "Varno": "Brelland", "Quillis": "Brelland",
          "Ostra": "Corvana", "Dunmere": "Corvana"}
ACTS = ["went home", "read a book", "sang a song", "walked to town", "ate some bread",
        "slept late", "wrote a letter", "lost a key"]
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


@dataclass
class PluginConfig:
    out_dir: str = "out/knowledge_plugin"
    people: int = 240
    held_out: float = field(default=0.25, metadata={"help": "share of people held out"})
    seed: int = 0
    transe_dim: int = 32
    transe_epochs: int = 200
    vocab_size: int = 512
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    pretrain_steps: int = 800
    finetune_steps: int = 250
    map_steps: int = 300
    task_map_steps: int = 300
    batch_size: int = 32
    separator: str = field(default="", metadata={
        "help": "text between the pseudo-token and the mention; the paper's ' /' measured worse "
                "here (README)"})
    threads: int = field(default=1, metadata={
        "help": "torch CPU threads; the tiny model gains nothing from more, and on a shared machine "
                "more threads run much slower"})


def make_world(cfg: PluginConfig, rng: random.Random):
    names: list[str] = []
    while len(names) < cfg.people:
        name = "".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize()
        if name not in names:
            names.append(name)
    profession = {n: rng.choice(list(PROFESSIONS)) for n in names}
    city = {n: rng.choice(list(CITIES)) for n in names}
    triples = [(n, "profession", profession[n]) for n in names]
    triples += [(n, "lives_in", city[n]) for n in names]
    triples += [(c, "located_in", k) for c, k in CITIES.items()]
    triples += [(p, "works_at", w) for p, w in PROFESSIONS.items()]
    for n in names:
        for friend in rng.sample([m for m in names if m != n], 2):
            triples.append((n, "friend_of", friend))
    held = set(rng.sample(names, round(cfg.held_out * len(names))))
    return names, profession, city, triples, held


def make_text(names, profession, city, held, rng: random.Random) -> list[str]:
    docs = []
    for n in names:
        p = profession[n]
        if n not in held:
            docs += [f"the {p} {n} {rng.choice(ACTS)}." for _ in range(2)]
            docs.append(f"the {p} {n} works at the {PROFESSIONS[p]}.")
        docs += [f"{n} {act}." for act in rng.sample(ACTS, 3)]
        docs += [f"the {city[n]} resident {n} {rng.choice(ACTS)}." for _ in range(2)]
        docs.append(f"{n} met {rng.choice(names)}.")
    for p, w in PROFESSIONS.items():
        docs += [f"a {p} works at the {w}."] * 20
    rng.shuffle(docs)
    return docs


def train_lm(cfg: PluginConfig, out: Path, name: str, encoded, steps: int, lr: float,
             model_config: ModelConfig | None, tok, init_from: str | None = None,
             attend_across: bool = True):
    encoded = list(encoded)
    windows = len(pack(encoded, 64, tok.eot_id, attend_across).inputs)
    batch_size = min(cfg.batch_size, windows)  # a small task packs into few windows
    loader = PackedLoader(encoded, block_size=64, batch_size=batch_size, pad_id=tok.eot_id,
                          seed=cfg.seed, attend_across=attend_across)
    tcfg = TrainConfig(out_dir=str(out / name), max_steps=steps, lr=lr, warmup_steps=min(20, steps),
                       batch_size=batch_size, block_size=64, eval_interval=0, ckpt_interval=steps,
                       log_interval=max(steps // 4, 1), overwrite=True, progress=False,
                       seed=cfg.seed, init_from=init_from, weight_decay=0.0)
    trainer = Trainer(tcfg, DistInfo(), model_config=model_config, data_source=loader, tokenizer=tok)
    history = trainer.train()
    return trainer.model.eval(), trainer.checkpoint_path, history


def main(cfg: PluginConfig) -> dict:
    if not 0 < cfg.held_out < 1:
        raise UserError(f"--held-out must be in (0, 1), got {cfg.held_out}")
    if cfg.people < 12:
        raise UserError(f"--people must be at least 12, got {cfg.people}")
    t0 = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names, profession, city, triples, held = make_world(cfg, rng)
    train_people = [n for n in names if n not in held]
    held_people = [n for n in names if n in held]

    # --- knowledge embeddings: TransE on the triple file ---
    kg_path = out / "kg.tsv"
    kg_path.write_text("".join(f"{h}\t{r}\t{t}\n" for h, r, t in triples))
    triples = read_triples(kg_path)
    vocab = KGVocab.from_triples(triples)
    ids_N3 = vocab.encode(triples)
    transe, transe_losses = train_transe(ids_N3, len(vocab.entities), len(vocab.relations),
                                         TransEConfig(dim=cfg.transe_dim, epochs=cfg.transe_epochs,
                                                      seed=cfg.seed))
    save_knowledge(out / "knowledge.pt", KnowledgeEmbeddings.from_transe(transe, vocab))
    knowledge = load_knowledge(out / "knowledge.pt")
    prof_N3 = ids_N3[ids_N3[:, 1] == vocab.relation_index["profession"]]
    lp = link_prediction(transe, prof_N3, ids_N3)
    print(f"TransE: {len(triples)} triples, {len(vocab.entities)} entities, loss "
          f"{transe_losses[0]:.3f} -> {transe_losses[-1]:.3f}; filtered link prediction on the "
          f"profession triples: mean rank {lp['mean_rank']:.1f}, hits@10 {lp['hits@10']:.3f} "
          f"({time.perf_counter() - t0:.0f} s)")

    # --- a tiny GPT pretrained on the text ---
    docs = make_text(names, profession, city, held, rng)
    tok = train_bpe(docs, cfg.vocab_size)
    model_cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=96, n_layer=cfg.n_layer,
                            n_head=cfg.n_head, n_embd=cfg.n_embd)
    base, base_path, hist = train_lm(cfg, out, "pretrain", [encode_example(tok, "", d) for d in docs],
                                     cfg.pretrain_steps, 3e-3, model_cfg, tok)
    print(f"pretrained {base.num_params() / 1e3:.0f}k parameters, {len(docs)} sentences: loss "
          f"{hist[0]['loss']:.3f} -> {hist[-1]['loss']:.3f} ({time.perf_counter() - t0:.0f} s)")

    # --- map-tuning on the frozen base model ---
    def mention_examples(people, inject):
        seqs = []
        for n in people:
            for act in ACTS[:4]:
                text = f"{n} {act}."
                seqs.append(build_sequence(tok, text, [Link(0, len(n), n)], vocab, inject=inject,
                                           separator=cfg.separator))
        return seqs

    map_cfg = MapperConfig(steps=cfg.map_steps, batch_size=cfg.batch_size, seed=cfg.seed)
    base_digest = weights_digest(base)
    plugin = KnowledgePlugin(knowledge, cfg.n_embd)
    tune_mapper(base, plugin, mention_examples(train_people, True), map_cfg)
    permutation = torch.randperm(len(vocab.entities), generator=torch.Generator().manual_seed(1))
    shuffled = KnowledgePlugin(knowledge, cfg.n_embd, permutation=permutation)
    tune_mapper(base, shuffled, mention_examples(train_people, True), map_cfg)
    held_plain, held_injected = mention_examples(held_people, False), mention_examples(held_people, True)
    mlm = {"no plugin": evaluate_loss(base, None, held_plain),
           "plugin": evaluate_loss(base, plugin, held_injected),
           "shuffled entity vectors": evaluate_loss(base, shuffled, held_injected)}
    base_same = weights_digest(base) == base_digest
    print(f"map-tuning done ({time.perf_counter() - t0:.0f} s)")

    # --- downstream: a fully fine-tuned copy, "NAME works at the" -> workplace ---
    def item(n):
        choices = [" " + w for w in PROFESSIONS.values()]
        return {"context": f"{n} works at the",
                "choices": choices, "answer": choices.index(" " + PROFESSIONS[profession[n]])}

    task_train = [encode_example(tok, item(n)["context"], item(n)["choices"][item(n)["answer"]])
                  for n in train_people]
    tuned, _, _ = train_lm(cfg, out, "finetune", task_train, cfg.finetune_steps, 1e-3, None, tok,
                           init_from=str(base_path), attend_across=False)
    tuned_digest = weights_digest(tuned)
    linker = NameLinker(names)
    task_examples = []  # the task loss with the plugin: answer tokens only
    for n in train_people:
        it = item(n)
        ctx = build_sequence(tok, it["context"], linker(it["context"]), vocab, separator=cfg.separator,
                             bos=False)
        answer = tok.encode_ordinary(it["choices"][it["answer"]]) + [tok.eot_id]
        ids = ctx.ids + answer
        targets = [IGNORE_INDEX] * (len(ctx.ids) - 1) + answer + [IGNORE_INDEX]
        task_examples.append(PluginSequence(ids, ctx.slots, targets=targets))
    task_plugin = KnowledgePlugin(knowledge, cfg.n_embd)
    tune_mapper(tuned, task_plugin, task_examples,
                MapperConfig(steps=cfg.task_map_steps, batch_size=cfg.batch_size, seed=cfg.seed))
    held_items = [item(n) for n in held_people]
    train_items = [item(n) for n in train_people]

    def accuracy(p, items):
        lm = PluginLM(tuned, tok, p, linker, vocab, separator=cfg.separator)
        return multiple_choice(lm, items)["acc"]

    task = {name: (accuracy(p, held_items), accuracy(p, train_items))
            for name, p in (("no plugin", None), ("plug-and-play mapper", plugin),
                            ("task-specific mapper", task_plugin))}
    tuned_same = weights_digest(tuned) == tuned_digest
    elapsed = time.perf_counter() - t0

    lines = [f"held-out people: {len(held_people)} of {len(names)}; chance accuracy "
             f"{1 / len(PROFESSIONS):.3f}",
             "masked-mention loss (frozen base model, held-out people, nats per mention token)"]
    lines += [f"  {k:<28} {v:.3f}" for k, v in mlm.items()]
    lines += ["downstream accuracy (fine-tuned copy)  held-out  training people"]
    lines += [f"  {k:<28} {a:>14.3f} {b:>10.3f}" for k, (a, b) in task.items()]
    gain_pnp = task["plug-and-play mapper"][0] - task["no plugin"][0]
    gain_task = task["task-specific mapper"][0] - task["no plugin"][0]
    kept = gain_pnp / gain_task if gain_task > 0 else float("nan")
    lines.append(f"plug-and-play keeps {kept:.0%} of the task-specific mapper's gain on held-out "
                 f"people ({gain_pnp:+.3f} vs {gain_task:+.3f})")
    lines.append(f"weights bit-identical (SHA-256): base model after map-tuning {base_same}, "
                 f"fine-tuned copy after mapper tuning and evaluation {tuned_same}")
    lines.append(f"total {elapsed:.0f} s")
    report = "\n".join(lines)
    print(report)
    (out / "table.txt").write_text(report + "\n")
    return {"mlm": mlm, "task": task, "base_same": base_same, "tuned_same": tuned_same,
            "link_prediction": lp, "kept": kept, "seconds": elapsed}


if __name__ == "__main__":
    run_main(main, parse_config(PluginConfig, description=__doc__))
