"""The o1 roadmap, part 2: does learning from search beat plain SFT? (minillm.methods.o1_learning)

    python scripts/o1_learn.py                 # the default run (DESIGN.md: numbers and time measured)
    python scripts/o1_learn.py --tiny          # a smoke run of a few seconds (the test)

The setting is the one where learning from search has something to learn from: worked solutions
are few (`--policy-problems-per-level` per level), questions with checkable answers are many.

Steps:
1. The policy: `minillm.methods.o1.train_policy` (pretraining + SFT on worked solutions of
   `--policy-levels`), trained once and cached in `OUT_DIR/policy`.
2. From that one policy, each learner runs `--rounds` rounds of `--steps-per-round` optimizer
   steps: expert iteration, GRPO and DPO sample `--group-size` chains for each of
   `--questions-per-round` questions of `--question-levels` (train split; the learner uses only
   their answers, through the checker, never their worked solutions), and the control (`sft`)
   continues plain SFT on the policy's original worked solutions. Same optimizer (AdamW, a
   `--warmup-steps` linear warmup), same steps and batch size; each arm at its own learning rate
   (`--sft-lr`, `--expert-lr`, `--grpo-lr`, `--dpo-lr`: the defaults are a sweep's picks on seed
   0, DESIGN.md). GRPO's and DPO's reference is the initial policy or, with `--grpo-reference
   round` / `--dpo-reference round`, the policy at each round's start (iterative DPO).
3. After every round: the reward of the round's samples, each learner's gauges (GRPO's KL and
   clipped fraction, DPO's implicit rewards and pair accuracy) and greedy accuracy on
   `--eval-problems` held-out (test split) problems of `--eval-level` (by default 4 digits,
   harder than anything the policy or the learners saw) and of every question level (3 digits
   by default).

`--grpo-rewards process` gives GRPO per-step rewards from o1's process reward model, trained
first on Monte-Carlo step values of the policy's chains (`OUT_DIR/prm.pt`); `--keep scores` has
expert iteration keep each question's best chain by o1's outcome reward model (`OUT_DIR/orm.pt`)
instead of the verified ones.

Each learner's rounds are checkpointed in `OUT_DIR/<method>.pt` (a killed run, started again,
resumes at the round it was in); the tables (accuracy, sample reward) are printed and the
records written to `OUT_DIR/results.json`.
"""

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minillm.cli import given_fields, parse_config
from minillm.errors import UserError, run_main
from minillm.fileio import write_json
from minillm.methods.o1 import PolicyConfig, policy_problems, task_problems, train_policy
from minillm.methods.o1_learning import METHODS, LearnConfig, run_rounds, sample_rollouts
from minillm.methods.o1_reward import (OutcomeRewardModel, ProcessRewardModel, process_examples,
                                       train_orm, train_prm)
from minillm.tasks import Arithmetic, canonical


@dataclass
class O1LearnConfig:
    out_dir: str = field(default="out/o1_learn", metadata={
        "help": "the cached policy (OUT_DIR/policy), round states and results.json"})
    tiny: bool = field(default=False, metadata={"help": "a smoke run: tiny policy, one round"})
    methods: list[str] = field(default_factory=lambda: ["expert", "grpo", "dpo"], metadata={
        "help": "learners compared with the SFT control: expert, grpo, dpo"})
    # the policy (minillm.methods.o1.PolicyConfig)
    policy_levels: list[int] = field(default_factory=lambda: [1, 2, 3])
    policy_problems_per_level: int = field(default=300, metadata={
        "help": "worked solutions per level for the policy (few: questions outnumber solutions)"})
    policy_pretrain_steps: int = 400
    policy_sft_steps: int = 400
    # the experiment
    question_levels: list[int] = field(default_factory=lambda: [3], metadata={
        "help": "levels whose train-split questions the learners sample on (answers only)"})
    question_pool: int = field(default=2000, metadata={
        "help": "questions per level that rounds draw from; equal to --questions-per-round, every "
                "round revisits the same questions"})
    eval_level: int = field(default=4, metadata={"help": "the held-out level (test split)"})
    eval_problems: int = 200
    rounds: int = 8
    steps_per_round: int = field(default=64, metadata={
        "help": "optimizer steps per round, the same for every learner and the control"})
    batch_size: int = 16
    # each learner's own learning rate, picked by a sweep on seed 0 (README / DESIGN.md)
    sft_lr: float = 1e-4
    expert_lr: float = 1e-4
    grpo_lr: float = 3e-5
    dpo_lr: float = 1e-6
    warmup_steps: int = field(default=32, metadata={
        "help": "linear warmup over each learner's first optimizer steps, then constant"})
    questions_per_round: int = 128
    group_size: int = 8
    temperature: float = 1.0
    max_new_tokens: int = 64
    clip_eps: float = 0.2
    kl_coef: float = 0.04
    kl_estimator: str = field(default="k3", metadata={"help": "GRPO's KL: k3 or exact"})
    keep: str = field(default="verified", metadata={
        "help": "expert iteration keeps checker-verified chains (verified) or each question's "
                "best chain by o1's outcome reward model (scores)"})
    grpo_rewards: str = field(default="outcome", metadata={
        "help": "GRPO's rewards: outcome (the checker) or process (o1's PRM, per step)"})
    rm_questions: int = field(default=64, metadata={
        "help": "questions the reward model (ORM or PRM) learns on"})
    rm_chains: int = field(default=4, metadata={"help": "sampled chains per reward-model question"})
    prm_rollouts: int = field(default=4, metadata={"help": "PRM: rollouts per step (MC values)"})
    rm_steps: int = field(default=200, metadata={"help": "reward-model training steps"})
    grpo_reference: str = field(default="initial", metadata={
        "help": "GRPO's reference policy: initial (frozen) or round (the policy at each round's start)"})
    dpo_reference: str = field(default="initial", metadata={
        "help": "DPO's reference policy: initial (frozen) or round (iterative DPO)"})
    pairs_per_question: int = field(default=8, metadata={
        "help": "DPO: at most this many (right, wrong) pairs of distinct chains per question"})
    dpo_beta: float = 0.1
    dpo_nll_coef: float = field(default=0.0, metadata={
        "help": "NLL of the chosen chains added to DPO's loss (IRPO); 0: plain DPO"})
    dpo_cut: bool = field(default=False, metadata={
        "help": "DPO pairs compared up to the end of their first differing step (step-level)"})
    seed: int = 0
    threads: int = field(default=1, metadata={
        "help": "torch CPU threads (a tiny model gains nothing from more on a shared machine)"})


