"""`lens eval`: how well a tuned lens reads each layer, against the logit lens, on held-out text.

For every layer, the mean token KL from the model's output distribution to each lens's, and how
often each lens's top token is the model's. The documents are those `lens train` held out (same
corpus options and seed).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.atomic import write_json_atomic
from ..core.outputs import check_file_output
from ..core.paths import LENS_PLOT_SUFFIX, beside
from ..data.corpora import collate
from ..modeling.loading import DTYPES, load_model, model_short_name
from ..report.plots import plot_lens_kl
from ..report.tables import markdown_table, number
from .options import LensEvalConfig
from .train import lens_streams, split_documents
from .tuned_lens import TunedLens

log = logging.getLogger(__name__)


def lens_table(model, lens: TunedLens, docs: list[list[int]], pad_id: int, batch: int, chunk: int) -> list[dict]:
    """Per-layer mean token KL to the model's output and top-1 agreement, tuned lens vs logit lens.

    Per row, KL(p || q) = sum p log p - p . z + logsumexp(z) for the lens logits z, and p . z is
    the normed stream times the model distribution's expected unembedding (computed once per chunk
    and shared by every layer), so each layer's [tokens, V] logits are read only for their
    logsumexp and argmax, not turned into a second distribution.
    """
    num_layers = lens.num_layers
    sums = torch.zeros(num_layers, 4, dtype=torch.float64)  # logit kl, tuned kl, logit top1, tuned top1
    n_tokens = 0
    for start in tqdm(range(0, len(docs), batch), desc="lens eval", dynamic_ncols=True):
        streams, final = lens_streams(model, collate(docs[start:start + batch], pad_id), num_layers)
        n_tokens += streams.shape[0]
        with torch.no_grad():
            for s in range(0, streams.shape[0], chunk):
                target = F.log_softmax(lens.decode(final[s:s + chunk].float()), dim=-1)
                top = target.argmax(-1)
                p = target.exp()
                neg_entropy = (p * target).sum(-1)
                expected, expected_bias = lens.expected_unembedding(p)
                del target, p
                for layer in range(num_layers):
                    h = streams[s:s + chunk, layer].float()
                    for column, stream in ((0, h), (1, lens.transform(h, layer))):
                        normed = lens.final_norm(stream)
                        logits = lens.decode_normed(normed)
                        p_dot_z = (normed * expected).sum(-1) + (0.0 if expected_bias is None else expected_bias)
                        kl = neg_entropy - p_dot_z + torch.logsumexp(logits, dim=-1)
                        sums[layer, column] += kl.sum().double()
                        sums[layer, column + 2] += (logits.argmax(-1) == top).sum().double()
    means = (sums / max(n_tokens, 1)).tolist()
    return [{"layer": l, "logit_lens_kl": m[0], "tuned_lens_kl": m[1], "logit_lens_top1": m[2],
             "tuned_lens_top1": m[3]} for l, m in enumerate(means)]


def format_lens_table(rows: list[dict]) -> str:
    """KL (nats) and top-1 agreement with the model's output, per layer, as a markdown table."""
    return markdown_table(["layer", "logit_lens_kl", "tuned_lens_kl", "logit_top1", "tuned_top1"],
                          [[r["layer"], number(r["logit_lens_kl"], 4), number(r["tuned_lens_kl"], 4),
                            number(r["logit_lens_top1"], 3), number(r["tuned_lens_top1"], 3)] for r in rows], "rrrrr")


def _is_lens_table(path: Path) -> bool:
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(result, dict) and "layers" in result and "lens" in result


def eval_lens(cfg: LensEvalConfig) -> dict:
    """Per-layer KL and top-1 agreement of the tuned and logit lenses on held-out text."""
    if cfg.out:
        for path in (Path(cfg.out), beside(cfg.out, LENS_PLOT_SUFFIX)):
            recognise = _is_lens_table if path.suffix == ".json" else None
            check_file_output(path, cfg.overwrite, "--out", recognise=recognise)
    model, tokenizer = load_model(cfg.model, cfg.dtype, cfg.device, cfg.trust_remote_code)
    lens = TunedLens.load(cfg.lens, model).set_matmul_dtype(DTYPES[cfg.lens_matmul])
    train_docs, held = split_documents(cfg, tokenizer)
    docs = held or train_docs
    if not held:
        log.warning("--holdout is 0: evaluating on the training documents")
    docs = docs[:cfg.eval_limit]
    rows = lens_table(model, lens, docs, tokenizer.pad_token_id, cfg.eval_batch, cfg.chunk)
    result = {"model": cfg.model, "lens": cfg.lens, "corpus": cfg.corpus, "documents": len(docs), "layers": rows}
    print(format_lens_table(rows))
    if cfg.out:
        plot = beside(cfg.out, LENS_PLOT_SUFFIX)
        write_json_atomic(cfg.out, result)
        plot_lens_kl(rows, plot, f"{model_short_name(cfg.model)}: lens KL by layer")
        log.info("wrote %s and %s", cfg.out, plot)
    return result

