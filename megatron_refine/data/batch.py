"""The micro-batch every loader yields: the tokens, and what to train on in them.

The loader fills the fields from its layout and the data flags it was built with, so the trainer reads them
as they are whatever the layout (as torchtitan's `forward_backward_step` takes its batch):
- `loss_mask`: the labels the NTP loss counts (packed rows with data.eod_mask_loss: not after a document's EOS;
  document rows: not the padding), or the answer labels of refine-post's SFT step; None: every label.
- `update_mask`: prompt / answer rows: the prompt labels, which the update on the prompt (REFINE or NTP) trains
  on; None: the update trains on `loss_mask`.
- `branch_lengths` [B]: each row's labels REFINE may branch in (a prompt's, a padded document's); None: all.
- `cu_seqlens`: packed rows' document starts over the B * T flattened tokens, where the model restarts its
  fast-weight state (`models/packing.py`); None: each row is one sequence (its padding only trails it).
- `mean_over_step`: the NTP / SFT losses are token means over the whole step (every micro-batch and DP rank),
  so rows of unequal lengths weigh alike however they are split; the trainer then counts `update_tokens` and
  `loss_tokens` (`mean_loss`). Otherwise each micro-batch's own mean.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, T] inputs
    labels: torch.Tensor  # [B, T] the next tokens
    loss_mask: torch.Tensor | None = None  # [B, T]
    update_mask: torch.Tensor | None = None  # [B, T]
    branch_lengths: torch.Tensor | None = None  # [B]
    cu_seqlens: torch.Tensor | None = None  # [sequences + 1]
    mean_over_step: bool = False
    update_tokens: torch.Tensor | None = None  # [] the step's update labels / micro-batches (set by the trainer)
    loss_tokens: torch.Tensor | None = None  # [] the step's loss_mask labels / micro-batches (set by the trainer)

    @property
    def update_loss_mask(self) -> torch.Tensor | None:
        """The labels the update (NTP or REFINE's NTP term) trains on."""
        return self.loss_mask if self.update_mask is None else self.update_mask

    def piece(self, size: int, rank: int) -> "Batch":
        """Context parallelism: piece `rank` of `size` of every row (tokens, labels and masks cut along T, contiguous);
        the document starts stay the whole micro-batch's (the model cuts them: models/context_parallel.py)."""
        if size == 1:
            return self
        length = self.tokens.shape[1] // size
        cut = lambda t: None if t is None else t[:, rank * length:(rank + 1) * length]  # noqa: E731
        return replace(self, tokens=cut(self.tokens), labels=cut(self.labels), loss_mask=cut(self.loss_mask),
                       update_mask=cut(self.update_mask))

    def to(self, device: torch.device) -> "Batch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})
