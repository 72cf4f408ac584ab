"""The o1 roadmap, part 1: does search with learned rewards beat greedy decoding at equal tokens?

    python scripts/o1.py                      # the default: a tiny policy trained here, minutes
    python scripts/o1.py --tiny true          # a seconds-long smoke run
    python scripts/o1.py --budgets 1 2 4 8 16 --eval-problems 200

Trains (or reuses, from `--out-dir`) a tiny GPT policy on worked column additions
(`minillm.methods.o1`: pretraining, then SFT), samples chains on train problems of `--eval-level`,
labels them with the checker to train an outcome reward model (ORM) and with Monte-Carlo rollouts
to train a process reward model (PRM) (`minillm.methods.o1_reward`). Reports how well each ranks
right above wrong held-out chains (AUC, pooled and within a question). Then, on held-out problems
of `--eval-level`, every method answers each question within a budget of N x `cap` generated
tokens (`cap`: the longest reference solution of the level plus a margin, so greedy fits in N = 1):
greedy, majority@N, ORM best-of-N, PRM step-level beam search, MCTS with PRM evaluation; pass@N
(some chain sampled for best-of-N is right) is the ceiling. The checker grades answers; no search
reads it. Prints the accuracy table and the tokens spent, and writes `results.json` to `--out-dir`.
"""

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from minillm.cli import given_fields, parse_config
from minillm.errors import UserError, run_main
from minillm.fileio import write_json
from minillm.methods import o1, o1_reward
from minillm.tasks import Arithmetic, check


@dataclass
class O1Config:
    out_dir: str = "out/o1"
    levels: list[int] = field(default_factory=lambda: [1, 2, 3], metadata={
        "help": "digits per operand the policy is trained on"})
    eval_level: int = field(default=3, metadata={"help": "the level of the held-out questions"})
    eval_problems: int = field(default=100, metadata={"help": "held-out questions"})
    budgets: list[int] = field(default_factory=lambda: [1, 4, 16], metadata={
        "help": "N: each method may generate N x cap tokens per question"})
    pretrain_steps: int = 200
    sft_steps: int = 400
    n_layer: int = 2
    n_embd: int = 64
    rm_problems: int = field(default=200, metadata={
        "help": "train questions of --eval-level whose sampled chains train the reward models"})
    rm_samples: int = field(default=4, metadata={"help": "chains sampled per such question"})
    rollouts: int = field(default=4, metadata={"help": "Monte-Carlo rollouts per step (PRM data)"})
    rm_steps: int = field(default=300, metadata={"help": "training steps of each reward model"})
    rm_lr: float = field(default=1e-3, metadata={"help": "learning rate of the reward models"})
    beam_expand: int = field(default=4, metadata={
        "help": "beam search: next steps sampled per beam (width = N / expand)"})
    mcts_children: int = field(default=4, metadata={
        "help": "MCTS: steps sampled per expansion (at most N / 2, at least 2, at most N)"})
    c_uct: float = 1.0
    temperature: float = field(default=0.4, metadata={
        "help": "sampling temperature of every search and of the reward models' data"})
    tiny: bool = field(default=False, metadata={"help": "a seconds-long smoke run"})
    seed: int = 0
    threads: int = field(default=1, metadata={
        "help": "torch CPU threads (a tiny model runs fastest on one); 0: torch's default"})


