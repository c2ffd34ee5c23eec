"""Our in-process scorer against lm-evaluation-harness on the embedded model, same cloze questions.

    python benchmarks/eval_speed.py [--domain country_capital] [--batch_size 16] [--out FILE.json]

Also reports each fact domain's base accuracy (cloze and letter) and a knowledge-profile table
(the lens at runs/lens_smollm2 when it exists, else an untrained lens, i.e. the logit lens).
Runs offline: lm-eval reads the questions from a local jsonl (`dataset_path: json`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lensunlearn.data import facts
from lensunlearn.eval.evaluate import evaluate
from lensunlearn.eval.knowledge_profile import profile_table
from lensunlearn.lens.tuned_lens import TunedLens
from lensunlearn.modeling.loading import load_model

CLOZE_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def run_lm_eval(model, tokenizer, domain: str, batch_size: int, folder: Path) -> tuple[dict, list, float]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    data = facts.write_questions(domain, folder / f"{domain}.jsonl")
    name = f"bench_{domain}"
    (folder / f"{name}.yaml").write_text(CLOZE_YAML.format(name=name, data=data))
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
    started = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=manager, num_fewshot=0, log_samples=True)
    wall = time.perf_counter() - started
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    return out["results"][name], [[r[0] for r in s["filtered_resps"]] for s in samples], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--domain", default="country_capital", choices=facts.DOMAINS)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lens", default="runs/lens_smollm2")
    parser.add_argument("--out", default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both scorers (1 is steadiest on a shared machine)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each scorer (best is reported)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, "float32", "cpu")
    report: dict = {"model": args.model, "domain": args.domain, "batch_size": args.batch_size,
                    "threads": args.threads}

    our_walls, their_walls = [], []
    with tempfile.TemporaryDirectory() as tmp:
        preds = Path(tmp) / "ours.jsonl"
        # warm-up
        evaluate(model, tokenizer, [f"facts:{args.domain}"], "cloze", args.batch_size, limit=8, progress=False)
        for _ in range(args.repeats):  # interleaved, so a busy machine slows both alike
            ours = evaluate(model, tokenizer, [f"facts:{args.domain}"], "cloze", args.batch_size,
                            predictions_path=preds, progress=False)
            our_walls.append(ours["wall_time_s"])
            theirs, their_lls, wall = run_lm_eval(model, tokenizer, args.domain, args.batch_size, Path(tmp))
            their_walls.append(wall)
        our_lls = [json.loads(line)["loglikelihoods"] for line in preds.read_text().splitlines()]
    ours_r = ours["results"][f"facts:{args.domain}"]
    report["speed"] = {
        "n": ours_r["n"], "ours_acc": ours_r["acc"], "lm_eval_acc": theirs["acc,none"],
        "ours_acc_norm": ours_r["acc_norm"], "lm_eval_acc_norm": theirs["acc_norm,none"],
        "ours_wall_s": our_walls, "lm_eval_wall_s": their_walls,
        "speedup_of_best": min(their_walls) / min(our_walls),
        "max_abs_ll_diff": float(np.abs(np.array(our_lls) - np.array(their_lls)).max()),
    }
    base = {}
    for domain in facts.DOMAINS:
        for fmt in ("cloze", "letter"):
            r = evaluate(model, tokenizer, [f"facts:{domain}"], fmt, args.batch_size, progress=False)
            base[f"{domain}/{fmt}"] = {k: r["results"][f"facts:{domain}"][k] for k in ("acc", "acc_norm", "n")}
    report["base_accuracy"] = base
    lens_path = Path(args.lens)
    lens = TunedLens.load(lens_path, model) if (lens_path / "params.pt").exists() else TunedLens.from_model(model)
    report["lens"] = str(lens_path) if (lens_path / "params.pt").exists() else "untrained (logit lens)"
    prof = evaluate(model, tokenizer, [f"facts:{args.domain}"], "cloze", args.batch_size, lens=lens, progress=False)
    report["profile"] = prof["profile"]
    report["profile_wall_s"] = prof["wall_time_s"]
    print(json.dumps({k: v for k, v in report.items() if k != "profile"}, indent=2))
    print(f"knowledge profile ({report['lens']}):")
    print(profile_table(prof["profile"]))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
