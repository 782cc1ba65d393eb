"""The training objective, Eq. (15): Dice + cross-entropy on the masks, plus the distillation term.

The model returns a :class:`~cotexnet.model.CoTexNetOutput`; :class:`CoTexNetLoss` scores it. The
segmentation part is MONAI's ``DiceCELoss``: Dice over the whole batch per class (``batch=True``)
without the background channel, so a slice where a class is absent does not give the degenerate
0/0 Dice of per-image Dice; cross-entropy covers every channel including background. The config's
``dice_weight`` and ``ce_weight`` weight the two, ``kd_weight`` the distillation term.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import CoTexNetConfig
from .model import CoTexNetOutput


@dataclass
class LossTerms:
    total: torch.Tensor
    segmentation: torch.Tensor
    distillation: torch.Tensor


def distillation_loss(output: CoTexNetOutput, kd_mode: str, kl_form: str) -> torch.Tensor:
    """Align the image-only ``T_c`` (student) with ``T'`` (teacher, detached), per ``kd_mode``.

    ``san``/``no_noise``: KL(T' ‖ T_c) in ``kl_form`` — ``bernoulli``: Eq. (10) on the sigmoid outputs,
    each dimension a Bernoulli probability, summed over dimensions; ``softmax``: the authors' code,
    KL(softmax(T') ‖ softmax(T_c)) on the pre-sigmoid logits. ``mse``: mean squared error;
    ``no_align``: no term. Zero when the text module is off or for the CLIPSeg baseline.
    """
    zero = output.logits.new_zeros(())
    if output.mixed is None or kd_mode == "no_align":
        return zero
    teacher = output.mixed.detach().float()
    student = output.concept.float()
    if kd_mode == "mse":
        return F.mse_loss(student, teacher)
    if kl_form == "softmax":
        return F.kl_div(
            F.log_softmax(output.concept_logits.float(), dim=-1),
            F.log_softmax(output.mixed_logits.detach().float(), dim=-1),
            reduction="batchmean",
            log_target=True,
        )
    eps = 1e-6
    p = teacher.clamp(eps, 1 - eps)
    q = student.clamp(eps, 1 - eps)
    kl = p * (p.log() - q.log()) + (1 - p) * ((1 - p).log() - (1 - q).log())
    return kl.sum(dim=-1).mean()


class CoTexNetLoss(nn.Module):
    """Eq. (15) for one config: ``loss(output, labels)`` → :class:`LossTerms` (``total`` is what to backpropagate).

    ``labels``: (B, H, W) class indices, 0 = background.
    """

    def __init__(self, config: CoTexNetConfig):
        super().__init__()
        from monai.losses import DiceCELoss

        self.kd_mode, self.kl_form, self.kd_weight = config.kd_mode, config.kl_form, config.kd_weight
        self.segmentation = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True,
                                       lambda_dice=config.dice_weight, lambda_ce=config.ce_weight)

    def forward(self, output: CoTexNetOutput, labels: torch.Tensor) -> LossTerms:
        segmentation = self.segmentation(output.logits.float(), labels.long().unsqueeze(1))
        distillation = distillation_loss(output, self.kd_mode, self.kl_form)
        return LossTerms(total=segmentation + self.kd_weight * distillation, segmentation=segmentation,
                         distillation=distillation)
