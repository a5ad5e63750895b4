"""Ragged token lists to padded batches, the one way the trainer pads.

Left padding keeps every row's last real token in the last column, which is what a KV-cache decode loop needs
(the next token of every row is appended in the same column). Position ids are counted over real tokens only,
so a padded row sees the same positions as the unpadded sequence and its numbers do not depend on its
neighbours in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (input_ids (B, T), attention_mask (B, T)) with each sequence right-aligned."""
    if not sequences or any(len(seq) == 0 for seq in sequences):
        raise ValueError("every sequence needs at least one token")
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, width - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
        attention_mask[row, width - len(seq):] = 1
    return input_ids, attention_mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions (B, T) counting real tokens only; padding gets 0 (it is masked out anyway)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)
