"""`distill`: distil an unlearned model into a shrunk and perturbed copy of itself (UNDO).

Unlearning by fine-tuning suppresses knowledge that a few steps of fine-tuning bring back: the
weights still hold it. Lee et al. ("Distillation Robustifies Unlearning", 2025) found that a
student trained only to imitate the unlearned model's outputs does not inherit what the teacher
merely hides, and made that affordable with UNDO (Unlearn, Noise, Distill on Outputs): start the
student from the unlearned weights, damaged by shrink-and-perturb, and distil until it is back
to the teacher's general performance. The more damage (alpha), the more robust the result and
the more compute the recovery takes.

* **Which weights are perturbed.** The unlearned (teacher) weights, as in the paper ("distills an
  unlearned model into a partially noised copy of itself") and its code (teacher and student are
  loaded from the same unlearned checkpoint). Perturbing the original model's weights instead
  would start the student with the forgotten knowledge intact and unsuppressed, and distillation
  on general text gives it no reason to lose it.
* **Shrink and perturb.** theta <- (1 - alpha) theta + alpha beta noise, once, before training
  (by default beta 0, a pure shrink, as the paper's WMDP runs).
  The noise is a fresh initialisation as the paper's code draws it: Xavier-uniform (gain 1) for
  every parameter of two or more dimensions (embeddings, attention and MLP matrices, the
  unembedding), zero for vectors (norm gains and biases are only shrunk). It is drawn on the CPU
  from its own generator seeded with `--seed`, parameter by parameter in the model's order, so
  the same seed gives the same student on any device. Tied weights are one parameter and are
  perturbed once.
* **Inside a band (`--blocks`).** With `--blocks a-b` (or `auto`, the band `lensunlearn locate`
  found; or `run`, the band the source run trained) only those blocks' MLP weights (all their
  weights with `--block_weights all`) are shrunk, perturbed and trained; the noise is drawn for
  them alone, and every other weight stays the teacher's, bitwise.
* **Distillation loss.** Forward KL(teacher || student) of the next-token distributions at every
  position of the corpus documents that has a next token, averaged over those positions. The
  unembedding runs over slices of at most `--chunk` tokens (recomputed in backward), so
  [batch, length, vocabulary] logits never exist whole. All student parameters train; the
  teacher stays frozen in eval mode.
* **What text.** `--corpus`, and with `--generate N` also N documents the teacher writes itself:
  each continues the first `--generate_prompt` tokens of a corpus document (or a prompt of
  `--generate_prompts`, e.g. every fact's cloze prompt), sampled from the teacher's full next-token
  distribution up to `--max_length` tokens. A small corpus is learnt by heart within a few passes,
  and the student then matches the teacher on it and nowhere else; the teacher's own text is as
  plentiful as the budget allows and is the distribution to be matched. The paper distils on broad
  text that includes the forget domain (its WMDP run: 1 % forget-domain questions and answers; its
  language runs: half forget-domain text), so that the student copies the teacher's suppressed
  answers there and its kept abilities everywhere else: `--corpus generic:retain+facts:all
  --generate N --generate_prompts facts:all` is the like of that here.
* **When to stop.** `--steps` is the budget. Every `--eval_every` steps the held-out generic text
  (`--generic`, in no training corpus) is scored: the student's and the teacher's next-token
  cross-entropy (CE) and KL(teacher || student). recovered = (CE_init - CE_student) / (CE_init -
  CE_teacher), the share of the gap opened by the perturbation that distillation has closed (1
  when the perturbation opened none); `--target_share` stops once it is reached, and
  `--stop_within S` once CE_student is within the share S of CE_teacher (the paper's rule, S =
  0.05); `--max_tokens N` stops after the first step that brings the tokens distilled on to N, the
  budget in the unit papers report. The metrics log holds these numbers and the evaluation tasks'
  accuracies at every such step, a budget curve: what each further step buys, and the summary the
  tokens distilled on.

The output folder is laid out as an unlearning run (`merged/`, `run_config.json` naming the base
model and forget corpus of the source run, `metrics.jsonl`, `summary.json`, `eval.json`, the
source's `base_eval.json`), so `eval`, `tamper`, `robustness` and `report` take it as they take
the run it came from. One process; a killed run continues exactly with `--resume`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..core.atomic import write_json_atomic, write_jsonl_atomic, write_text_atomic
from ..core.checks import check_resumed_config
from ..core.config import ConfigError, to_jsonable
from ..core.errors import InputError, UserError, read_json
from ..core.outputs import Output, check_not_input, output_kind, prepare_output
from ..core.paths import (
    BASE_EVAL_FILE,
    DISTILL_GENERATED_FILE,
    EVAL_FILE,
    EVAL_KEY_PREFIX,
    MERGED_DIR,
    METRICS_FILE,
    MODEL_CONFIG_FILE,
    RUN_CONFIG_FILE,
    SUMMARY_FILE,
)
from ..core.run_config import fill, read_run_config, run_tasks
from ..data.corpora import batch_indices, collate, length_groups, load_texts, tokenize
from ..data.tasks import check_tasks
from ..eval.fluency import decode_batch, pad_id_of, stop_ids
from ..modeling.layers import forward_streams, model_parts
from ..modeling.loading import check_device, load_model, load_tokenizer, model_depth, set_checkpointing
from ..modeling.losses import DEFAULT_CHUNK, chunked_token_sum, kl_from_logits, select_tokens
from ..train.checkpoint import load_checkpoint, remove_checkpoint, restore_checkpoint, save_checkpoint
from ..train.loop import LoopSpec, MetricsLog, run_loop
from ..train.optim import build_optimizer, embedding_parameters, lr_factor
from ..train.tracking import TRACKING_FIELDS, check_tracker, flatten, open_tracker
from .blocks import TRAINED_BLOCKS_KEY, resolve_blocks
from .options import SAVED_KEYS, SOURCE_TASKS, DistillConfig  # noqa: F401 (re-exported)
from .run import band_parameters, freeze_all_but_band

log = logging.getLogger(__name__)

SOURCE_KINDS = ("unlearn", "distill")  # a distilled run is an unlearned model too, and can be distilled again
LOGGED = ("step", "kl", "lr", "grad_norm", "tokens", "tokens_per_s", "seconds")
HELDOUT_KEYS = ("heldout_ce", "teacher_heldout_ce", "heldout_kl", "recovered")


# --- shrink and perturb -------------------------------------------------------------------------


def _noise(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """A fresh initialisation of one parameter, as the paper's code draws it: Xavier-uniform for
    matrices (and higher-dimensional weights), zero for vectors."""
    if len(shape) < 2:
        return torch.zeros(shape)
    return nn.init.xavier_uniform_(torch.empty(shape), generator=generator)


def perturbation_noise(model: nn.Module, seed: int, names: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """The noise `shrink_perturb(model, ..., seed, names)` adds, per parameter name (float32, on the CPU)."""
    generator = torch.Generator().manual_seed(seed)
    return {name: _noise(param.shape, generator) for name, param in model.named_parameters()
            if names is None or name in names}


@torch.no_grad()
def shrink_perturb(model: nn.Module, alpha: float, beta: float, seed: int,
                   names: Collection[str] | None = None) -> nn.Module:
    """In place: every parameter p <- (1 - alpha) p + alpha beta noise (see `perturbation_noise`); with `names`
    (`--blocks`), those parameters only, every other one left exactly as it is."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():  # one generator, in parameter order: `perturbation_noise` agrees
        if names is not None and name not in names:
            continue
        noise = _noise(param.shape, generator)
        param.mul_(1.0 - alpha).add_(noise.to(param.device, param.dtype), alpha=alpha * beta)
    return model


