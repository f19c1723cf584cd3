"""CraFT (= CARROT): collaborative fine-tuning of black-box VLMs (Wang et al., ICML 2024; papers 000 / 001).

Prompt generation module: p = p0 + A z, z searched by CMA-ES in a d0-dimensional random subspace (Eq. 1-2).
Prediction refinement module: Y_O = Y_I + R(Y_I) (Eq. 3). Collaborative training (Algorithm 1): per generation,
CMA-ES scores lambda candidates with L_I = CE(Y_I, Y) + lambda_I KL(Y_I || Y_O) (Eq. 5), then R is trained for one
epoch with L_O = CE(Y_O, Y) + lambda_O KL(Y_O || Y_I) (Eq. 6) on the outputs of the mean prompt E_z[p0 + A z].
Defaults are the paper's; reference-code variants are options (see docs/fidelity.md).

BBT (Sun et al., 2022) is the prompt-generation module alone with the cross-entropy fitness (``bbt.py``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlmtune.blackbox.api import BlackBoxVLM, BudgetExceeded, ImageRefs
from vlmtune.capabilities import Capability
from vlmtune.errors import VlmtuneError
from vlmtune.methods.api import Method, Task, TrainingHooks
from vlmtune.methods.blackbox.base import (
    BlackBoxClassifier,
    PromptSpace,
    SubspacePrompt,
    image_parts,
    make_cma,
    query_scores,
    score_parts,
)
from vlmtune.methods.blackbox.refine import RefinementHead
from vlmtune.methods.options import method_config, option
from vlmtune.methods.registry import register_method

log = logging.getLogger(__name__)
Training = Literal["collaborative", "iterative", "sequential"]


@dataclass(frozen=True)
class GenerationRecord:
    """What one step consumed from the black box: enough to replay it exactly without querying again.

    Attributes:
        fitness: (lambda,) L_I of the candidates (prompt steps), or None.
        head_scores: (N, K) black-box scores the head trained on (head steps), or None.
        queries: queries the step spent.
    """

    fitness: np.ndarray | None
    head_scores: np.ndarray | None
    queries: int


# Budget by shots (reference code): 8000 evaluations for 8/16 shots, 4000 for 2/4, 2000 for 1.
BUDGET_BY_SHOTS = ((8, 8000), (2, 4000), (1, 2000))


def budget_for_shots(shots: int) -> int:
    return next((b for s, b in BUDGET_BY_SHOTS if shots >= s), 2000)


REFERENCE_TEMPLATE = "a photo of a {}."  # the reference prompts every dataset this way (context on "a photo of a")


@method_config
class BBTConfig:
    n_ctx: int = option(4, "prompt length: the tokens of 'a photo of a' that the context is added to", ge=1)
    subspace: int = option(512, "d0, the dimension CMA-ES searches (Eq. 1)", ge=1)
    popsize: int = option(40, "lambda, candidates per CMA-ES generation", ge=2)
    a_std: float = option(0.02, "A ~ N(0, a_std) (paper); the reference code uses 0.2 (1.0 on ImageNet)", gt=0)
    sigma0: float = option(0.02, "CMA-ES initial step size (reference code; ImageNet: 1.0)", gt=0)
    bounds: float | None = option(5.0, "box bounds on z (reference code); none = unbounded (ImageNet)", gt=0)
    budget: int | None = option(None, "total queries; none = by shots (8000 / 4000 / 2000)", ge=1)
    template: str = option(REFERENCE_TEMPLATE, "prompt template; 'dataset' = the dataset's own first template")
    visual_prompt: bool = option(False, "also search visual prompt tokens (CraFT App. B, ViT services)")
    vp_tokens: int = option(5, "visual prompt tokens (n_prompt_tokens_V of Yu et al. 2023)", ge=1)
    vp_subspace: int = option(100, "dimension of the visual subspace (intrinsic_dim_V of Yu et al. 2023)", ge=1)
    vp_a_std: float | None = option(None, "std of A_v; none = a_std", gt=0)


@method_config
class CraftConfig(BBTConfig):
    head_layers: int = option(3, "refinement MLP layers (paper 3; reference code 2)", ge=1)
    head_hidden: int = option(512, "refinement MLP width (paper 512; reference code 256, 512 on ImageNet)", ge=1)
    optimizer: Literal["adamw", "adam"] = option("adamw", "head optimiser (paper AdamW; reference code Adam)")
    lr: float = option(1e-3, "head learning rate", gt=0)
    batch_size: int = option(256, "head batch size", ge=1)
    lambda_i: float | None = option(None, "weight of KL in L_I (Eq. 5); none = 0.1 / K (CraFT); CARROT: 1", ge=0)
    lambda_o: float | None = option(None, "weight of KL in L_O (Eq. 6); none = 0.1 / K", ge=0)
    kl_direction: Literal["paper", "reversed"] = option("paper", "reversed swaps the KL arguments (reference code)")
    use_prompt: bool = option(True, "ablation: false = PR only")
    use_head: bool = option(True, "ablation: false = PG only")
    training: Training = option(
        "collaborative",
        "collaborative (Algorithm 1); iterative: alternate PG and PR without the KL terms (paper 001 sec. 4.5); "
        "sequential: PG for the whole budget, then PR",
    )
    residual: bool = option(True, "ablation: false = Y_O = R(Y_I)")
    head: Literal["mlp", "linear"] = option("mlp", "refinement head: mlp, or one K x K layer")


# The papers' and the reference code's variants by name (``--set preset=NAME``); a preset sets these options, any
# option given beside it wins. BBT takes the options it has (no head).
_REFERENCE = {
    "a_std": 0.2,
    "sigma0": 0.02,
    "bounds": 5.0,
    "head_layers": 2,
    "head_hidden": 256,
    "optimizer": "adam",
    "kl_direction": "reversed",
}
CRAFT_PRESETS: dict[str, dict[str, Any]] = {
    "craft": {},  # paper 001 (the defaults)
    "carrot": {"lambda_i": 1.0},  # paper 000's training details: lambda_I = 1, lambda_O = 0.1 / K
    "reference": _REFERENCE,  # the public code's settings for most datasets
    "reference-dtd": {**_REFERENCE, "lambda_i": 0.001, "lambda_o": 0.001, "a_std": 1.0},
    "reference-food101": {**_REFERENCE, "lambda_i": 1.0, "lambda_o": 1.0, "sigma0": 1.0, "bounds": None},
    "reference-imagenet": {
        **_REFERENCE,
        "lambda_i": 0.0,
        "lambda_o": 0.0,
        "a_std": 1.0,
        "sigma0": 1.0,
        "bounds": None,
        "head_hidden": 512,
    },
}


def kl_rows(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) of the softmax distributions of each row: (B, K), (B, K) -> (B,)."""
    logp, logq = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def _init_(module: nn.Module, generator: torch.Generator) -> None:
    """torch's default Linear init, drawn from ``generator``."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            bound = 1 / math.sqrt(m.in_features)
            with torch.no_grad():
                m.weight.uniform_(-bound, bound, generator=generator)
                m.bias.uniform_(-bound, bound, generator=generator)


class CollaborativeTrainer:
    """Algorithm 1, with the switches that give BBT and the ablation rows."""

    def __init__(
        self,
        cfg: CraftConfig,
        box: BlackBoxVLM,
        task: Task,
        generator: torch.Generator,
        classifier_cls: type[BlackBoxClassifier] = BlackBoxClassifier,
    ) -> None:
        if not isinstance(task.train, ImageRefs):
            raise TypeError("black-box methods train on uploaded image ids (ImageRefs)")
        self.cfg, self.box, self.task, self.gen = cfg, box, task, generator
        self.classifier_cls = classifier_cls
        self.refs: ImageRefs = task.train
        self.labels = torch.as_tensor(self.refs.labels, dtype=torch.long)
        self.k = task.num_classes
        self.template = task.templates[0] if cfg.template == "dataset" else cfg.template
        self.shots = max(1, len(self.refs) // max(1, self.k))
        self.budget = cfg.budget if cfg.budget is not None else budget_for_shots(self.shots)  # the plan; see run()
        self.lambda_i = cfg.lambda_i if cfg.lambda_i is not None else 0.1 / self.k
        self.lambda_o = cfg.lambda_o if cfg.lambda_o is not None else 0.1 / self.k
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        self.prompt = self._prompt_space(np.random.default_rng(seed))
        self.es = make_cma(self.prompt.dim, cfg.sigma0, cfg.popsize, cfg.bounds, seed)
        self.head: RefinementHead | None = None
        self.head_meta: dict[str, Any] | None = None  # RefinementHead's arguments, saved with the adapter
        if cfg.use_head:
            hidden, layers = (self.k, 1) if cfg.head == "linear" else (cfg.head_hidden, cfg.head_layers)
            self.head_meta = {"k": self.k, "hidden": hidden, "layers": layers, "residual": cfg.residual}
            self.head = RefinementHead(**self.head_meta)
            _init_(self.head, generator)
            opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
            self.opt = opt_cls(self.head.parameters(), lr=cfg.lr)
        self.parts = image_parts(box, len(self.refs), self.k, cfg.visual_prompt)  # requests per candidate
        self.used = 0
        self.head_trained = False
        self.hooks = TrainingHooks()
        self._next_report = 0  # the next multiple of ``monitor_every`` to report at (set in ``_report``)
        self._replay: list[GenerationRecord] = []
        self._replayed = 0  # logged steps replayed so far (for messages)

    def _prompt_space(self, rng: np.random.Generator) -> PromptSpace:
        cfg, info = self.cfg, self.box.info()
        text = SubspacePrompt.sample(cfg.n_ctx, info.token_width, cfg.subspace, cfg.a_std, rng)  # A of Eq. (1)
        if not cfg.visual_prompt:
            return PromptSpace(text)
        if info.visual_width is None:
            raise ValueError(f"visual_prompt=True, but the black box {info.name!r} takes no visual prompt tokens")
        std = cfg.vp_a_std if cfg.vp_a_std is not None else cfg.a_std
        return PromptSpace(text, SubspacePrompt.sample(cfg.vp_tokens, info.visual_width, cfg.vp_subspace, std, rng))

    # ---- one generation of each module ----------------------------------------------------------------
    def _refine(self, y_i: torch.Tensor) -> torch.Tensor:
        assert self.head is not None
        return self.head(y_i)

    def _consistency_per_sample(self, own: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """The paper's KL(own || other) of each sample, (B,); ``kl_direction="reversed"`` swaps the arguments."""
        return kl_rows(own, other) if self.cfg.kl_direction == "paper" else kl_rows(other, own)

    def _consistency(self, own: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return self._consistency_per_sample(own, other).mean()

    def sample_losses(self, scores: torch.Tensor, labels: torch.Tensor, consistency: bool) -> torch.Tensor:
        """L_I (Eq. 5) of each candidate on each image: scores (c, n, K), labels (n,) -> (c, n)."""
        c, n, k = scores.shape
        with torch.no_grad():
            flat = scores.reshape(c * n, k)  # all candidates through the head in one batch
            loss = F.cross_entropy(flat, labels.repeat(c), reduction="none")  # (c*n,)
            if consistency and self.head is not None:
                loss = loss + self.lambda_i * self._consistency_per_sample(flat, self._refine(flat))  # Eq. (3), (5)
        return loss.view(c, n)

    def fitness(self, contexts: tuple[np.ndarray, np.ndarray | None], consistency: bool) -> tuple[np.ndarray, int]:
        """L_I (Eq. 5) of each candidate, averaged over the training images, and the queries it cost. Scored part
        by part (``score_parts``): at K = 1,000 the (C, N, K) scores are never held at once."""
        total = torch.zeros(len(contexts[0]), dtype=torch.float64)  # (C,)
        queries = 0
        for part in score_parts(self.box, self.refs.ids, self.task.classnames, self.template, *contexts):
            losses = self.sample_losses(part.scores, self.labels[part.images], consistency)  # (c, n)
            total[part.candidates] += losses.double().sum(1)
            queries += len(part.scores)
        return (total / len(self.labels)).numpy(), queries

    def _next_record(self, kind: str, shape: tuple[int, ...], queries: int) -> GenerationRecord | None:
        """The next logged step on resume (None: live), checked against the step about to be taken: a record of
        another kind, shape or query cost, or with values that are not finite, is refused (nothing replays)."""
        if not self._replay:
            return None
        record = self._replay.pop(0)
        values = record.fitness if kind == "fitness" else record.head_scores
        step = self._replayed
        self._replayed += 1
        if values is None or tuple(values.shape) != shape or record.queries != queries:
            got = "another kind" if values is None else f"shape {tuple(values.shape)}, {record.queries} queries"
            raise VlmtuneError(
                f"the resume journal does not match this run at step {step} (a {kind} step of shape {shape} "
                f"costing {queries} queries; the journal holds {got}): run again without --resume"
            )
        if not np.isfinite(values).all():
            raise VlmtuneError(
                f"the resume journal's step {step} holds values that are not finite: run again without --resume"
            )
        return record

    def _log(self, record: GenerationRecord) -> None:
        self.used += record.queries
        if self.hooks.journal is not None:
            self.hooks.journal.record(record)

    def prompt_step(self, consistency: bool) -> np.ndarray:
        """One CMA-ES generation (Algorithm 1, lines 5-7); returns the candidates' fitness."""
        z = np.asarray(self.es.ask())  # (lambda, d0), Eq. (2)
        record = self._next_record("fitness", (len(z),), len(z) * self.parts)
        if record is None:  # live: query the box (replayed steps reuse the logged fitness)
            fitness, queries = self.fitness(self.prompt.split(z), consistency)
            record = GenerationRecord(fitness, None, queries)
            self._log(record)
        else:
            self.used += record.queries
        assert record.fitness is not None
        self.es.tell(list(z), record.fitness.tolist())
        return record.fitness

    def mean_context(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """E_z[A z] (Algorithm 1, line 16): text offsets (1, n_ctx, d_tok) and visual tokens (1, n_v, d_vis)."""
        return self.prompt.split(self.es.mean) if self.cfg.use_prompt else (None, None)

    def head_epoch(self, y_i: torch.Tensor, consistency: bool) -> float:
        """One epoch of R on (Y_I, Y) with L_O (Eq. 6); returns the mean loss."""
        assert self.head is not None
        self.head_trained = True
        total, batches = 0.0, 0
        order = torch.randperm(len(self.labels), generator=self.gen)
        for start in range(0, len(order), self.cfg.batch_size):
            idx = order[start : start + self.cfg.batch_size]
            y_in, y = y_i[idx], self.labels[idx]
            y_o = self._refine(y_in)  # Eq. (3)
            loss = F.cross_entropy(y_o, y)
            if consistency:
                loss = loss + self.lambda_o * self._consistency(y_o, y_in)  # Eq. (6)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total, batches = total + float(loss.detach()), batches + 1
        return total / max(1, batches)

    def mean_scores(self) -> torch.Tensor:
        """Black-box scores (N, K) of the mean prompt E_z[p0 + A z]: the head's inputs (one query)."""
        record = self._next_record("head", (len(self.refs), self.k), self.parts)
        if record is None:
            scores = query_scores(self.box, self.refs, self.task.classnames, self.template, *self.mean_context())[0]
            record = GenerationRecord(None, scores.numpy(), self.parts)
            self._log(record)
        else:
            self.used += record.queries
        assert record.head_scores is not None
        return torch.as_tensor(record.head_scores)  # (N, K)

    # ---- Algorithm 1 and its ablations -----------------------------------------------------------------
    def _plan(self, replayed: int) -> int:
        """Queries this run may spend: the method's budget, cut to what the box's hard limit still allows."""
        remaining = self.box.usage().remaining
        if remaining is None or replayed + remaining >= self.budget:
            return self.budget
        available = replayed + remaining
        self.hooks.note(
            f"the black box allows {available} queries but the method's budget is {self.budget}: "
            f"training is planned for {available}"
        )
        return available

    def run(self) -> BlackBoxClassifier:
        if self.hooks.journal is not None:
            self._replay = list(self.hooks.journal.replay())  # resume: replay logged steps, then go on live
            if self._replay:
                log.info("resuming: replaying %d logged steps", len(self._replay))
        budget = self._plan(sum(r.queries for r in self._replay))
        try:
            self._train(budget)
        except BudgetExceeded as exc:  # a hard limit met mid-run (e.g. a key shared with other clients)
            self.hooks.note(
                f"stopped early by the black box's hard limit ({exc.used} of {exc.limit} used): "
                f"the adapter is the one after {self.used} queries"
            )
        if self.head is not None and not self.head_trained:
            self.head, self.head_meta = None, None  # never trained: an untrained head would only add noise
        self._report(final=True)
        return self.snapshot()

    def _train(self, budget: int) -> None:
        cfg = self.cfg
        both = cfg.use_prompt and cfg.use_head
        alternate = both and cfg.training != "sequential"  # one head epoch after each CMA-ES generation
        consistency = both and cfg.training == "collaborative"  # the KL terms of Eq. (5) and (6)
        head_epochs = budget // (cfg.popsize + 1)  # as many head epochs as the full method has generations
        if cfg.use_prompt:
            # lambda candidates (+ the mean prompt for the head), each charged once per image part
            cost = (cfg.popsize + (1 if alternate else 0)) * self.parts
            reserve = self.parts if cfg.use_head and not alternate else 0  # left for the head's inputs
            generations = (budget - reserve) // cost
            self._say_what_the_budget_buys(budget, cost, generations)
            for g in range(generations):
                fitness = self.prompt_step(consistency=consistency)  # Algorithm 1, lines 5-7
                metrics = {"fitness": float(fitness.min()), "mean_fitness": float(fitness.mean())}
                if alternate:
                    metrics["head_loss"] = self.head_epoch(self.mean_scores(), consistency=consistency)  # 9-14
                self.hooks.step(g + 1, generations, "generation", queries=self.used, **metrics)
                self._report(final=False)
        if self.head is not None and not alternate:  # PR only, or PG then PR (sequential)
            y_i = self.mean_scores()
            for e in range(head_epochs):
                self.hooks.step(e + 1, head_epochs, "head epoch", loss=self.head_epoch(y_i, consistency=False))

    def _say_what_the_budget_buys(self, budget: int, cost: int, generations: int) -> None:
        """Notes for a budget far below the paper's rule for the shots, and for curve points that cannot fall on
        the asked multiples (a generation is charged whole)."""
        rule = budget_for_shots(self.shots)
        if budget < rule // 2:
            self.hooks.note(
                f"a budget of {budget} queries is far below the paper's {rule} for {self.shots} shots: CMA-ES gets "
                f"{generations} generation(s) of {cost} queries; expect accuracy near zero-shot or below "
                f"(--set budget={rule} follows the paper)"
            )
        every = self.hooks.monitor_every
        if self.hooks.monitor is not None and every and every % cost:
            self.hooks.note(
                f"curve points fall at the first generation past each multiple of {every} queries "
                f"(a generation costs {cost}: --curve-every {cost * max(1, round(every / cost))} lands on them)"
            )

    def snapshot(self) -> BlackBoxClassifier:
        """The current adapter: prompt E_z[p0 + A z] (Algorithm 1, line 16) and a copy of the head."""
        context, visual = (torch.as_tensor(c[0]).clone() if c is not None else None for c in self.mean_context())
        head = None
        if self.head is not None and self.head_meta is not None:
            head = RefinementHead(**self.head_meta)
            head.load_state_dict(self.head.state_dict())
            head.eval()
        return self.classifier_cls(self.task.classnames, self.template, context, head, self.head_meta, visual)

    def _report(self, final: bool) -> None:
        """Hand snapshots to the caller's monitor every ``monitor_every`` queries (accuracy-vs-queries curves)."""
        every = self.hooks.monitor_every
        if self.hooks.monitor is None or not every:
            return
        if not self._next_report:
            self._next_report = every  # the first point after `every` queries, not after the first generation
        if final or self.used >= self._next_report:
            self.hooks.monitor(self.used, self.snapshot())
            while self._next_report <= self.used:
                self._next_report += every


class BlackBoxMethod(Method):
    """What BBT and CraFT share as plugins: the black-box capability and the box they need (visual prompts)."""

    capability = Capability.BLACK_BOX

    def box_options(self) -> dict[str, Any]:
        return {"visual_prompts": self.config.visual_prompt}


def trainer_run(trainer: CollaborativeTrainer, method: Method) -> BlackBoxClassifier:
    """Run ``trainer`` with the hooks the runner gave the method (curve monitor, resume journal)."""
    trainer.hooks = method.hooks
    return trainer.run()


@register_method("craft")
class Craft(BlackBoxMethod):
    """CraFT / CARROT: CMA-ES prompt search + residual refinement head, trained collaboratively."""

    config_cls = CraftConfig
    classifier = BlackBoxClassifier
    presets = CRAFT_PRESETS
    summary = "CraFT (= CARROT): CMA-ES subspace prompts + residual refinement head, collaborative training"

    def fit(self, handle: BlackBoxVLM, task: Task, *, generator: torch.Generator) -> BlackBoxClassifier:
        return trainer_run(CollaborativeTrainer(self.config, handle, task, generator, BlackBoxClassifier), self)
