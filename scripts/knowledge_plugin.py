"""Knowledge plugin (map-tuning) at small scale, on a synthetic knowledge graph.

    python scripts/knowledge_plugin.py                  # the default run, 3 seeds (DESIGN.md)
    python scripts/knowledge_plugin.py --seeds 0        # one seed
    python scripts/knowledge_plugin.py --people 40 --pretrain-steps 10 ...   # tiny (the test)

The world: people with a profession and a city, professions with a workplace, cities in countries,
friendships. All of it is in the triple file (`OUT_DIR/seed<S>/kg.tsv`) that TransE learns. The
people fall into two kinds:

- known people: the pretraining text states their facts, plainly ("Tamiku is a doctor.",
  "Tamiku works at the hospital.", "Tamiku lives in Lumera.") and after a description that comes
  first ("the doctor Tamiku treats the sick.", "the doctor Tamiku works at the hospital."); the
  downstream task is fine-tuned on most of them and its length chosen on the rest (the
  fine-tuning validation people);
- map-tuning people, plugin-validation people and held-out people: the pretraining text only names
  them ("Tamiku went home.", "Tamiku met Bosale."): what they are is in the graph alone.

Map-tuning (the general mapper of plug-and-play) reads a corpus about the known and map-tuning
people in which the text after a mention states graph facts: profession, what the profession does,
city, a city's country ("[E] Tamiku is a doctor.", "[E] Tamiku treats the sick.", "[E] Tamiku lives
in Lumera.", "[E] Lumera is in Astovia."), with the loss on the fact, where the entity matters. No
sentence of it says where anyone works. The frozen base model runs with dropout 0.25, as the
official general mapper (it was pretrained with dropout 0.1, as BERT).

Downstream: a fully fine-tuned copy answers "where does NAME work? at the" -> workplace (6
choices), a question form the pretraining text never uses; the number of fine-tuning steps (0
included) is the first best on the validation people's accuracy. On held-out people (whose
workplace only the graph holds, through their profession) it is scored with no plugin, with the
plug-and-play mapper (map-tuned once on the base model, plugged in unchanged) and with a
task-specific mapper (started from the general one, as the official code does, and tuned on the
task loss of the frozen fine-tuned copy). Each learning rate in a list is tried and the one best on
validation kept: the mapper's on the map-tuning loss of the plugin-validation people, the
fine-tuning's on the validation people's accuracy, the task-specific mapper's on the
plugin-validation people's accuracy. The held-out people choose nothing.
"""

import copy
import random
import statistics
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
                                              TransEConfig, build_sequence, evaluate_loss,
                                              link_prediction, load_knowledge, read_triples,
                                              save_knowledge, train_transe, tune_mapper,
                                              weights_digest)
from minillm.model import IGNORE_INDEX, ModelConfig
from minillm.sft import PackedLoader, encode_example, pack
from minillm.tokenizer import train_bpe
from minillm.train import TrainConfig, Trainer

PROFESSIONS = {"doctor": "hospital", "baker": "bakery", "farmer": "farm", "sailor": "harbour",
               "teacher": "school", "painter": "studio"}
DUTIES = {"doctor": "treats the sick", "baker": "bakes bread", "farmer": "grows wheat",
          "sailor": "sails the sea", "teacher": "teaches a class", "painter": "paints a wall"}
CITIES = {"Lumera": "Astovia", "Pexton": "Astovia", "Varno": "Brelland", "Quillis": "Brelland",
          "Ostra": "Corvana", "Dunmere": "Corvana"}
ACTS = ["went home", "read a book", "sang a song", "walked to town", "ate some bread",
        "slept late", "wrote a letter", "lost a key"]
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


