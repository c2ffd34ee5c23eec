"""Knowledge profile: how much of a task each layer's tuned lens still answers.

For every layer l in 0..L-1 the answer log-likelihoods are read from `lens(stream_l, l)` at the
answer positions, the same positions and targets the model's own output is scored at. Accuracy
per layer shows whether knowledge removed from the output still sits in intermediate layers.
`plots.plot_profile` draws it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..report.tables import markdown_table, number


@torch.no_grad()
def layer_logprobs(lens, streams: dict[int, torch.Tensor], rows: torch.Tensor, cols: torch.Tensor,
                   targets: torch.Tensor, inverse: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probabilities of `targets` under each layer's lens: [layers, reads], float32.

    The lens runs once per position (rows[i], cols[i]); read k takes position `inverse[k]`
    (default: read k is position k), so choices that share a position share its logits.
    """
    index = inverse if inverse is not None else torch.arange(len(targets), device=targets.device)
    out = []
    for layer in sorted(streams):
        logprobs = torch.log_softmax(lens(streams[layer][rows, cols], layer).float(), dim=-1)
        out.append(logprobs[index, targets])
    return torch.stack(out)


def layer_accuracy(layer_lls: Sequence[np.ndarray], golds: Sequence[int], choice_lengths: Sequence[Sequence[int]]
                   ) -> tuple[list[float], list[float]]:
    """(acc, acc_norm) per layer from per-question [layers, choices] log-likelihoods."""
    if not layer_lls:
        return [], []
    stacked = np.stack(layer_lls)  # [questions, layers, choices]
    lengths = np.asarray(choice_lengths, dtype=float)[:, None, :]
    gold = np.asarray(golds)[:, None]
    acc = (stacked.argmax(-1) == gold).mean(0)
    acc_norm = ((stacked / lengths).argmax(-1) == gold).mean(0)
    return acc.tolist(), acc_norm.tolist()


def profile_table(profile: dict) -> str:
    """A text table of accuracy per layer, one column per task."""
    tasks = list(profile["tasks"])
    rows = [[layer, *(number(profile["tasks"][t]["acc"][i], 4) for t in tasks)]
            for i, layer in enumerate(profile["layers"])]
    rows.append(["final", *(number(profile["tasks"][t]["final_acc"], 4) for t in tasks)])
    return markdown_table(["layer", *tasks], rows)