def check_config(cfg: O1Config) -> None:
    if not cfg.budgets or min(cfg.budgets) < 1:
        raise UserError(f"--budgets {cfg.budgets}: give one or more N of at least 1")
    for name in ("eval_problems", "rm_problems", "rm_samples", "rollouts", "rm_steps",
                 "beam_expand", "mcts_children", "n_layer", "n_embd", "sft_steps"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least 1")
    if cfg.eval_level not in cfg.levels:
        raise UserError(f"--eval-level {cfg.eval_level} is not among the policy's --levels "
                        f"{cfg.levels}")
    if cfg.temperature <= 0:
        raise UserError(f"--temperature {cfg.temperature}: search samples, give a value above 0")
    if not cfg.rm_lr > 0:
        raise UserError(f"--rm-lr {cfg.rm_lr}: give a learning rate above 0")
    # 0 allowed: torch's default threads, no pretraining, no exploration
    for name in ("threads", "pretrain_steps", "c_uct"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be 0 or more")


def shrink(cfg: O1Config, given: set[str] = frozenset()) -> O1Config:
    """The --tiny smoke run: everything a few steps or items, except the flags the user `given`."""
    small = {"levels": [1, 2], "eval_level": 2, "eval_problems": 3, "budgets": [1, 2],
             "pretrain_steps": 4, "sft_steps": 8, "n_layer": 1, "n_embd": 16, "rm_problems": 4,
             "rm_samples": 2, "rollouts": 2, "rm_steps": 4, "beam_expand": 2, "mcts_children": 2}
    return O1Config(**{**asdict(cfg), **{k: v for k, v in small.items() if k not in given}})


def reward_models(cfg: O1Config, policy: o1.Policy, cap: int, out_dir: Path, log):
    """The ORM and PRM, trained on chains sampled on train questions of the eval level; reused from
    `out_dir` when they were trained with the same settings (`reward_models.json`)."""
    paths = out_dir / "orm.pt", out_dir / "prm.pt"
    stamp = out_dir / "reward_models.json"
    key = {name: getattr(cfg, name) for name in (
        "levels", "eval_level", "pretrain_steps", "sft_steps", "n_layer", "n_embd", "rm_problems",
        "rm_samples", "rollouts", "rm_steps", "rm_lr", "temperature", "seed", "tiny")}
    if all(p.is_file() for p in paths) and stamp.is_file() and json.loads(stamp.read_text()) == key:
        log(f"reusing {paths[0]} and {paths[1]}")
        return (o1_reward.OutcomeRewardModel.load(paths[0]),
                o1_reward.ProcessRewardModel.load(paths[1]), {})
    lm = policy.lm()
    problems = o1.task_problems(Arithmetic(), cfg.eval_level, cfg.rm_problems, "train",
                                seed=cfg.seed + 2)
    start = time.time()
    chains = [[str(c) for c in cs] for cs in o1.sample(lm, problems, cfg.rm_samples,
                                                        cfg.temperature, cap, seed=cfg.seed)]
    right = sum(check(p, c) for p, cs in zip(problems, chains) for c in cs)
    total = sum(len(cs) for cs in chains)
    log(f"reward data: {total} chains on {len(problems)} train questions, {right} right "
        f"({time.time() - start:.0f} s)")
    start = time.time()
    prm_examples, rollout_tokens = o1_reward.process_examples(
        lm, problems, chains, cfg.rollouts, cap, cfg.temperature, seed=cfg.seed + 1)
    log(f"Monte-Carlo step values: {cfg.rollouts} rollouts per step, {rollout_tokens:,} tokens "
        f"({time.time() - start:.0f} s)")
    kwargs = dict(steps=cfg.rm_steps, batch_size=32, lr=cfg.rm_lr, seed=cfg.seed, log=log)
    start = time.time()
    orm = o1_reward.train_orm(policy.model, policy.tokenizer, problems, chains, **kwargs)
    prm = o1_reward.train_prm(policy.model, policy.tokenizer, prm_examples, **kwargs)
    log(f"trained the ORM and the PRM at learning rate {cfg.rm_lr:g} "
        f"({time.time() - start:.0f} s)")
    orm.save(paths[0])
    prm.save(paths[1])
    write_json(stamp, key)
    return orm, prm, {"chains": total, "right": right, "rollout_tokens": rollout_tokens}


def auc(scores: list[float], labels: list[bool], groups: list | None = None) -> float | None:
    """Probability that a right chain outscores a wrong one (ties count half), over all (right,
    wrong) pairs, or with `groups` over the pairs of the same group only (None: no such pair).
    Within a question is what best-of-N needs; pooled pairs mostly tell easy questions from hard
    ones."""
    groups = groups if groups is not None else [0] * len(scores)
    wins = pairs = 0
    for s, y, g in zip(scores, labels, groups):
        if not y:
            continue
        for t, z, h in zip(scores, labels, groups):
            if not z and g == h:
                wins += (s > t) + 0.5 * (s == t)
                pairs += 1
    return wins / pairs if pairs else None


def main(argv=None):
    cfg = parse_config(O1Config, argv, description=__doc__)
    check_config(cfg)
    if cfg.tiny:
        cfg = shrink(cfg, given_fields(O1Config, argv))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    t0 = time.time()

    def log(message):
        print(f"[{time.time() - t0:5.0f} s] {message}", flush=True)

    policy_cfg = o1.PolicyConfig(levels=cfg.levels, n_layer=cfg.n_layer, n_embd=cfg.n_embd,
                                 pretrain_steps=cfg.pretrain_steps, sft_steps=cfg.sft_steps,
                                 seed=cfg.seed, problems_per_level=60 if cfg.tiny else 3000)
    policy = o1.train_policy(policy_cfg, out_dir / "policy")
    log(f"policy: {policy.model.num_params() / 1e6:.2f}M parameters, levels {cfg.levels}, "
        f"{cfg.pretrain_steps} pretraining + {cfg.sft_steps} SFT steps ({out_dir / 'policy'})")
    questions = o1.task_problems(Arithmetic(), cfg.eval_level, cfg.eval_problems, "test",
                                 seed=cfg.seed)
    tok = policy.tokenizer
    cap = max(len(tok.encode_ordinary(q.solution)) for q in questions) + 4
    step_tokens = max(len(tok.encode_ordinary(s + "\n")) for q in questions
                      for s in q.steps) + 2
    log(f"held-out: {len(questions)} questions of level {cfg.eval_level}; cap {cap} tokens a "
        f"chain, {step_tokens} a step")
    orm, prm, rm_stats = reward_models(cfg, policy, cap, out_dir, log)
    lm = policy.lm()

    # How well do the reward models separate right from wrong held-out chains?
    held = o1.sample(lm, questions, 4, cfg.temperature, cap, seed=cfg.seed + 7)
    flat = [(i, q, str(c)) for i, (q, cs) in enumerate(zip(questions, held)) for c in cs]
    labels = [check(q, c) for _, q, c in flat]
    outcomes: dict[int, set[bool]] = {}
    for (i, _, _), right in zip(flat, labels):
        outcomes.setdefault(i, set()).add(right)
    mixed = sum(len(seen) == 2 for seen in outcomes.values())  # questions with right and wrong
    rm_quality = {}
    for name, rm in (("orm", orm), ("prm", prm)):
        scores = rm.score([q for _, q, _ in flat], [c for _, _, c in flat])
        rm_quality[name] = {"pooled": auc(scores, labels),
                            "within_question": auc(scores, labels, [i for i, _, _ in flat])}

    def fmt(x):
        return "n/a" if x is None else f"{x:.3f}"
    log(f"held-out chains: {sum(labels)}/{len(labels)} right, {mixed} of {len(questions)} "
        f"questions with both right and wrong chains; AUC right vs wrong, pooled / within a "
        f"question: ORM {fmt(rm_quality['orm']['pooled'])} / "
        f"{fmt(rm_quality['orm']['within_question'])}, PRM {fmt(rm_quality['prm']['pooled'])} / "
        f"{fmt(rm_quality['prm']['within_question'])}")

    methods = ["greedy", "majority", "orm-best-of-n", "prm-beam", "mcts-prm", "pass@n"]
    correct = {m: {n: 0 for n in cfg.budgets} for m in methods}
    tokens = {m: {n: 0 for n in cfg.budgets} for m in methods}
    seconds = {m: 0.0 for m in methods}
    for i, q in enumerate(questions):
        greedy = o1.greedy(lm, q, cap, cap)
        for n in cfg.budgets:
            limit, seed = n * cap, cfg.seed + 1000 * i + n
            results = {"greedy": greedy}
            start = time.time()
            budget = o1.TokenBudget(lm, limit)
            chains = o1.sample_chains(budget, q, cap, cfg.temperature, seed)
            seconds["majority"] += time.time() - start
            for name, text in (("majority", o1.voted_chain(chains)),
                               ("orm-best-of-n", o1.best_of_n(chains, q, orm))):
                results[name] = o1.SearchResult.of(text or "", budget, chains)
            results["pass@n"] = o1.SearchResult.of(
                next((c for c in chains if check(q, c)), chains[0] if chains else ""), budget,
                chains)
            expand = min(cfg.beam_expand, n)
            start = time.time()
            results["prm-beam"] = o1.beam_search(lm, prm, q, limit, width=max(n // expand, 1),
                                                 expand=expand, step_tokens=step_tokens,
                                                 temperature=cfg.temperature, seed=seed)
            seconds["prm-beam"] += time.time() - start
            start = time.time()
            # small budgets expand 2 children at a time, so that a chain can reach its answer
            children = min(cfg.mcts_children, max(2, n // 2), n)
            results["mcts-prm"] = o1.mcts(lm, prm, q, limit, children=children,
                                          step_tokens=step_tokens, c_uct=cfg.c_uct,
                                          temperature=cfg.temperature, seed=seed)
            seconds["mcts-prm"] += time.time() - start
            for name, result in results.items():
                correct[name][n] += check(q, result.text)
                tokens[name][n] += result.tokens
        if (i + 1) % max(len(questions) // 4, 1) == 0:
            log(f"searched {i + 1}/{len(questions)} questions")

    accuracy = {m: {n: correct[m][n] / len(questions) for n in cfg.budgets} for m in methods}
    mean_tokens = {m: {n: tokens[m][n] / len(questions) for n in cfg.budgets} for m in methods}
    names = {"greedy": "greedy", "majority": "majority@N", "orm-best-of-n": "ORM best-of-N",
             "prm-beam": "PRM beam search", "mcts-prm": "MCTS (PRM evaluation)",
             "pass@n": "pass@N (ceiling)"}
    header = "| method | " + " | ".join(f"N={n}" for n in cfg.budgets) + " |"
    rule = "|---|" + "---:|" * len(cfg.budgets)
    print(f"\nAccuracy on {len(questions)} held-out level-{cfg.eval_level} questions; budget "
          f"N x {cap} generated tokens per question\n{header}\n{rule}")
    for m in methods:
        print(f"| {names[m]} | " + " | ".join(f"{accuracy[m][n]:.3f}" for n in cfg.budgets) + " |")
    print(f"\nGenerated tokens per question (mean)\n{header}\n{rule}")
    for m in methods[:-1]:
        print(f"| {names[m]} | " + " | ".join(f"{mean_tokens[m][n]:.0f}" for n in cfg.budgets)
              + " |")
    results = {"config": asdict(cfg), "cap": cap, "step_tokens": step_tokens,
               "questions": len(questions), "accuracy": accuracy, "tokens": mean_tokens,
               "reward_model_auc": rm_quality, "reward_data": rm_stats, "search_seconds": seconds,
               "seconds": time.time() - t0}
    write_json(out_dir / "results.json", results, indent=1)
    log(f"wrote {out_dir / 'results.json'}")
    return results


if __name__ == "__main__":
    run_main(main)