# --- the loss -----------------------------------------------------------------------------------


def output_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's next-token logits (float32) from its final pre-norm stream (`forward_streams(final=True)`),
    with the final soft-capping of the models that have one."""
    parts = model_parts(model)
    logits = parts.unembed(parts.final_norm(hidden)).float()
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(text, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def final_stream(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The final norm's input [batch, length, d]; the unembedding is not run."""
    return forward_streams(model, (), input_ids, attention_mask, stop=True, final=True)[model_parts(model).num_layers]


def padded_groups(docs: Sequence[Sequence[int]], pad_id: int) -> list[dict[str, torch.Tensor]]:
    """The documents of one micro-batch as padded batches of similar lengths (`length_groups`): a corpus
    that mixes 15-token fact sentences with 128-token prose padded 4x as many positions as it holds in one
    batch. The loss sums over all groups' positions, so it is the one batch's loss."""
    return [collate([docs[k] for k in group], pad_id) for group in length_groups([len(d) for d in docs])]


def predicting_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions whose next token is a real one (right padding): where a next-token distribution is scored."""
    predicts = torch.zeros_like(attention_mask)
    predicts[:, :-1] = attention_mask[:, 1:]
    return predicts


def distill_kl(student: nn.Module, teacher: nn.Module,
               batch: dict[str, torch.Tensor] | Sequence[dict[str, torch.Tensor]],
               chunk: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over predicting positions of KL(teacher || student) in nats, number of positions).

    `batch` is one padded batch or several (the groups of `length_groups`), whose positions are summed
    together. Differentiable in the student. Logits exist for `chunk` positions at a time, recomputed in
    backward; the teacher runs without gradients.
    """
    groups = [batch] if isinstance(batch, dict) else list(batch)
    streams, targets, count = [], [], 0
    for group in groups:
        ids, mask = group["input_ids"], group["attention_mask"]
        predicts = predicting_positions(mask)
        with torch.no_grad():
            targets.append(select_tokens(final_stream(teacher, ids, mask), predicts))
        streams.append(select_tokens(final_stream(student, ids, mask), predicts))
        count += int(predicts.sum())
    stream, target_stream = torch.cat(streams), torch.cat(targets)

    def per_token(h: torch.Tensor, h_teacher: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = output_logits(teacher, h_teacher)
        return kl_from_logits(target, output_logits(student, h))

    with torch.autocast(stream.device.type, enabled=False):
        total = chunked_token_sum(per_token, stream, target_stream, chunk=chunk)
    return total, torch.tensor(count)


class HeldoutScorer:
    """Scores students against a frozen teacher on held-out documents: token-weighted mean next-token
    cross-entropy of the student and the teacher and mean KL(teacher || student), in nats (exp of a CE is
    the perplexity).

    The teacher never changes during a distillation, so its final streams on these documents are computed
    once, here, and every later score runs only the student's forward (and both unembeddings: the
    teacher's log-probabilities over the vocabulary would take vocabulary-size memory per token). The
    cache holds one hidden vector per scored position, in the model's dtype.
    """

    @torch.no_grad()
    def __init__(self, teacher: nn.Module, docs: list[list[int]], pad_id: int, batch_size: int,
                 chunk: int = DEFAULT_CHUNK) -> None:
        self.teacher, self.chunk = teacher, chunk
        device = next(teacher.parameters()).device
        # by length, so that a batch pads little; the sums do not depend on the order
        ordered = sorted(docs, key=len)
        self.batches: list[tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for start in range(0, len(ordered), batch_size):
            batch = {k: v.to(device) for k, v in collate(ordered[start:start + batch_size], pad_id).items()}
            ids, predicts = batch["input_ids"], predicting_positions(batch["attention_mask"])
            following = torch.zeros_like(ids)
            following[:, :-1] = ids[:, 1:]
            teacher_streams = select_tokens(final_stream(teacher, ids, batch["attention_mask"]), predicts)
            self.batches.append((batch, predicts, select_tokens(following, predicts), teacher_streams))

    @torch.no_grad()
    def __call__(self, student: nn.Module) -> dict[str, float]:
        """The scores of `student`, in eval mode inside; its mode is restored."""
        was_training = student.training
        sums = {"heldout_ce": 0.0, "teacher_heldout_ce": 0.0, "heldout_kl": 0.0}
        count, chunk = 0, self.chunk
        student.eval()
        try:
            for batch, predicts, targets, ht in self.batches:
                hs = select_tokens(final_stream(student, batch["input_ids"], batch["attention_mask"]), predicts)
                for s in range(0, targets.shape[0], chunk):
                    logp = F.log_softmax(output_logits(student, hs[s:s + chunk]), dim=-1)
                    teacher_logp = F.log_softmax(output_logits(self.teacher, ht[s:s + chunk]), dim=-1)
                    picked = targets[s:s + chunk].unsqueeze(-1)
                    sums["heldout_ce"] -= logp.gather(-1, picked).sum().item()
                    sums["teacher_heldout_ce"] -= teacher_logp.gather(-1, picked).sum().item()
                    sums["heldout_kl"] += (teacher_logp.exp() * (teacher_logp - logp)).sum().item()
                count += targets.shape[0]
        finally:
            student.train(was_training)
        return {k: v / max(count, 1) for k, v in sums.items()}


def heldout_scores(student: nn.Module, teacher: nn.Module, docs: list[list[int]], pad_id: int, batch_size: int,
                   chunk: int = DEFAULT_CHUNK) -> dict[str, float]:
    """`HeldoutScorer`'s scores of one student, for a single use."""
    return HeldoutScorer(teacher, docs, pad_id, batch_size, chunk)(student)


def within_teacher(point: dict[str, float], share: float) -> bool:
    """The paper's stopping rule: the student's held-out cross-entropy above the teacher's by less than `share`
    of the teacher's."""
    teacher = max(point["teacher_heldout_ce"], 1e-6)
    return (point["heldout_ce"] - teacher) / teacher < share


def recovered_share(ce_init: float, ce_teacher: float, ce: float) -> float:
    """The share of the held-out cross-entropy gap opened by the perturbation that is closed again;
    1 when the perturbation opened none."""
    gap = ce_init - ce_teacher
    return 1.0 if gap <= 0 else (ce_init - ce) / gap


# --- inputs, checked before any model is loaded -------------------------------------------------


def check_source(run: Path) -> dict:
    """The source run's saved config, after refusing a folder that is not a finished unlearning run."""
    if not run.is_dir():
        raise InputError(f"--run {run} does not exist: pass a run directory written by `lensunlearn unlearn`")
    kind = output_kind(run)
    if kind not in SOURCE_KINDS:
        what = f"a {kind} output" if kind else "not an output of lensunlearn"
        raise InputError(f"--run {run} is not an unlearning run ({what}): pass a run directory written by "
                         f"`lensunlearn unlearn`")
    if not (run / SUMMARY_FILE).is_file():
        raise InputError(f"--run {run} is an unfinished run (no {SUMMARY_FILE}): finish it first (rerun its "
                         f"command with --resume)")
    if not (run / MERGED_DIR / MODEL_CONFIG_FILE).is_file():
        raise InputError(f"--run {run} holds no {MERGED_DIR}/{MODEL_CONFIG_FILE}, so there is no unlearned model to "
                         f"distil: pass a finished run directory")
    return read_run_config(run)


def resolve(cfg: DistillConfig) -> tuple[DistillConfig, dict]:
    """(`cfg` with what was not given taken from the source run, the source's saved config). The run
    becomes an absolute path, so that a resumed run compares the same folder however it is spelled."""
    run = Path(cfg.run).expanduser().resolve()
    source = check_source(run)
    tasks = ",".join(run_tasks(source)) if cfg.eval_tasks == SOURCE_TASKS else cfg.eval_tasks
    fmt = fill(cfg.eval_format, source, "eval_format", "letter")
    limit = fill(cfg.eval_limit, source, "eval_limit")
    include = fill(cfg.lm_eval_include, source, "lm_eval_include") or None  # '' on the line: no folder
    return replace(cfg, run=str(run), eval_tasks=tasks, eval_format=fmt, eval_limit=limit, lm_eval_include=include,
                   out=cfg.out or str(run.parent)), source


def prompt_texts(spec: str) -> list[str]:
    """--generate_prompts as texts: the cloze prompts of a fact domain (facts:<domain>, facts:all), else the
    documents of a corpus."""
    from ..data.corpora import FACTS_PREFIX
    from ..data.facts import DOMAINS, questions

    if spec.startswith(FACTS_PREFIX):
        domain = spec[len(FACTS_PREFIX):]
        return [q["prompt"] for d in (DOMAINS if domain == "all" else (domain,)) for q in questions(d)]
    return load_texts(spec, what="--generate_prompts", column_flag="a corpus with a 'text' column")


def generation_prompts(cfg: DistillConfig, docs: list[list[int]], tokenizer=None) -> list[list[int]]:
    """The prompts of the --generate documents (none without --generate): --generate_prompts, each cut to leave
    room to write, or the first --generate_prompt tokens of every corpus document longer than that."""
    if not cfg.generate:
        return []
    if cfg.generate_prompts is not None:
        prompts = [d[:cfg.max_length - 1] for d in tokenize(prompt_texts(cfg.generate_prompts), tokenizer,
                                                             cfg.max_length)]
        if not prompts:
            raise ValueError(f"--generate_prompts {cfg.generate_prompts} holds no prompt: pass other text")
        return prompts
    prompts = [d[:cfg.generate_prompt] for d in docs if len(d) > cfg.generate_prompt]
    if not prompts:
        raise ValueError(f"--generate continues the first --generate_prompt {cfg.generate_prompt} tokens of corpus "
                         f"documents, and no document of --corpus {cfg.corpus} is longer: pass a smaller "
                         f"--generate_prompt or longer text")
    return prompts


def load_documents(cfg: DistillConfig, tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """(corpus, held-out) token ids, each document cut to --max_length and at least two tokens long. A corpus
    of several sources joined by '+' is interleaved round-robin."""
    parts = [p.strip() for p in cfg.corpus.split("+") if p.strip()]
    single = len(parts) == 1
    corpora = [load_texts(p, config=cfg.corpus_config if single else None, split=cfg.corpus_split,
                          column=cfg.corpus_column if single else None, limit=cfg.corpus_limit, what="--corpus",
                          column_flag="--corpus_column") for p in parts]
    texts = [c[i] for i in range(max(map(len, corpora))) for c in corpora if i < len(c)][:cfg.corpus_limit]
    docs = []
    for flag, spec, source in (("--corpus", cfg.corpus, texts),
                               ("--generic", cfg.generic, load_texts(cfg.generic, what="--generic text"))):
        ids = [d for d in tokenize(source, tokenizer, cfg.max_length) if len(d) >= 2]
        if not ids:
            raise ValueError(f"{flag} {spec} has no document of two or more tokens, so there is nothing to predict: "
                             f"pass longer text")
        docs.append(ids)
    return docs[0], docs[1]


# Settings that may change on --resume: where it runs, how often it checkpoints, how much memory it
# trades for recomputation and how evaluations are batched; none of them changes the weights.
RESUME_MAY_CHANGE = ("resume", "overwrite", "device", "checkpoint_every", "gradient_checkpointing", "eval_batch",
                     "out", "run_name", *TRACKING_FIELDS)


def read_paths(cfg: DistillConfig) -> list[tuple[str, str | None]]:
    """What a distillation reads from disk, by the flag that names it (`cfg` resolved): its output folder may
    never be or hold one of them (distilling runs/D into runs/D would delete the teacher)."""
    return [("--run", cfg.run), ("--generic", cfg.generic), ("--lm_eval_include", cfg.lm_eval_include),
            *(("--corpus", part.strip()) for part in cfg.corpus.split("+")),
            *(("--eval_tasks", task.strip()) for task in cfg.eval_tasks.split(","))]


def check_output(cfg: DistillConfig) -> Output:
    """Where this run writes (`outputs.prepare_output`), refusing to resume with other settings."""
    output = prepare_output(Path(cfg.out) / cfg.name, "distill", overwrite=cfg.overwrite, resume=cfg.resume,
                            finished=lambda p: (p / SUMMARY_FILE).is_file(), flag="--run_name",
                            reads=read_paths(cfg))
    saved = output.work / RUN_CONFIG_FILE
    if cfg.resume and saved.is_file():
        try:
            check_resumed_config(read_json(saved), cfg, RESUME_MAY_CHANGE, str(output.final))
        except ConfigError:
            output.discard_if_empty()
            raise
    return output


# --- the command --------------------------------------------------------------------------------


def distill(cfg: DistillConfig) -> Path:
    """Distil the run's unlearned model into a shrunk and perturbed copy of itself; return the output folder."""
    began = time.perf_counter()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("distill runs in one process: start it without torchrun")
    cfg, source = resolve(cfg)
    check_not_input(Path(cfg.out) / cfg.name, read_paths(cfg), "--run_name")  # before the teacher is read
    check_device(cfg.device)
    check_tracker(cfg)
    blocks = None if cfg.blocks is None else \
        resolve_blocks(cfg, model_depth(str(cfg.teacher), cfg.trust_remote_code), run=cfg.run)
    tokenizer = load_tokenizer(str(cfg.teacher), cfg.trust_remote_code)
    docs, heldout = load_documents(cfg, tokenizer)
    prompts = generation_prompts(cfg, docs, tokenizer)
    if cfg.eval_tasks.strip():
        check_tasks(cfg.eval_tasks, lm_eval_include=cfg.lm_eval_include)
    output = check_output(cfg)
    try:
        return _train(DistillJob(cfg, source, output, tokenizer, docs, heldout, prompts, began, blocks))
    except BaseException:
        output.discard_if_empty()  # a folder this attempt created and never wrote to
        raise


@dataclass
class DistillJob:
    """A checked run: the resolved config, the source's saved config, the output, the tokenizer and the
    tokenised corpus and held-out documents, and the prompts of the documents to generate."""

    cfg: DistillConfig
    source: dict
    output: Output
    tokenizer: object
    docs: list[list[int]]
    heldout: list[list[int]]
    prompts: list[list[int]]
    began: float
    blocks: tuple[int, ...] | None = None  # --blocks: the only blocks perturbed and trained (None: all)


class _TargetReached(Exception):
    """Raised from the step hook once a stopping rule holds, --target_share, --stop_within or --max_tokens (caught
    by `_train`)."""

    def __init__(self, step: int, point: dict[str, float], reason: str) -> None:
        super().__init__(step)
        self.step, self.point, self.reason = step, point, reason


def _load_models(job: DistillJob) -> tuple[nn.Module, nn.Module]:
    """(teacher, student): the run's merged model, frozen, and its shrunk and perturbed copy, trainable."""
    cfg = job.cfg
    teacher, _ = load_model(str(cfg.teacher), cfg.dtype, cfg.device, cfg.trust_remote_code)
    teacher.requires_grad_(False).eval()
    student = copy.deepcopy(teacher)
    band = None if job.blocks is None else set(band_parameters(student, job.blocks, cfg.block_weights))
    shrink_perturb(student, cfg.alpha, cfg.beta, cfg.seed, band)
    student.requires_grad_(True).train()
    if job.blocks is not None:  # outside the band the student is the teacher, exactly, and stays so
        freeze_all_but_band(student, job.blocks, cfg.block_weights)
    if cfg.gradient_checkpointing:
        set_checkpointing(student, True)
    return teacher, student


def _train(job: DistillJob) -> Path:
    cfg, run_dir = job.cfg, job.output.work
    torch.manual_seed(cfg.seed)
    teacher, student = _load_models(job)
    device = next(student.parameters()).device
    trainable = {name: p for name, p in student.named_parameters() if p.requires_grad}
    optimizer = build_optimizer(list(trainable.items()), cfg.optimizer, cfg.lr, cfg.weight_decay,
                                exclude_from_muon=embedding_parameters(student), momentum=cfg.momentum)
    state = load_checkpoint(run_dir) if cfg.resume else None
    start = restore_checkpoint(state, trainable, optimizer) if state is not None else 0
    trained = state["extra"].get("trained") if state is not None else None  # training done, then a failure
    if state is not None:
        log.info("resuming %s at step %d of %d%s", run_dir, start, cfg.steps,
                 ": training is done, saving and evaluating the student" if trained is not None else "")
    write_json_atomic(run_dir / RUN_CONFIG_FILE, {
        **to_jsonable(cfg), "model": job.source.get("model"), "forget": job.source.get("forget"),
        "teacher": str(cfg.teacher), "full": True, "run_dir": str(job.output.final),
        **({TRAINED_BLOCKS_KEY: list(job.blocks)} if job.blocks is not None else {})})
    tracker = open_tracker(cfg, run_dir, job.output.final.name, "distill", resume_step=start,
                           final=job.output.final)
    tracker.log_config(read_json(run_dir / RUN_CONFIG_FILE))
    metrics_log = MetricsLog(run_dir / METRICS_FILE, resume_step=start, tracker=tracker)
    pad_id = job.tokenizer.pad_token_id
    generated, generate_seconds = _generated_documents(job, teacher)
    docs = job.docs + generated

    heldout = HeldoutScorer(teacher, job.heldout, pad_id, cfg.eval_batch, cfg.chunk)

    reference = state["extra"]["heldout"] if state is not None else None
    if reference is None:
        reference = heldout(student)
        reference["recovered"] = recovered_share(reference["heldout_ce"], reference["teacher_heldout_ce"],
                                                 reference["heldout_ce"])
        metrics_log.write({"step": 0, **reference, **(_tasks_point(cfg, student, job.tokenizer) if cfg.eval_every
                                                      else {})})
    log.info("held-out cross-entropy: teacher %.4f, perturbed student %.4f (KL %.4f)",
             reference["teacher_heldout_ce"], reference["heldout_ce"], reference["heldout_kl"])

    def measure() -> dict[str, float]:
        point = heldout(student)
        point["recovered"] = recovered_share(reference["heldout_ce"], point["teacher_heldout_ce"], point["heldout_ce"])
        return point

    def reached(point: dict[str, float]) -> str | None:
        """Why training stops at this measured point, or None."""
        if cfg.target_share and point["recovered"] >= cfg.target_share:
            return "target_share"
        if cfg.stop_within is not None and within_teacher(point, cfg.stop_within):
            return "stop_within"
        return None

    def micro_batches(step: int) -> list[list[dict[str, torch.Tensor]]]:
        ids = batch_indices(len(docs), cfg.batch, step, cfg.seed)
        return [padded_groups([docs[k] for k in ids[i:i + cfg.per_device_batch]], pad_id)
                for i in range(0, cfg.batch, cfg.per_device_batch)]

    def loss_fn(groups: list[dict[str, torch.Tensor]], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        total, count = distill_kl(student, teacher, [{k: v.to(device) for k, v in g.items()} for g in groups],
                                  cfg.chunk)
        loss = total / count.clamp_min(1)
        return loss, {"kl": loss.item(), "tokens": float(count)}

    last: dict[str, float] = {}
    # tokens distilled on so far, for --max_tokens: a resumed run counts the steps its metrics kept
    seen = distilled_tokens(run_dir / METRICS_FILE) if start > 0 else 0

    def on_step(step: int, metrics: dict[str, float]) -> None:
        nonlocal seen
        done, line = step + 1, {k: metrics[k] for k in LOGGED if k in metrics}
        last.update(metrics)
        seen += int(metrics.get("tokens", 0))
        out_of_tokens = cfg.max_tokens is not None and seen >= cfg.max_tokens and done < cfg.steps
        stop: str | None = None
        point: dict[str, float] | None = None
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
            point = measure()
            stop = reached(point)
            # the step where training stops gets its held-out numbers and tasks from the final
            # evaluation's line, once
            if not stop and not out_of_tokens:
                line.update({**point, **_tasks_point(cfg, student, job.tokenizer)})
        if not stop and out_of_tokens:
            point, stop = point or measure(), "max_tokens"
        metrics_log.write(line)
        if stop:
            raise _TargetReached(done, point, stop)

    def checkpoint(step: int) -> None:
        save_checkpoint(run_dir, step, trainable, optimizer, extra={"run": cfg.name, "heldout": reference})

    spec = LoopSpec(params=list(trainable.values()), optimizer=optimizer, base_lr=cfg.lr, total_steps=cfg.steps,
                    micro_batches=micro_batches, loss_fn=loss_fn, clip=cfg.clip,
                    lr_factor=lambda s: lr_factor(s, cfg.steps, cfg.warmup, cfg.schedule), on_step=on_step,
                    checkpoint=checkpoint, checkpoint_every=cfg.checkpoint_every, desc="distill",
                    postfix=("kl", "lr", "tokens_per_s"))
    trained_at = time.perf_counter()
    steps_run, stop_reason, final = cfg.steps, "steps", None
    with tracker:  # closed before the output is committed; marked failed on an error
        if trained is not None:
            steps_run, stop_reason, final = trained["steps"], trained["stop_reason"], trained["final"]
            last.update(trained["last"])
        elif start == 0 and reached(reference):
            steps_run, stop_reason = 0, reached(reference)  # the perturbation cost nothing to recover
        else:
            try:
                run_loop(spec, start_step=start)
            except _TargetReached as stop:
                steps_run, stop_reason, final = stop.step, stop.reason, stop.point
            final = final or measure()
            if cfg.checkpoint_every:
                # the trained student, kept until it is saved and evaluated: should either fail, --resume goes
                # straight back to it instead of distilling again
                save_checkpoint(run_dir, steps_run, trainable, optimizer, extra={
                    "run": cfg.name, "heldout": reference, "trained": {
                        "steps": steps_run, "stop_reason": stop_reason, "final": final, "last": dict(last)}})
        return _finish(job, student, metrics_log, reference, final or measure(), last, {
            "steps": steps_run, "stop_reason": stop_reason, "train_seconds": time.perf_counter() - trained_at,
            "documents": {"corpus": len(job.docs), "generated": len(generated)},
            "generate_seconds": generate_seconds})


# --- documents the teacher writes ---------------------------------------------------------------


def generate_documents(model: nn.Module, prompts: list[list[int]], count: int, length: int, temperature: float,
                       seed: int, batch: int, stop: set[int], pad_id: int, done: list[list[int]] | None = None,
                       on_batch: Callable[[list[list[int]]], None] | None = None) -> list[list[int]]:
    """`count` documents sampled from `model`'s full next-token distribution (no top-k or top-p cut):
    document i continues prompts[i % len(prompts)] up to `length` tokens in all, ending before its
    first stop id. Batch b of `batch` documents is drawn with the seed `seed + b`, so documents already
    written (`done`, whole batches) are kept and the rest come out exactly as an uninterrupted run would
    write them. `on_batch(documents so far)` follows each batch."""
    docs = list(done or [])
    if len(docs) % batch and len(docs) < count:
        raise ValueError(f"{len(docs)} documents already written is not a whole number of batches of {batch}")
    device = next(model.parameters()).device
    starts = range(len(docs), count, batch)
    for start in tqdm(starts, desc="generate", dynamic_ncols=True, disable=not starts):
        rows = [prompts[i % len(prompts)] for i in range(start, min(start + batch, count))]
        sample = _sampler(temperature, torch.Generator(device=device).manual_seed(seed + start // batch))
        room = length - max(map(len, rows))
        new = decode_batch(model, rows, room, pad_id, stop, choose=sample) if room > 0 else [[] for _ in rows]
        docs.extend(row + ids for row, ids in zip(rows, new))
        if on_batch is not None:
            on_batch(docs)
    return docs


def _sampler(temperature: float, generator: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    """Next ids drawn from softmax(logits / temperature), the whole vocabulary, with `generator`."""
    def sample(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
    return sample


def _generated_documents(job: DistillJob, teacher: nn.Module) -> tuple[list[list[int]], float]:
    """(the --generate documents, seconds spent writing them now): those in the output folder, completed by
    the teacher, the file rewritten atomically after each batch so that a killed run loses at most one."""
    cfg, path = job.cfg, job.output.work / DISTILL_GENERATED_FILE
    if not cfg.generate:
        return [], 0.0
    done = [json.loads(line)["ids"] for line in path.read_text().splitlines() if line.strip()] \
        if path.is_file() else []
    if len(done) >= cfg.generate:
        log.info("--generate: reusing the %d documents of %s", cfg.generate, path)
        return done[:cfg.generate], 0.0
    began = time.perf_counter()
    if done:
        log.info("--generate: %d of %d documents already in %s, writing the rest", len(done), cfg.generate, path)

    def save(docs: list[list[int]]) -> None:
        write_jsonl_atomic(path, ({"ids": d, "text": job.tokenizer.decode(d)} for d in docs))

    docs = generate_documents(teacher, job.prompts, cfg.generate, cfg.max_length, cfg.generate_temperature,
                              cfg.seed, cfg.generate_batch, stop_ids(teacher, job.tokenizer), pad_id_of(job.tokenizer),
                              done=done, on_batch=save)
    seconds = time.perf_counter() - began
    log.info("--generate: the teacher wrote %d documents (%.0f tokens each on average) in %.0f s -> %s", len(docs),
             sum(map(len, docs)) / len(docs), seconds, path)
    return docs, seconds


def _tasks_point(cfg: DistillConfig, model: nn.Module, tokenizer) -> dict[str, float]:
    """The eval tasks' accuracies as `eval/<task>/acc` keys (none without tasks); weights, mode and random
    state untouched (see `unlearn.evaluate_in_training`)."""
    if not cfg.eval_tasks.strip():
        return {}
    from .run import evaluate_in_training

    # every evaluation setting of `cfg`, with the student's name for the result's "model"
    request = SimpleNamespace(**{**vars(cfg), "model": "student"})
    return evaluate_in_training(request, model, tokenizer, next(model.parameters()).device)


def _final_eval(cfg: DistillConfig, model: nn.Module, tokenizer, path: Path) -> dict | None:
    """eval.json of the distilled model (the eval tasks on --eval_limit questions), or None without tasks."""
    if not cfg.eval_tasks.strip():
        return None
    from ..eval.evaluate import evaluate

    result = evaluate(model, tokenizer, cfg.eval_tasks, format=cfg.eval_format, batch_size=cfg.eval_batch,
                      limit=cfg.eval_limit, model_name=str(path.parent / MERGED_DIR),
                      lm_eval_include=cfg.lm_eval_include)
    result["request"] = {"model": str(path.parent / MERGED_DIR), "dtype": cfg.dtype, "tasks": cfg.eval_tasks,
                         "format": cfg.eval_format, "limit": cfg.eval_limit}
    write_json_atomic(path, result)
    return result


def distilled_tokens(path: Path) -> int:
    """Tokens distilled on (predicting positions, summed over every step in the metrics log)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return int(sum(row.get("tokens", 0) for row in rows if "kl" in row))


def budget_curve(path: Path) -> list[dict]:
    """The held-out numbers and task accuracies per measured step, from the metrics log (a step's final
    evaluation may sit on a line of its own), each with the tokens distilled on up to that step."""
    curve: dict[int, dict] = {}
    seen, tokens_at = 0, {0: 0}
    for line in path.read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if "kl" in row:
            seen += int(row.get("tokens", 0))
            tokens_at[row["step"]] = seen
        kept = {k: v for k, v in row.items() if k in HELDOUT_KEYS or k.startswith(EVAL_KEY_PREFIX)}
        if kept:
            curve.setdefault(row["step"], {"step": row["step"]}).update(kept)
    return [{**curve[step], "tokens": tokens_at.get(step, seen)} for step in sorted(curve)]


def _finish(job: DistillJob, student: nn.Module, metrics_log: MetricsLog, reference: dict, final: dict,
            last: dict, stopped: dict) -> Path:
    """Save the student as merged/, evaluate it, copy the base evaluation, drop the checkpoint and write
    the summary, which marks the run done."""
    from .run import curve_point

    cfg, run_dir = job.cfg, job.output.work
    if cfg.gradient_checkpointing:
        set_checkpointing(student, False)
    student.eval()
    student.save_pretrained(run_dir / MERGED_DIR)
    job.tokenizer.save_pretrained(run_dir / MERGED_DIR)
    result = _final_eval(cfg, student, job.tokenizer, run_dir / EVAL_FILE)
    # the curve's last point: the state after the last step taken
    metrics_log.write({"step": stopped["steps"], **final, **(curve_point(result) if result else {})})
    base_eval = Path(cfg.run) / BASE_EVAL_FILE  # the original model's evaluation, the baseline of tamper and report
    if base_eval.is_file():
        write_text_atomic(run_dir / BASE_EVAL_FILE, base_eval.read_text())
    teacher_eval = Path(cfg.run) / EVAL_FILE
    remove_checkpoint(run_dir)
    write_json_atomic(run_dir / SUMMARY_FILE, {
        "source_run": cfg.run, "alpha": cfg.alpha, "beta": cfg.beta, "seed": cfg.seed, **stopped,
        "steps_planned": cfg.steps, "target_share": cfg.target_share, "stop_within": cfg.stop_within,
        "tokens": distilled_tokens(run_dir / METRICS_FILE),
        "excess_over_teacher": final["heldout_ce"] / max(final["teacher_heldout_ce"], 1e-6) - 1,
        "recovered": final["recovered"],
        "heldout_ce_init": reference["heldout_ce"], "heldout_ce_teacher": final["teacher_heldout_ce"],
        "heldout_ce": final["heldout_ce"], "heldout_kl": final["heldout_kl"], "final_kl": last.get("kl"),
        "teacher_eval": curve_point(read_json(teacher_eval)) if teacher_eval.is_file() else None,
        "wall_seconds": time.perf_counter() - job.began, "budget_curve": budget_curve(run_dir / METRICS_FILE)})
    if metrics_log.tracker is not None:  # the summary's numbers, then the tracker's files are complete
        metrics_log.tracker.log_summary(flatten(read_json(run_dir / SUMMARY_FILE)))
        metrics_log.tracker.close()
    job.output.commit()
    log.info("distilled %d steps (%s), recovered %.3f of the held-out gap, in %.1f s -> %s", stopped["steps"],
             stopped["stop_reason"], final["recovered"], time.perf_counter() - job.began, job.output.final)
    return job.output.final