@dataclass
class PluginConfig:
    out_dir: str = "out/knowledge_plugin"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={
        "help": "one whole run (world, TransE, pretraining, ...) per seed; the table gives each "
                "and their mean"})
    people: int = 240
    held_out: float = field(default=0.25, metadata={"help": "share of people held out (the test)"})
    map_people: float = field(default=0.25, metadata={
        "help": "share of people in the map-tuning corpus"})
    plugin_val: float = field(default=0.1, metadata={
        "help": "share of people that validate the mappers (graph-only, like the held-out)"})
    val_share: float = field(default=0.2, metadata={
        "help": "share of the known people that validate the fine-tuning"})
    transe_dim: int = 32
    transe_epochs: int = 200
    vocab_size: int = 512
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    pretrain_steps: int = 800
    pretrain_dropout: float = field(default=0.1, metadata={
        "help": "dropout while pretraining (BERT's 0.1: the model the official mapper is tuned "
                "through had learned to work under dropout)"})
    finetune_steps: int = field(default=150, metadata={
        "help": "most fine-tuning steps; the copy kept is the one best on the validation people"})
    finetune_eval_every: int = 5
    finetune_lrs: list[float] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3])
    map_steps: int = 600
    map_lrs: list[float] = field(default_factory=lambda: [3e-3, 1e-2, 3e-2])
    map_dropout: float = field(default=0.25, metadata={
        "help": "dropout of the frozen base model during map-tuning (official general mapper: 0.25)"})
    task_map_steps: int = 150
    task_lrs: list[float] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3])
    task_dropout: float = field(default=0.1, metadata={
        "help": "dropout of the frozen fine-tuned copy while the task-specific mapper trains (the "
                "official code runs it in training mode; BERT's dropout is 0.1)"})
    task_template: str = field(default="where does {name} work? at the", metadata={
        "help": "the downstream question; the answer is the workplace. Its wording is not in the "
                "pretraining text, so fine-tuning has a format to teach"})
    batch_size: int = 32
    separator: str = field(default="", metadata={
        "help": "text between the pseudo-token and the mention (the paper: ' /')"})
    threads: int = field(default=1, metadata={
        "help": "torch CPU threads; the tiny model gains nothing from more, and on a shared machine "
                "more threads run much slower"})


# --- the world ----------------------------------------------------------------------------------------

@dataclass
class World:
    names: list[str]
    profession: dict
    city: dict
    friends: dict
    triples: list
    groups: dict  # known, finetune_val, map, plugin_val, held_out -> names


def make_world(cfg: PluginConfig, rng: random.Random) -> World:
    names: list[str] = []
    while len(names) < cfg.people:
        name = "".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize()
        if name not in names:
            names.append(name)
    profession = {n: rng.choice(list(PROFESSIONS)) for n in names}
    city = {n: rng.choice(list(CITIES)) for n in names}
    friends = {n: rng.sample([m for m in names if m != n], 2) for n in names}
    triples = [(n, "profession", profession[n]) for n in names]
    triples += [(n, "lives_in", city[n]) for n in names]
    triples += [(c, "located_in", k) for c, k in CITIES.items()]
    triples += [(p, "works_at", w) for p, w in PROFESSIONS.items()]
    triples += [(n, "friend_of", f) for n in names for f in friends[n]]
    order = rng.sample(names, len(names))
    sizes = [round(cfg.held_out * len(names)), round(cfg.plugin_val * len(names)),
             round(cfg.map_people * len(names))]
    held, plugin_val, mapped = (order[sum(sizes[:i]):sum(sizes[:i + 1])] for i in range(3))
    known = order[sum(sizes):]
    n_val = max(1, round(cfg.val_share * len(known)))
    groups = {"known": known[n_val:], "finetune_val": known[:n_val], "map": mapped,
              "plugin_val": plugin_val, "held_out": held}
    return World(names, profession, city, friends, triples, groups)


def pretraining_text(w: World, rng: random.Random) -> list[str]:
    """One-sentence documents. Known people's facts are stated plainly (so that the name recalls
    them) and after a description that comes first ("the doctor Tamiku ..."), the role the
    injected "[E]" takes later; everyone else is only named. General sentences say what each
    profession does and where it works, and where each city is."""
    docs = []
    known = w.groups["known"] + w.groups["finetune_val"]
    for n in w.names:
        docs += [f"{n} {act}." for act in rng.sample(ACTS, 3)]
        docs.append(f"{n} met {rng.choice(w.names)}.")
        if n not in known:
            continue
        p, c = w.profession[n], w.city[n]
        docs += [f"{n} is a {p}.", f"{n} lives in {c}.", f"{n} works at the {PROFESSIONS[p]}.",
                 f"{n} is a friend of {w.friends[n][0]}.", f"the {p} {n} {rng.choice(ACTS)}.",
                 f"the {p} {n} {DUTIES[p]}.", f"the {p} {n} works at the {PROFESSIONS[p]}.",
                 f"the {c} resident {n} {rng.choice(ACTS)}."]
    for p, workplace in PROFESSIONS.items():
        docs += [f"a {p} works at the {workplace}.", f"a {p} {DUTIES[p]}."] * 10
    for c, k in CITIES.items():
        docs += [f"{c} is in {k}."] * 10
    rng.shuffle(docs)
    return docs


