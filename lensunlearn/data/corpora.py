"""Corpora: hub datasets, local files, saved datasets and the fact benchmark, as token batches.

A corpus is a list of document strings. Text comes from a named column, else from the
title/abstract/text triple (joined with blank lines, as the WMDP-Bio remove set is), else from a
`text` column. Sequences are truncated to `max_length` and batches padded to their longest row.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.errors import InputError, read_json, read_text

# torch is imported where tensors are made: the configs that name the corpora below stay torch-free,
# so `--help` answers without importing it.
if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

FACTS_PREFIX = "facts:"
GENERIC_PREFIX = "generic:"  # generic:retain / generic:heldout, everyday text naming no fact
WMDP_BIO_FORGET_CORPUS = "Unlearning/WMDP-Bio-Remove-Dataset"  # the reference experiment's forget corpus
_TRIPLE = ("title", "abstract", "text")


# Rows read from local files travel with where they came from ("notes.jsonl line 7"), so that an
# error about a row names the file and the line to fix.
Located = list[tuple[str, dict]]


def _rows_from_file(path: Path) -> Located:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [(f"{path} line {number}", {"text": line})
                for number, line in enumerate(read_text(path).splitlines(), 1) if line.strip()]
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(read_text(path).splitlines(), 1):
            if line.strip():
                try:
                    rows.append((f"{path} line {number}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise InputError(f"{path} line {number}: invalid JSON ({err.msg}, column {err.colno}): each line "
                                    f'must be one object such as {{"text": "..."}}') from err
    elif suffix == ".json":
        data = read_json(path)
        if isinstance(data, dict):
            data = data.get("data", data.get("rows", [data]))
        rows = [(f"{path} item {index}", row) for index, row in enumerate(data)]
    elif suffix == ".parquet":
        import datasets

        loaded = datasets.load_dataset("parquet", data_files=str(path), split="train")
        rows = [(f"{path} row {index}", row) for index, row in enumerate(loaded)]
    else:
        raise ValueError(f"cannot read corpus file {path}: use .jsonl, .json, .parquet or .txt, or a saved dataset "
                         f"folder")
    for where, row in rows:
        if not isinstance(row, dict):
            raise InputError(f'{where}: expected an object such as {{"text": "..."}}, got {type(row).__name__}')
    return rows


def _rows_from_source(source: str, config: str | None, split: str) -> Located | object:
    """Located rows of a local file or folder of files, else a `datasets.Dataset` (saved or from the hub)."""
    path = Path(source).expanduser()
    if path.is_file():
        return _rows_from_file(path)
    if path.is_dir():
        import datasets

        if not any((path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".jsonl", ".json", ".parquet", ".txt"))
            if not files:
                raise ValueError(f"corpus folder {path} holds no saved dataset and no .jsonl/.json/.parquet/.txt files")
            return [row for f in files for row in _rows_from_file(f)]
        loaded = datasets.load_from_disk(str(path))
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    if source.startswith((".", "/", "~")) or source.endswith((".jsonl", ".json", ".parquet", ".txt")):
        raise FileNotFoundError(f"corpus {source} does not exist: pass an existing file or folder, or a hub dataset id")
    import datasets

    return datasets.load_dataset(source, config, split=split)


def _text(where: str, row: dict, key: str, column_flag: str) -> str:
    """`row[key]`, which must be a string: a number or null would otherwise be trained on as "12345" or "None"."""
    if key not in row:
        raise InputError(f"{where} has no {key!r} field (its fields are {sorted(row)}): add it, drop the row, or "
                        f"pass another column with {column_flag}")
    value = row[key]
    if not isinstance(value, str):
        held = "null" if value is None else f"{type(value).__name__} {repr(value)[:40]}"
        raise InputError(f"{where}: {key!r} holds {held}, not text: fix or drop the row, or pass the text column "
                        f"with {column_flag}")
    return value


def _texts_from_rows(rows, source: str, column: str | None, column_flag: str = "--column") -> list[str]:
    if len(rows) == 0:
        return []
    located = rows if isinstance(rows, list) else [(f"{source} row {index}", row) for index, row in enumerate(rows)]
    columns = list(rows.column_names) if hasattr(rows, "column_names") else list(located[0][1])
    if column:
        if column not in columns:
            raise ValueError(f"corpus {source} has no column {column!r}; its columns are {columns}: pass "
                             f"{column_flag} NAME")
        return [_text(where, row, column, column_flag) for where, row in located]
    if all(c in columns for c in _TRIPLE):
        # a paper may lack a title or an abstract (null): join the parts it has
        return ["\n\n".join(_text(where, row, c, column_flag) for c in _TRIPLE if c == "text" or row.get(c) is not None)
                for where, row in located]
    if "text" in columns:
        return [_text(where, row, "text", column_flag) for where, row in located]
    raise ValueError(
        f"corpus {source} has no 'text' column (nor title/abstract/text); its columns are {columns}: "
        f"pass the column to read with {column_flag}")


def load_texts(source: str, *, config: str | None = None, split: str = "train", column: str | None = None,
               limit: int | None = None, shuffle_seed: int | None = None, what: str = "corpus",
               column_flag: str = "--column") -> list[str]:
    """Documents from a hub dataset, a local file/folder, `facts:<domain>` or `generic:retain|heldout`; never empty.

    A fact source may name a part of its split by fact and options (`splits`): `facts:<domain>@forget`,
    `notes.jsonl@retain`, `facts:<domain>?phrasings=diverse`.

    `column_flag` is the command-line flag that sets `column`, named in the hint when a column is missing.
    """
    from .splits import fact_texts, has_options

    if has_options(source):  # a part of a fact source split by fact, or a fact corpus's phrasings
        texts = fact_texts(source)
    elif source.startswith(FACTS_PREFIX):
        from .facts import DOMAINS, corpus_texts

        domain = source[len(FACTS_PREFIX):]
        texts = [t for d in DOMAINS for t in corpus_texts(d)] if domain == "all" else corpus_texts(domain)
    elif source.startswith(GENERIC_PREFIX):
        from .facts import generic_texts

        texts = generic_texts(source[len(GENERIC_PREFIX):])
    else:
        rows = _rows_from_source(source, config, split)
        if shuffle_seed is not None and hasattr(rows, "shuffle"):
            rows = rows.shuffle(seed=shuffle_seed)
        elif shuffle_seed is not None:
            import torch

            rows = list(rows)
            torch_perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(shuffle_seed)).tolist()
            rows = [rows[i] for i in torch_perm]
        if limit is not None and hasattr(rows, "select"):
            rows = rows.select(range(min(limit, len(rows))))
        texts = _texts_from_rows(rows, source, column, column_flag)
    texts = [t for t in texts if t.strip()]
    if limit is not None:
        texts = texts[:limit]
    if not texts:
        raise ValueError(f"{what} {source} is empty: it holds no non-blank documents")
    return texts


def weighted_order(weights: Sequence[float], n: int) -> list[int]:
    """n source indices, each source as often as its weight's share, spread evenly (smooth weighted
    round-robin): every prefix holds each source within one of its share. Deterministic."""
    total, credit, order = float(sum(weights)), [0.0] * len(weights), []
    for _ in range(n):
        for index, weight in enumerate(weights):
            credit[index] += weight
        chosen = max(range(len(weights)), key=lambda i: (credit[i], -i))
        credit[chosen] -= total
        order.append(chosen)
    return order


def tokenize(texts: Sequence[str], tokenizer, max_length: int) -> list[list[int]]:
    """Token ids per document, truncated to `max_length` (documents that tokenise empty dropped)."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
    return [ids for ids in encoded if len(ids) > 0]