def tiny(cfg: O1LearnConfig, given: set[str] = frozenset()) -> O1LearnConfig:
    """The --tiny smoke run's settings, except the flags the user `given` (they are kept)."""
    small = dict(policy_levels=[1], policy_problems_per_level=100, policy_pretrain_steps=0,
                 policy_sft_steps=12, question_levels=[1], eval_level=2, eval_problems=8, rounds=1,
                 steps_per_round=2, warmup_steps=1, batch_size=4, questions_per_round=4,
                 group_size=3, max_new_tokens=32)
    return dataclasses.replace(cfg, **{k: v for k, v in small.items() if k not in given})


def learn_config(cfg: O1LearnConfig, method: str) -> LearnConfig:
    """One learner's settings: the shared ones, its own learning rate and (GRPO, DPO) reference."""
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(LearnConfig)
              if hasattr(cfg, f.name)}
    own = {"lr": getattr(cfg, f"{method}_lr")}
    if method in ("grpo", "dpo"):
        own["reference"] = getattr(cfg, f"{method}_reference")
    return LearnConfig(method=method, **shared, **own)


def experiment(cfg: O1LearnConfig):
    """The trained policy (cached in OUT_DIR/policy), the learners' questions (train split,
    `question_pool` per question level), the held-out eval sets (test split) and the policy's
    own worked solutions (the control's data)."""
    policy_cfg = PolicyConfig(levels=cfg.policy_levels, problems_per_level=cfg.policy_problems_per_level,
                              pretrain_steps=cfg.policy_pretrain_steps, sft_steps=cfg.policy_sft_steps,
                              seed=cfg.seed)
    policy = train_policy(policy_cfg, Path(cfg.out_dir) / "policy")
    task = Arithmetic(ops=policy_cfg.ops)
    questions = [p for level in cfg.question_levels
                 for p in task_problems(task, level, cfg.question_pool, "train", cfg.seed + 7)]
    eval_sets = {}
    for level in [cfg.eval_level] + [q for q in cfg.question_levels if q != cfg.eval_level]:
        eval_sets[f"level{level}"] = task_problems(task, level, cfg.eval_problems, "test", cfg.seed)
    return policy, questions, eval_sets, policy_problems(policy_cfg)