def fact_sentences(w: World, people) -> list[tuple[str, str, str]]:
    """(text, subject, object) of the map-tuning corpus: graph facts of three relations and what
    a profession does, the subject at the start, the object (where the loss goes) at the end. No
    "works at". (Friendships stay in the graph only: a friend's name is arbitrary, and its tokens
    would outweigh the rest of the loss.)"""
    facts = []
    for n in people:
        p = w.profession[n]
        facts += [(f"{n} is a {p}.", n, p), (f"{n} {DUTIES[p]}.", n, DUTIES[p]),
                  (f"{n} lives in {w.city[n]}.", n, w.city[n])]
    facts += [(f"{c} is in {k}.", c, k) for c, k in CITIES.items()]
    return facts


# --- training pieces ---------------------------------------------------------------------------------

class KeepBest:
    """Trainer callback: every `every` steps score the model on validation (`score(model)` ->
    (accuracy, loss)) and keep a copy of the weights when the accuracy beats the best so far: the
    first best, as the official code keeps its checkpoint. `best` is (accuracy, -loss) there."""

    def __init__(self, every: int, score):
        self.every, self.score = every, score
        self.best, self.best_step, self.state, self.curve = (-1.0, 0.0), 0, None, []

    def consider(self, model, step: int) -> None:
        acc, loss = self.score(model)
        self.curve.append((step, acc, loss))
        if acc > self.best[0]:
            self.best, self.best_step = (acc, -loss), step
            self.state = copy.deepcopy(model.state_dict())

    def on_step_end(self, trainer, record) -> None:
        if trainer.step % self.every == 0 or trainer.step == trainer.cfg.max_steps:
            self.consider(trainer.model, trainer.step)


