"""Robustness evaluation as a LightningModule: one ``test_step`` attacks one batch of the
class-balanced evaluation subset through ``rfd.attack``.

The defense is attached by the ``NoiseDefense`` callback (so this module is defense-agnostic), the
metrics are torchmetrics (so they sync across DDP ranks) and every attacked image is appended to a
per-rank JSONL file as soon as its batch finishes, which is what makes runs resumable and the final
table independent of interruptions. ``Trainer(inference_mode=False)`` is required: AAA optimizes
logits with autograd inside the forward.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from rfd.report import append_jsonl, read_jsonl

# Seeds are derived per batch from the first dataset index of the batch, so a resumed run attacks a
# batch with exactly the randomness an uninterrupted run would have used.
_SEED_STRIDE = 1_000_003


class IndexedMean(Metric):
    """Mean of per-sample values, counting each dataset index once across all ranks.

    DistributedSampler pads the last batch by repeating samples so that every rank gets the same
    number; a plain mean would count those twice. Keeping (index, value) pairs and de-duplicating
    at ``compute`` gives the mean over distinct images.
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("index", default=[], dist_reduce_fx="cat")
        self.add_state("value", default=[], dist_reduce_fx="cat")

    def update(self, value: torch.Tensor, index: torch.Tensor) -> None:
        self.index.append(index.detach().long().flatten())
        self.value.append(value.detach().float().flatten())

    def compute(self) -> torch.Tensor:
        if len(self.index) == 0:  # an empty list, before any update or sync
            return torch.tensor(float("nan"))
        idx, val = dim_zero_cat(self.index), dim_zero_cat(self.value)
        uniq, inverse = torch.unique(idx, return_inverse=True)
        order = torch.arange(len(idx), device=idx.device)
        first = torch.full((len(uniq),), len(idx), device=idx.device, dtype=torch.long)
        first = first.scatter_reduce(0, inverse, order, reduce="amin")
        return val[first].mean()


class RobustnessEvaluation(L.LightningModule):
    """Attack each test batch and record per-image outcomes.

    Args:
        model: the undefended classifier (``NoiseDefense`` swaps in the defended wrapper).
        attack: attack name (``rfd.attacks.ATTACKS``).
        norm: ``linf`` or ``l2``.
        eps: perturbation budget in [0, 1] pixel units (None: the data default).
        max_queries: charged-query budget per image (the largest of the requested budgets).
        criterion: ``vote``, ``single`` or ``none``.
        eot: forwards averaged per query (charged each).
        seed: base seed of the attack (and of the per-batch defense reseeding).
        attack_params: attack hyperparameter overrides.
        records_dir: folder of the per-rank JSONL files; ``None`` keeps nothing on disk.
        n_clean_passes: noisy passes for the defended clean accuracy.
    """

    def __init__(
        self,
        model: nn.Module,
        attack: str = "square",
        norm: str = "linf",
        eps: float | None = None,
        max_queries: int = 1000,
        criterion: str = "vote",
        eot: int = 1,
        seed: int = 0,
        attack_params: dict[str, Any] | None = None,
        records_dir: str | Path | None = None,
        n_clean_passes: int = 5,
    ) -> None:
        super().__init__()
        self.model = model
        self.attack, self.norm, self.eps = attack, norm, eps
        self.max_queries, self.criterion, self.eot, self.seed = max_queries, criterion, eot, seed
        self.attack_params = dict(attack_params or {})
        self.records_dir = Path(records_dir) if records_dir is not None else None
        self.n_clean_passes = n_clean_passes
        self.clean_acc = IndexedMean()
        self.defended_acc = IndexedMean()
        self.robust_acc = IndexedMean()
        self._done: set[int] = set()
        self.records: list[dict[str, Any]] = []

    def on_test_start(self) -> None:
        self._done = {int(r["index"]) for r in self.existing_records()}

    def existing_records(self) -> list[dict[str, Any]]:
        if self.records_dir is None:
            return []
        return [
            r for p in sorted(self.records_dir.glob("records.rank*.jsonl")) for r in read_jsonl(p)
        ]

    def test_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        from rfd.attacks import attack as run_attack

        x, y, index = batch[0], batch[1], batch[2]
        todo = torch.tensor([int(i) not in self._done for i in index.tolist()], device=x.device)
        if not bool(todo.any()):
            return  # finished in an earlier (interrupted) run
        key = int(index.min())
        defended = self.model
        base = getattr(defended, "base", defended)
        if hasattr(defended, "reseed"):
            defended.reseed(self.seed * _SEED_STRIDE + key)
        with torch.no_grad():
            clean = base(x).argmax(-1) == y
            reps = x.repeat(self.n_clean_passes, *([1] * (x.dim() - 1)))
            passes = defended(reps).argmax(-1).view(self.n_clean_passes, -1) == y
            defended_correct = passes.float().mean(0)
        t0 = time.perf_counter()
        res = run_attack(
            defended, x, y, attack=self.attack, norm=self.norm, eps=self.eps,
            max_queries=self.max_queries, criterion=self.criterion, eot=self.eot,
            seed=self.seed * _SEED_STRIDE + key, **self.attack_params,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        robust = res.clean_correct & ~res.success
        rows = [
            {
                "index": int(index[i]),
                "label": int(y[i]),
                "clean_correct": bool(clean[i]),
                "defended_correct": float(defended_correct[i]),
                "attack_clean_correct": bool(res.clean_correct[i]),
                "success": bool(res.success[i]),
                "queries": int(res.queries[i]),
                "verify_queries": int(res.verify_queries[i]),
                "fooled_at": int(res.fooled_at[i]),
                "seconds": seconds / len(y),
            }
            for i in range(len(y))
            if bool(todo[i])
        ]
        if self.records_dir is not None:
            append_jsonl(self.records_dir / f"records.rank{self.global_rank}.jsonl", rows)
        self.records.extend(rows)
        self._done.update(r["index"] for r in rows)
        self.clean_acc.update(clean.float(), index)
        self.defended_acc.update(defended_correct, index)
        self.robust_acc.update(robust.float(), index)
        self.log("clean_acc", self.clean_acc, on_step=False, on_epoch=True)
        self.log("defended_acc", self.defended_acc, on_step=False, on_epoch=True)
        self.log("robust_acc", self.robust_acc, prog_bar=True, on_step=False, on_epoch=True)
        self.log("queries", res.queries.float().mean(), prog_bar=True, on_step=True, on_epoch=False)
        self.log("images", float(len(self._done)), prog_bar=True, on_step=True, on_epoch=False)
