"""covfast ops: each a ``torch.library`` custom op (``covfast::<name>``) with a pure-torch reference in
:mod:`covfast.ops.reference` and faster C++ / CUDA / Triton backends chosen by :mod:`covfast._backend`."""

from covfast.ops.affinity import affinity
from covfast.ops.attention import reverse_attention, reverse_attention_concat
from covfast.ops.coach import coach_mask
from covfast.ops.infection import infection_ratio, infection_totals
from covfast.ops.roi import roi_align, roi_align_slots

__all__ = [
    "affinity",
    "coach_mask",
    "infection_ratio",
    "infection_totals",
    "reverse_attention",
    "reverse_attention_concat",
    "roi_align",
    "roi_align_slots",
]