def train_lm(cfg: PluginConfig, seed: int, out: Path, name: str, encoded, steps: int, lr: float,
             model_config: ModelConfig | None, tok, init_from: str | None = None, callbacks=()):
    # Each document attends to itself only. Over windows packed once with plain causal attention
    # the tiny model learned which sentence follows which (loss 0.08) rather than what a sentence
    # says about its name: it then recalled a known person's profession no better than the prior.
    encoded = list(encoded)
    windows = len(pack(encoded, 64, tok.eot_id, attend_across=False).inputs)
    batch_size = min(cfg.batch_size, windows)  # a small task packs into few windows
    loader = PackedLoader(encoded, block_size=64, batch_size=batch_size, pad_id=tok.eot_id,
                          seed=seed, attend_across=False)
    tcfg = TrainConfig(out_dir=str(out / name), max_steps=steps, lr=lr, warmup_steps=min(20, steps),
                       batch_size=batch_size, block_size=64, eval_interval=0, ckpt_interval=steps,
                       log_interval=max(steps // 4, 1), overwrite=True, progress=False,
                       seed=seed, init_from=init_from, weight_decay=0.0)
    trainer = Trainer(tcfg, DistInfo(), model_config=model_config, data_source=loader, tokenizer=tok,
                      callbacks=list(callbacks))
    history = trainer.train()
    return trainer.model.eval(), trainer.checkpoint_path, history


def run_seed(cfg: PluginConfig, seed: int, log) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    out = Path(cfg.out_dir) / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    w = make_world(cfg, rng)
    g = w.groups

    # --- knowledge embeddings: TransE on the triple file ---
    kg_path = out / "kg.tsv"
    kg_path.write_text("".join(f"{h}\t{r}\t{t}\n" for h, r, t in w.triples))
    triples = read_triples(kg_path)
    vocab = KGVocab.from_triples(triples)
    ids_N3 = vocab.encode(triples)
    transe, transe_losses = train_transe(ids_N3, len(vocab.entities), len(vocab.relations),
                                         TransEConfig(dim=cfg.transe_dim, epochs=cfg.transe_epochs,
                                                      seed=seed))
    save_knowledge(out / "knowledge.pt", KnowledgeEmbeddings.from_transe(transe, vocab))
    knowledge = load_knowledge(out / "knowledge.pt")
    prof_N3 = ids_N3[ids_N3[:, 1] == vocab.relation_index["profession"]]
    lp = link_prediction(transe, prof_N3, ids_N3)
    log(f"TransE: {len(triples)} triples, {len(vocab.entities)} entities, loss "
        f"{transe_losses[0]:.3f} -> {transe_losses[-1]:.3f}; filtered link prediction on the "
        f"profession triples: mean rank {lp['mean_rank']:.1f}, hits@10 {lp['hits@10']:.3f} "
        f"({time.perf_counter() - t0:.0f} s)")

    # --- a tiny GPT pretrained on the text ---
    docs = pretraining_text(w, rng)
    tok = train_bpe(docs, cfg.vocab_size)
    model_cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=96, n_layer=cfg.n_layer,
                            n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.pretrain_dropout)
    base, base_path, hist = train_lm(cfg, seed, out, "pretrain",
                                     [encode_example(tok, "", d) for d in docs],
                                     cfg.pretrain_steps, 3e-3, model_cfg, tok)
    log(f"pretrained {base.num_params() / 1e3:.0f}k parameters, {len(docs)} documents: loss "
        f"{hist[0]['loss']:.3f} -> {hist[-1]['loss']:.3f} ({time.perf_counter() - t0:.0f} s)")

    # --- general map-tuning on the frozen base model ---
    def fact_examples(people, inject):
        # bos=False: documents start at position 0 without a separator in pretraining, and
        # PluginLM's contexts do too
        return [build_sequence(tok, text, [Link(0, len(subject), subject)], vocab, inject=inject,
                               separator=cfg.separator, bos=False,
                               loss_spans=[(len(text) - 1 - len(obj), len(text) - 1)])
                for text, subject, obj in fact_sentences(w, people)]

    map_train = fact_examples(g["known"] + g["finetune_val"] + g["map"], True)
    base_digest = weights_digest(base)
    map_runs = {}
    for lr in cfg.map_lrs:
        plugin = KnowledgePlugin(knowledge, cfg.n_embd)
        losses = tune_mapper(base, plugin, map_train, MapperConfig(
            steps=cfg.map_steps, batch_size=cfg.batch_size, lr=lr, dropout=cfg.map_dropout, seed=seed))
        val = evaluate_loss(base, plugin, fact_examples(g["plugin_val"], True))
        map_runs[lr] = (val, plugin, losses)
        log(f"map-tuning lr {lr:g}: loss {sum(losses[:10]) / 10:.3f} (first 10 steps) -> "
            f"{sum(losses[-10:]) / 10:.3f} (last 10); plugin-validation fact loss {val:.3f}")
    map_lr = min(map_runs, key=lambda lr: map_runs[lr][0])
    plugin = map_runs[map_lr][1]
    permutation = torch.randperm(len(vocab.entities), generator=torch.Generator().manual_seed(seed + 1))
    shuffled = KnowledgePlugin(knowledge, cfg.n_embd, permutation=permutation)
    tune_mapper(base, shuffled, map_train, MapperConfig(
        steps=cfg.map_steps, batch_size=cfg.batch_size, lr=map_lr, dropout=cfg.map_dropout, seed=seed))
    held = g["held_out"]
    facts = {"no plugin": evaluate_loss(base, None, fact_examples(held, False)),
             "plugin": evaluate_loss(base, plugin, fact_examples(held, True)),
             "shuffled entity vectors": evaluate_loss(base, shuffled, fact_examples(held, True))}
    linker = NameLinker(w.names)

    def profession_items(people):
        choices = [" " + p for p in PROFESSIONS]
        return [{"context": f"{n} is a", "choices": choices,
                 "answer": choices.index(" " + w.profession[n])} for n in people]

    def accuracy(model, p, items):
        return multiple_choice(PluginLM(model, tok, p, linker, vocab, separator=cfg.separator),
                               items)["acc"]

    def workplace_items(people):
        choices = [" " + x for x in PROFESSIONS.values()]
        return [{"context": cfg.task_template.format(name=n), "choices": choices,
                 "answer": choices.index(" " + PROFESSIONS[w.profession[n]])} for n in people]

    arms = (("no plugin", None), ("plugin", plugin), ("shuffled entity vectors", shuffled))
    profession_acc = {k: accuracy(base, p, profession_items(held)) for k, p in arms}
    workplace_acc = {k: accuracy(base, p, workplace_items(held)) for k, p in arms}
    base_same = weights_digest(base) == base_digest
    log(f"map-tuning done, lr {map_lr:g} chosen ({time.perf_counter() - t0:.0f} s)")

    # --- downstream: a fully fine-tuned copy, "where does NAME work? at the" -> workplace ---
    def item(n):
        return workplace_items([n])[0]

    def task_score(p, people):
        def score(model):
            items = [item(n) for n in people]
            lm = PluginLM(model, tok, p, linker, vocab, separator=cfg.separator)
            scores = lm.score([it["context"] for it in items],
                              [it["choices"][it["answer"]] for it in items])
            return accuracy(model, p, items), -sum(s for s, _ in scores) / len(items)
        return score

    task_train = [encode_example(tok, item(n)["context"], item(n)["choices"][item(n)["answer"]])
                  for n in g["known"]]
    ft_runs = {}
    for lr in cfg.finetune_lrs:
        keeper = KeepBest(cfg.finetune_eval_every, task_score(None, g["finetune_val"]))
        keeper.consider(base, 0)  # no fine-tuning at all is a candidate too
        tuned, _, _ = train_lm(cfg, seed, out, "finetune", task_train, cfg.finetune_steps, lr, None,
                               tok, init_from=str(base_path), callbacks=[keeper])
        tuned.load_state_dict(keeper.state)
        ft_runs[lr] = (keeper.best, tuned, keeper)
        log(f"fine-tuning lr {lr:g}: validation accuracy / answer loss by step "
            + ", ".join(f"{s}: {a:.2f}/{l:.2f}" for s, a, l in keeper.curve)
            + f"; kept step {keeper.best_step}")
    ft_lr = max(ft_runs, key=lambda lr: ft_runs[lr][0])
    tuned, ft_step = ft_runs[ft_lr][1], ft_runs[ft_lr][2].best_step
    tuned_digest = weights_digest(tuned)

    task_examples = []  # the task loss with the plugin: answer tokens only
    for n in g["known"]:
        it = item(n)
        ctx = build_sequence(tok, it["context"], linker(it["context"]), vocab,
                             separator=cfg.separator, bos=False)
        answer = tok.encode_ordinary(it["choices"][it["answer"]]) + [tok.eot_id]
        targets = [IGNORE_INDEX] * (len(ctx.ids) - 1) + answer + [IGNORE_INDEX]
        task_examples.append(PluginSequence(ctx.ids + answer, ctx.slots, targets=targets))
    task_runs = {}
    for lr in cfg.task_lrs:
        task_plugin = copy.deepcopy(plugin)  # the official task-specific mapper starts from the general one
        losses = tune_mapper(tuned, task_plugin, task_examples, MapperConfig(
            steps=cfg.task_map_steps, batch_size=cfg.batch_size, lr=lr, dropout=cfg.task_dropout,
            seed=seed))
        val = task_score(task_plugin, g["plugin_val"])(tuned)
        task_runs[lr] = ((val[0], -val[1]), task_plugin)
        log(f"task-specific mapper lr {lr:g}: task loss {sum(losses[:10]) / 10:.3f} -> "
            f"{sum(losses[-10:]) / 10:.3f}; plugin-validation accuracy {val[0]:.3f}")
    task_lr = max(task_runs, key=lambda lr: task_runs[lr][0])
    task_plugin = task_runs[task_lr][1]

    held_items = [item(n) for n in held]
    train_items = [item(n) for n in g["known"]]
    task = {name: (accuracy(tuned, p, held_items), accuracy(tuned, p, train_items))
            for name, p in (("no plugin", None), ("plug-and-play mapper", plugin),
                            ("task-specific mapper", task_plugin))}
    tuned_same = weights_digest(tuned) == tuned_digest
    elapsed = time.perf_counter() - t0
    log(f"seed {seed} done ({elapsed:.0f} s)")
    return {"facts": facts, "profession_acc": profession_acc, "workplace_acc": workplace_acc,
            "task": task, "base_same": base_same,
            "tuned_same": tuned_same, "link_prediction": lp, "seconds": elapsed,
            "chosen": {"map_lr": map_lr, "finetune_lr": ft_lr, "finetune_step": ft_step,
                       "task_lr": task_lr}, "held_out": len(held), "people": len(w.names)}


