"""Eq. (15) and the distillation term: Dice + cross-entropy through MONAI, the KL forms and the kd modes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_model import batch, prompts

from cotexnet.losses import CoTexNetLoss


@pytest.mark.parametrize("mode", ["san", "no_noise", "no_align", "mse"])
def test_distillation_modes(tiny_model, mode):
    model = tiny_model(kd_mode=mode, dropout=0.0).train()
    images, masks, labels = batch()
    out = model(images, masks, prompts(model))
    kd = CoTexNetLoss(model.config)(out, labels).distillation
    p, q = out.mixed.detach(), out.concept
    if mode == "no_noise":
        torch.testing.assert_close(out.mixed, torch.sigmoid(out.text_embeds))
    else:
        torch.testing.assert_close(out.mixed, torch.sigmoid(0.8 * out.text_embeds + 0.2 * out.concept))
    if mode == "no_align":
        assert kd.item() == 0.0
    elif mode == "mse":
        torch.testing.assert_close(kd, ((q - p) ** 2).mean())
    else:
        bernoulli = (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).sum(-1).mean()
        torch.testing.assert_close(kd, bernoulli, rtol=1e-4, atol=1e-5)
        assert kd.item() > 0


def test_softmax_kl_form_matches_the_authors_formula(tiny_model):
    model = tiny_model(kl_form="softmax", dropout=0.0).train()
    images, masks, labels = batch()
    out = model(images, masks, prompts(model))
    p = F.softmax(out.mixed_logits.detach(), -1)
    expected = (p * (p.log() - F.log_softmax(out.concept_logits, -1))).sum(-1).mean()
    torch.testing.assert_close(CoTexNetLoss(model.config)(out, labels).distillation, expected, rtol=1e-4, atol=1e-6)


def test_kd_weight_scales_the_distillation_term(tiny_model):
    model = tiny_model(kd_weight=10.0, dropout=0.0).train()
    images, masks, labels = batch()
    loss = CoTexNetLoss(model.config)(model(images, masks, prompts(model)), labels)
    torch.testing.assert_close(loss.total, loss.segmentation + 10.0 * loss.distillation)


def test_segmentation_loss_is_dice_plus_cross_entropy(tiny_model):
    from monai.losses import DiceLoss

    model = tiny_model().train()
    images, masks, labels = batch()
    out = model(images, masks, prompts(model))
    dice = DiceLoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    expected = dice(out.logits, labels.unsqueeze(1)) + F.cross_entropy(out.logits, labels)
    torch.testing.assert_close(CoTexNetLoss(model.config)(out, labels).segmentation, expected)