def chunk_documents(texts: Sequence[str], tokenizer, max_length: int, limit: int | None = None) -> list[list[int]]:
    """Concatenate-free chunking: each document split into pieces of at most `max_length` tokens."""
    chunks: list[list[int]] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        chunks.extend(ids[i:i + max_length] for i in range(0, len(ids), max_length) if len(ids[i:i + max_length]) > 1)
        if limit is not None and len(chunks) >= limit:
            return chunks[:limit]
    return chunks


def collate(sequences: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence in the batch; the mask marks real tokens."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, :len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask}


# What one more padded batch costs beside its padded tokens, in token positions: a pass's fixed cost per
# layer (kernel launches, Python). Small beside the padding it saves, so groups split readily.
GROUP_OVERHEAD_TOKENS = 16


def length_groups(lengths: Sequence[int], overhead: int = GROUP_OVERHEAD_TOKENS) -> list[list[int]]:
    """Indices of `lengths` split into groups that pad little: each group is padded to its own longest.

    A batch of fact sentences (15 tokens) and a few long documents (128) padded together computes
    mostly padding. Sorted by length, the best split into groups is contiguous, so a dynamic programme
    over the sorted order finds the split that minimises the padded positions plus `overhead` per group
    exactly. Sums over the tokens of all groups equal those of one padded batch (right padding and the
    attention mask keep every real token's outputs), up to the order of float sums. Deterministic: ties
    keep their index order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    n = len(order)
    best = [0.0] + [math.inf] * n  # best[j]: the cheapest split of the j shortest
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        width = lengths[order[j - 1]]
        for i in range(j):  # the last group is order[i:j], padded to the j-th shortest's length
            cost = best[i] + (j - i) * width + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def label_length_groups(batch: dict[str, torch.Tensor], lengths: Sequence[int]) -> dict[str, torch.Tensor]:
    """`batch` (collated from documents of `lengths`) with a `length_group` label per row where
    `length_groups` splits it, for losses that run one pass per group (`length_group_batches`); unchanged
    where one padded batch is best."""
    import torch

    groups = length_groups(lengths)
    if len(groups) > 1:
        label = torch.empty(len(lengths), dtype=torch.long)
        for index, rows in enumerate(groups):
            label[rows] = index
        batch["length_group"] = label
    return batch


def length_group_batches(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The groups a `length_group` label marks, each a batch cut to its own longest document (row-wise
    tensors such as `doc_ids` follow their rows); `[batch]` without the label."""
    label = batch.get("length_group")
    if label is None:
        return [batch]
    out = []
    for group in sorted(set(label.tolist())):
        rows = (label == group).nonzero().squeeze(1)
        width = int(batch["attention_mask"][rows].sum(dim=1).max())
        out.append({key: value[rows, :width] if value.dim() == 2 else value[rows]
                    for key, value in batch.items() if key != "length_group"})
    return out


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A deterministic permutation of 0..n-1 for one epoch, so a resumed run sees the same order."""
    import torch

    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def batch_indices(n: int, batch: int, step: int, seed: int, shuffle: bool = True) -> list[int]:
    """Indices of global batch `step`, walking epoch after epoch through shuffled data."""
    start = step * batch
    out: list[int] = []
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n)
        order = epoch_order(n, seed, epoch) if shuffle else list(range(n))
        out.extend(order[offset:offset + batch - len(out)])
    return out