def report(cfg: PluginConfig, runs: dict) -> str:
    seeds = list(runs)
    first = runs[seeds[0]]

    def row(label, values, fmt):
        cells = "".join(f"{v:>9{fmt}}" for v in values)
        mean = f"{statistics.mean(values):>9{fmt}}" if len(values) > 1 else ""
        return f"  {label:<30}{cells}{mean}"

    head = "".join(f"{'seed ' + str(s):>9}" for s in seeds) + (f"{'mean':>9}" if len(seeds) > 1 else "")
    lines = [(f"held-out people: {first['held_out']} of {first['people']}; chance accuracy "
              f"{1 / len(PROFESSIONS):.3f}"),
             f"fact loss, frozen base model, held-out people (nats per fact token){head}"]
    lines += [row(k, [runs[s]["facts"][k] for s in seeds], ".3f") for k in first["facts"]]
    lines.append(f"'NAME is a' -> profession accuracy, frozen base model, held-out{head}")
    lines += [row(k, [runs[s]["profession_acc"][k] for s in seeds], ".3f")
              for k in first["profession_acc"]]
    task_text = cfg.task_template.format(name="NAME")
    lines.append(f"'{task_text}' accuracy, frozen base model (before fine-tuning), held-out{head}")
    lines += [row(k, [runs[s]["workplace_acc"][k] for s in seeds], ".3f")
              for k in first["workplace_acc"]]
    lines.append(f"'{task_text}' accuracy, fine-tuned copy, held-out people{head}")
    lines += [row(k, [runs[s]["task"][k][0] for s in seeds], ".3f") for k in first["task"]]
    lines.append(f"same, fine-tuning people{head}")
    lines += [row(k, [runs[s]["task"][k][1] for s in seeds], ".3f") for k in first["task"]]
    lines.append("chosen on validation: " + "; ".join(
        f"seed {s}: map lr {runs[s]['chosen']['map_lr']:g}, fine-tune lr "
        f"{runs[s]['chosen']['finetune_lr']:g} step {runs[s]['chosen']['finetune_step']}, task "
        f"lr {runs[s]['chosen']['task_lr']:g}" for s in seeds))
    same = all(runs[s]["base_same"] and runs[s]["tuned_same"] for s in seeds)
    lines.append(f"weights bit-identical (SHA-256) after map-tuning and mapper tuning, every seed: {same}")
    lines.append("seconds per seed: " + ", ".join(f"{runs[s]['seconds']:.0f}" for s in seeds))
    return "\n".join(lines)


