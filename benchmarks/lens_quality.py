"""Tuned-lens quality: `lens train`'s defaults against the tuned-lens library's recipe, same documents.

Both arms fit a lens to the same training documents (a seeded sample of the fact corpus) and are
then evaluated by one evaluator on held-out text: fact sentences in neither arm's training set and
prose paragraphs (the docstrings of a fixed list of Python standard-library modules, split at blank
lines: deterministic, installed everywhere, nothing downloaded). The figure is the mean per-token
KL(model's output || lens) at every layer, float32 throughout, and its mean over layers.

  ours     `lensunlearn lens train` (`train_lens`) with its defaults, plus any flags given in
           `--ours` (e.g. `--ours "old=--optimizer muon --lr 1e-3 --weight_decay 0.01"` adds an arm).
  library  the tuned-lens package's own `TunedLens` and its `chunk_and_tokenize` (the documents
           joined by EOS and cut into `--chunk` token pieces, the last partial one dropped), trained
           by a plain torch loop that reproduces its `train` loop, whose module needs packages
           the test extras do not install (simple_parsing, torchdata): per layer the KL of the lens
           under bfloat16 autocast, mean over tokens, summed over layers (a backward per layer);
           SGD with Nesterov momentum 0.9 at lr 1.0 x (1 - 0.9), weight decay 1e-3, linear decay
           without warmup (transformers' `get_linear_schedule_with_warmup`), gradient clip 1.0,
           one chunk per step (its `tokens_per_step` = one chunk at this scale), one epoch of chunks
           in a seeded order.
  --lens NAME=DIR  also evaluates a lens folder trained elsewhere (e.g. by an older checkout).

Wall times are the training loops alone (model loading and evaluation excluded), on
`--threads` threads. Results go to stdout and, with --out, to a JSON file.

    python benchmarks/lens_quality.py --threads 2 --out runs/lens_quality.json
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import tempfile
import time
from pathlib import Path

import torch

from lensunlearn.cli import main as lensunlearn_main
from lensunlearn.data.corpora import collate, load_texts, tokenize
from lensunlearn.lens.train import lens_streams
from lensunlearn.lens.tuned_lens import TunedLens
from lensunlearn.modeling.loading import load_model
from lensunlearn.modeling.losses import lens_kl

# Modules whose docstrings are paragraphs of English prose (sorted; deterministic for one Python version).
PROSE_MODULES = ("argparse", "ast", "asyncio", "base64", "bdb", "bisect", "calendar", "cgitb", "cmd", "codecs",
                 "collections", "contextlib", "copy", "csv", "dataclasses", "decimal", "difflib", "doctest",
                 "email", "enum", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob",
                 "heapq", "hmac", "imaplib", "inspect", "ipaddress", "json", "locale", "logging", "mailbox",
                 "numbers", "optparse", "pickle", "pickletools", "pdb", "pprint", "pydoc", "queue", "random",
                 "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket",
                 "socketserver", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
                 "threading", "timeit", "tokenize", "trace", "typing", "unittest", "uuid", "warnings", "wave",
                 "weakref", "xdrlib", "zipfile", "zipimport")


def prose_paragraphs(limit: int, min_chars: int = 200) -> list[str]:
    """Up to `limit` paragraphs of standard-library docstrings (modules and their public members)."""
    import importlib
    import inspect
    import re
    import warnings

    out: list[str] = []
    for name in PROSE_MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except ImportError:
            continue
        members = [getattr(module, m, None) for m in sorted(vars(module)) if not m.startswith("_")]
        for obj in [module, *members]:
            if obj is not module and getattr(obj, "__module__", None) != name:
                continue
            for block in inspect.cleandoc(getattr(obj, "__doc__", None) or "").split("\n\n"):
                lines = block.strip("\n").splitlines()
                text = " ".join(line.strip() for line in lines)
                # prose: flush-left sentences; code, examples, lists, tables and headings are left out
                if (len(text) >= min_chars and text.endswith(".") and all(line == line.lstrip() for line in lines)
                        and not re.search(r"[=<>|*$#{}]|\w\(|^-|:$", text) and text not in out):
                    out.append(text)
                    if len(out) == limit:
                        return out
    return out


def corpus(args: argparse.Namespace) -> tuple[list[str], list[str], list[str]]:
    """(training texts, held-out texts of `--corpus`, prose): a seeded sample of `--corpus` and the rest."""
    texts = load_texts(args.corpus)
    order = random.Random(args.seed).sample(range(len(texts)), len(texts))
    train = [texts[i] for i in order[:args.docs]]
    return train, [texts[i] for i in order[args.docs:args.docs + args.heldout_docs]], prose_paragraphs(args.prose)


def train_ours(args: argparse.Namespace, name: str, flags: list[str], train_file: Path, work: Path) -> dict:
    out = work / name
    began = time.perf_counter()
    lensunlearn_main(["lens", "train", "--model", args.model, "--corpus", str(train_file), "--holdout", "0",
                      "--out", str(out), "--overwrite", "--checkpoint_every", "0", *flags])
    total = time.perf_counter() - began
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"dir": out, "train_s": sum(s["seconds"] for s in steps), "total_s": total, "steps": len(steps),
            "tokens": int(sum(s["tokens"] for s in steps)), "flags": " ".join(flags)}


def train_library(args: argparse.Namespace, model, tokenizer, train_texts: list[str], work: Path) -> dict:
    """The tuned-lens library's recipe (see the module docstring)."""
    import datasets
    from transformers import get_linear_schedule_with_warmup
    from tuned_lens.data import chunk_and_tokenize
    from tuned_lens.nn.lenses import TunedLens as LibraryLens

    torch.manual_seed(args.seed)
    data, _ = chunk_and_tokenize(datasets.Dataset.from_dict({"text": train_texts}), tokenizer, max_length=args.chunk,
                                 num_proc=1, load_from_cache_file=False)
    chunks = data["input_ids"]
    order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(args.seed)).tolist()
    lens = LibraryLens.from_model(model)
    params = [p for p in lens.parameters() if p.requires_grad]
    momentum = 0.9
    opt = torch.optim.SGD(params, lr=1.0 * (1 - momentum), momentum=momentum, nesterov=True, weight_decay=1e-3)
    scheduler = get_linear_schedule_with_warmup(opt, 0, len(order))
    began = time.perf_counter()
    for index in order:
        ids = torch.as_tensor(chunks[index]).reshape(1, -1)
        with torch.no_grad():
            output = model(input_ids=ids, output_hidden_states=True)
        labels = output.logits.float().log_softmax(dim=-1)
        for layer, h in enumerate(output.hidden_states[:-1]):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = lens(h, idx=layer)
                loss = torch.sum(labels.exp() * (labels - logits.log_softmax(-1)), dim=-1).mean()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(lens.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        scheduler.step()
    train_s = time.perf_counter() - began
    out = work / "library"
    lens.save(out)
    return {"dir": out, "train_s": train_s, "total_s": train_s, "steps": len(order),
            "tokens": len(order) * args.chunk, "flags": f"tuned-lens recipe, {args.chunk}-token chunks"}


def evaluate(model, tokenizer, lenses: dict[str, TunedLens], texts: list[str], batch: int, max_length: int
             ) -> tuple[dict[str, torch.Tensor], int]:
    """Per-layer summed token KL(model || lens) on `texts` for every lens, and the token count.

    The KL is `losses.lens_kl`'s (the model's distribution from its final stream, each lens's by
    the fused cross-entropy), in the lens's own product dtype."""
    docs = tokenize(texts, tokenizer, max_length)
    sums = {name: torch.zeros(lens.num_layers, dtype=torch.float64) for name, lens in lenses.items()}
    n_tokens = 0
    with torch.no_grad():
        for start in range(0, len(docs), batch):
            num_layers = next(iter(lenses.values())).num_layers
            streams, final = lens_streams(model, collate(docs[start:start + batch], tokenizer.pad_token_id),
                                          num_layers)
            n_tokens += streams.shape[0]
            for name, lens in lenses.items():
                sums[name] += lens_kl(lens, range(num_layers), streams, final).double()
    return sums, n_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--corpus", default="facts:all", help="corpus the training and held-out documents come from")
    parser.add_argument("--docs", type=int, default=450, help="training documents (both arms)")
    parser.add_argument("--heldout_docs", type=int, default=400, help="held-out documents of --corpus")
    parser.add_argument("--prose", type=int, default=76, help="held-out prose paragraphs")
    parser.add_argument("--chunk", type=int, default=128, help="the library arm's packed chunk length")
    parser.add_argument("--ours", action="append", default=None,
                        help='an arm of ours: "NAME=FLAGS" for `lens train` (default: one arm "ours", no flags)')
    parser.add_argument("--lens", action="append", default=[], help="NAME=DIR: also evaluate this lens folder")
    parser.add_argument("--no_library", action="store_true", help="skip the library arm")
    parser.add_argument("--eval_batch", type=int, default=8)
    parser.add_argument("--eval_matmul", choices=("float32", "bfloat16"), default="float32",
                        help="the evaluator's unembedding product (bfloat16: faster, KL to about 3 digits)")
    parser.add_argument("--eval_max_length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--work", default=None, help="keep the trained lenses here (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model, "float32", "cpu")
    model.requires_grad_(False)
    train_texts, held_facts, held_prose = corpus(args)
    arms = [a.split("=", 1) if "=" in a else (a, "") for a in (args.ours or ["ours="])]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        train_file = work / "train.jsonl"
        train_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in train_texts))
        runs = {name: train_ours(args, name, shlex.split(flags), train_file, work) for name, flags in arms}
        if not args.no_library:
            runs["library"] = train_library(args, model, tokenizer, train_texts, work)
        for spec in args.lens:
            name, folder = spec.split("=", 1)
            runs[name] = {"dir": Path(folder), "train_s": float("nan"), "total_s": float("nan"), "steps": 0,
                          "tokens": 0, "flags": f"lens folder {folder}"}
        matmul = {"float32": None, "bfloat16": torch.bfloat16}[args.eval_matmul]
        lenses = {"logit lens": TunedLens.from_model(model).set_matmul_dtype(matmul)}
        lenses.update({name: TunedLens.load(run["dir"], model).set_matmul_dtype(matmul) for name, run in runs.items()})
        began = time.perf_counter()
        parts = {what: evaluate(model, tokenizer, lenses, texts, args.eval_batch, args.eval_max_length)
                 for what, texts in (("facts", held_facts), ("prose", held_prose)) if texts}
        eval_s = time.perf_counter() - began
    n_tokens = sum(n for _, n in parts.values())
    kl = {name: (sum(s[name] for s, _ in parts.values()) / n_tokens).tolist() for name in lenses}
    by_part = {what: {name: float(s[name].mean()) / n for name in lenses} for what, (s, n) in parts.items()}

    names = list(kl)
    print(f"lens quality, {args.model}, {len(train_texts)} training documents of {args.corpus}; held out: "
          f"{len(held_facts)} documents of it and {len(held_prose)} prose paragraphs, {n_tokens} tokens; "
          f"{args.threads} threads; evaluation ({args.eval_matmul}) {eval_s:.0f} s")
    print("per-token KL(model || lens) in nats, by layer")
    names = list(kl)
    print("layer " + "".join(f"{n:>14}" for n in names))
    for layer in range(len(kl[names[0]])):
        print(f"{layer:>5} " + "".join(f"{kl[n][layer]:>14.4f}" for n in names))
    mean_kl = {n: sum(v) / len(v) for n, v in kl.items()}
    print(" mean " + "".join(f"{mean_kl[n]:>14.4f}" for n in names))
    for what, means in by_part.items():
        print(f"{what:>5} " + "".join(f"{means[n]:>14.4f}" for n in names))
    print(f"{'arm':<14} {'mean KL':>8} {'steps':>6} {'tokens':>7} {'train s':>8}  recipe")
    for name, run in runs.items():
        print(f"{name:<14} {mean_kl[name]:>8.4f} {run['steps']:>6} {run['tokens']:>7} {run['train_s']:>8.1f}  "
              f"{run['flags']}")
    if args.out:
        result = {"model": args.model, "threads": args.threads, "train_documents": len(train_texts),
                  "heldout_documents": len(held_facts), "heldout_prose": len(held_prose), "heldout_tokens": n_tokens,
                  "eval_matmul": args.eval_matmul, "kl": kl, "mean_kl": mean_kl, "mean_kl_by_part": by_part,
                  "runs": {n: {k: (str(v) if k == "dir" else v) for k, v in r.items()} for n, r in runs.items()}}
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = path.with_name(f".{path.name}.tmp")
        tmp_path.write_text(json.dumps(result, indent=1))
        tmp_path.replace(path)


if __name__ == "__main__":
    main()