def reward_model(kind: str, cfg: O1LearnConfig, policy, questions, out: Path):
    """o1's ORM (outcome labels from the checker) or PRM (Monte-Carlo step values) on the policy's
    own chains on training questions, trained once and kept in OUT_DIR/<kind>.pt (its settings
    beside it, in <kind>.json)."""
    settings = {k: getattr(cfg, k) for k in ("rm_questions", "rm_chains", "rm_steps",
                                             "max_new_tokens", "seed")}
    if kind == "prm":
        settings["prm_rollouts"] = cfg.prm_rollouts
    cls = ProcessRewardModel if kind == "prm" else OutcomeRewardModel
    path, stamp = out / f"{kind}.pt", out / f"{kind}.json"
    if path.is_file() and stamp.is_file():
        if json.loads(stamp.read_text()) != settings:
            raise UserError(f"{path} was trained with other settings ({stamp}): use another out dir")
        return cls.load(path)
    problems = questions[-cfg.rm_questions:]  # the learners draw from all of them, by seed
    groups = sample_rollouts(policy.model, policy.tokenizer, problems, cfg.rm_chains, 1.0,
                             cfg.max_new_tokens, seed=cfg.seed + 11)
    texts = [[r.text for r in g] for g in groups]
    if kind == "prm":
        examples, _ = process_examples(policy.lm(), problems, texts, cfg.prm_rollouts,
                                       cfg.max_new_tokens, seed=cfg.seed + 12)
        rm = train_prm(policy.model, policy.tokenizer, examples, cfg.rm_steps, seed=cfg.seed)
    else:
        rm = train_orm(policy.model, policy.tokenizer, problems, texts, cfg.rm_steps, seed=cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    rm.save(path)
    write_json(stamp, settings, indent=1)
    return rm


def table(results: dict[str, list[dict]], key: str) -> list[str]:
    """One row per round, one column per learner that records `key` ("-" where it has none)."""
    methods = [m for m, h in results.items() if any(key in r for r in h)]
    rounds = max(len(h) for h in results.values())
    lines = ["round  " + "  ".join(f"{m:>7}" for m in methods)]
    for r in range(rounds):
        cells = [f"{results[m][r][key]:7.3f}" if r < len(results[m]) and key in results[m][r]
                 else "      -" for m in methods]
        lines.append(f"{r:>5}  " + "  ".join(cells))
    return lines


def main(cfg: O1LearnConfig, given: set[str] = frozenset()) -> dict:
    """Run the comparison; `given` names the flags the user set (--tiny keeps them)."""
    if cfg.tiny:
        cfg = tiny(cfg, given)
    for name in ("threads", "eval_problems", "question_pool", "rm_questions", "rm_chains",
                 "rm_steps", "prm_rollouts"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: expected at least 1")
    torch.set_num_threads(cfg.threads)
    bad = [m for m in cfg.methods if m not in METHODS or m == "sft"]
    if bad or not cfg.methods:
        raise UserError(f"--methods {' '.join(cfg.methods)}: choose among expert, grpo, dpo "
                        "(the SFT control always runs)")
    for level in cfg.question_levels + [cfg.eval_level]:
        if not 1 <= level <= 9:
            raise UserError(f"level {level}: expected 1-9 digits per operand")
    for name in ("sft_lr", "expert_lr", "grpo_lr", "dpo_lr"):
        if not getattr(cfg, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: expected > 0")
    for name in ("grpo_reference", "dpo_reference"):
        if getattr(cfg, name) not in ("initial", "round"):
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: expected initial or round")
    for method in ["sft"] + list(cfg.methods):  # every flag checked before anything is trained
        learn_config(cfg, method).validate()
    out = Path(cfg.out_dir)
    t0 = time.perf_counter()
    policy, questions, eval_sets, sft_examples = experiment(cfg)
    print(f"policy ready ({time.perf_counter() - t0:.0f} s): levels {cfg.policy_levels}, "
          f"{policy.model.num_params():,} parameters", flush=True)
    initial = {k: v.clone() for k, v in policy.model.state_dict().items()}
    scorer = step_scorer = None
    if cfg.keep == "scores" and "expert" in cfg.methods:
        t1 = time.perf_counter()
        orm = reward_model("orm", cfg, policy, questions, out)

        def scorer(problems, texts):  # o1's reward models read chains in canonical form
            return orm.score(problems, [canonical(t) for t in texts])
        print(f"outcome reward model ready ({time.perf_counter() - t1:.0f} s)", flush=True)
    if cfg.grpo_rewards == "process" and "grpo" in cfg.methods:
        t1 = time.perf_counter()
        step_scorer = reward_model("prm", cfg, policy, questions, out).score_steps
        print(f"process reward model ready ({time.perf_counter() - t1:.0f} s)", flush=True)
    results = {}
    for method in ["sft"] + list(cfg.methods):
        policy.model.load_state_dict(initial)
        results[method] = run_rounds(learn_config(cfg, method), policy.model, policy.tokenizer, questions, sft_examples,
                                     eval_sets, out / f"{method}.pt", scorer=scorer,
                                     step_scorer=step_scorer,
                                     log=lambda s: print(s, flush=True))
    seconds = time.perf_counter() - t0
    summary = {"config": dataclasses.asdict(cfg), "results": results, "seconds": round(seconds, 1)}
    write_json(out / "results.json", summary, indent=1)
    for name in eval_sets:
        print(f"\ngreedy accuracy on held-out {name} problems ({len(eval_sets[name])}), per round:")
        print("\n".join(table(results, f"acc/{name}")))
    print("\nreward of the round's samples (temperature "
          f"{cfg.temperature}, {cfg.questions_per_round} x {cfg.group_size}), per round:")
    print("\n".join(table(results, "sample_reward")))
    print(f"\n{seconds:.0f} s; results in {out / 'results.json'}")
    return summary


if __name__ == "__main__":
    run_main(main, parse_config(O1LearnConfig, description=__doc__), given_fields(O1LearnConfig))
