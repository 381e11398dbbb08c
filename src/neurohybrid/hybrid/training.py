"""A small, seeded training loop shared by every model family.

Cohorts here are small (tens of subjects, each a handful of arrays), so the loop is full-batch
by default (``batch_size=None``): one Adam step per epoch over every training item. Early stopping
uses a validation subset carved out of the TRAINING items only (the caller never passes test
subjects in), and restores the parameters of the best validation epoch.

Usage::

    result = train_loop(model.parameters(), lambda idx: loss_over(items[i] for i in idx),
                        n_items=len(items), epochs=200, lr=1e-2, val_fraction=0.2, patience=20)
    result.history      # training loss per epoch
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterable, Sequence

import numpy as np
import torch


@dataclasses.dataclass
class TrainResult:
    """What a training run did: loss per epoch, validation loss per epoch, best epoch, time."""

    history: list[float]
    val_history: list[float]
    best_epoch: int
    seconds: float
    train_indices: list[int]
    val_indices: list[int]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def split_validation(n_items: int, val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Seeded split of item indices 0..n_items-1 into (train, validation).

    At least one item stays in training; the validation set is empty when ``val_fraction`` is 0
    or there are fewer than 3 items (early stopping on one subject out of two is noise).
    """
    idx = list(range(n_items))
    if val_fraction <= 0 or n_items < 3:
        return idx, []
    n_val = min(n_items - 1, max(1, int(round(val_fraction * n_items))))
    perm = np.random.default_rng(seed).permutation(n_items).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def train_loop(
    parameters: Iterable[torch.nn.Parameter] | Iterable[dict] | torch.nn.Module,
    loss_fn: Callable[[Sequence[int]], torch.Tensor],
    n_items: int,
    *,
    epochs: int = 100,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
    batch_size: int | None = None,
    val_fraction: float = 0.0,
    patience: int | None = None,
    grad_clip: float | None = 10.0,
    seed: int = 0,
    time_limit_s: float | None = None,
) -> TrainResult:
    """Minimise ``loss_fn(indices)`` (mean loss over the given training items) with Adam.

    parameters: the tensors to train, a module (its parameters), or Adam parameter groups
        ([{"params": [...], "lr": ...}, ...]) e.g. a faster rate for per-subject physical parameters.
    val_fraction / patience: hold out that fraction of the items for validation; stop when the
        validation loss has not improved for ``patience`` epochs and restore the best parameters.
        Without validation, the parameters of the epoch with the lowest training loss are restored
        (a noisy last step never leaves the model worse than its best).
    grad_clip: clip the global gradient norm (stiff ODE rollouts occasionally spike).
    time_limit_s: stop after this wall time (the demo's budget guard), keeping the best so far.
    A non-finite loss stops training and restores the last finite-loss parameters.
    """
    groups = None
    if isinstance(parameters, torch.nn.Module):
        params = [p for p in parameters.parameters() if p.requires_grad]
    else:
        parameters = list(parameters)
        if parameters and isinstance(parameters[0], dict):
            groups = [dict(g, params=[p for p in g["params"] if p.requires_grad]) for g in parameters]
            params = [p for g in groups for p in g["params"]]
        else:
            params = [p for p in parameters if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameters require gradients")
    if n_items < 1:
        raise ValueError("no training items")
    train_idx, val_idx = split_validation(n_items, val_fraction, seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(groups if groups is not None else params, lr=lr, weight_decay=weight_decay)

    def snapshot():
        return [p.detach().clone() for p in params]

    def restore(state):
        with torch.no_grad():
            for p, s in zip(params, state):
                p.copy_(s)

    best_state, best_val, best_epoch = snapshot(), float("inf"), -1
    history: list[float] = []
    val_history: list[float] = []
    start = time.perf_counter()
    since_best = 0
    for epoch in range(int(epochs)):
        if batch_size is None or batch_size >= len(train_idx):
            batches = [train_idx]
        else:
            order = torch.randperm(len(train_idx), generator=gen).tolist()
            batches = [[train_idx[i] for i in order[k:k + batch_size]] for k in range(0, len(order), batch_size)]
        epoch_loss, seen = 0.0, 0
        diverged = False
        before = snapshot() if not val_idx else None  # the parameters this epoch's training loss belongs to
        for batch in batches:
            opt.zero_grad()
            loss = loss_fn(batch)
            if not torch.isfinite(loss):
                diverged = True
                break
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            epoch_loss += float(loss.detach()) * len(batch)
            seen += len(batch)
        if diverged:
            restore(best_state)
            break
        history.append(epoch_loss / max(seen, 1))
        if val_idx:
            with torch.no_grad():
                val = float(loss_fn(val_idx))
            val_history.append(val)
            score = val
        else:
            score = history[-1]
        if np.isfinite(score) and score < best_val:
            best_val, best_epoch, since_best = score, epoch, 0
            best_state = snapshot() if val_idx else before
        else:
            since_best += 1
        if patience is not None and val_idx and since_best >= patience:
            break
        if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
            break
    if best_epoch >= 0:
        restore(best_state)
    return TrainResult(history, val_history, best_epoch, time.perf_counter() - start, train_idx, val_idx)