def main(cfg: PluginConfig) -> dict:
    for name in ("held_out", "map_people", "plugin_val", "val_share"):
        if not 0 < getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be in (0, 1), got {getattr(cfg, name)}")
    if cfg.held_out + cfg.map_people + cfg.plugin_val >= 0.9:
        raise UserError("--held-out + --map-people + --plugin-val must leave at least a tenth of "
                        "the people known")
    if cfg.people < 20:
        raise UserError(f"--people must be at least 20, got {cfg.people}")
    if not 0 <= cfg.map_dropout < 1 or not 0 <= cfg.task_dropout < 1:
        raise UserError("--map-dropout and --task-dropout must be in [0, 1)")
    for name in ("finetune_lrs", "map_lrs", "task_lrs"):
        if not getattr(cfg, name) or any(not lr > 0 for lr in getattr(cfg, name)):
            raise UserError(f"--{name.replace('_', '-')} must be one or more positive numbers")
    if "{name}" not in cfg.task_template:
        raise UserError(f"--task-template must hold {{name}}, got {cfg.task_template!r}")
    if cfg.threads < 1:
        raise UserError(f"--threads must be at least 1, got {cfg.threads}")
    torch.set_num_threads(cfg.threads)
    runs = {seed: run_seed(cfg, seed, print) for seed in cfg.seeds}
    text = report(cfg, runs)
    print(text)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out_dir) / "table.txt").write_text(text + "\n")
    return runs


if __name__ == "__main__":
    run_main(main, parse_config(PluginConfig, description=__doc__))
