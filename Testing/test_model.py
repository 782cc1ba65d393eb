"""The CoTexNet model: every equation of docs/method.md, text layout, gradients, ablations, CLIPSeg parity.

The loss equations (Eq. 10, Eq. 15, the distillation modes) are in test_losses.py."""
from __future__ import annotations

import copy

import pytest
import torch

from cotexnet import CoTexNet, CoTexNetConfig
from cotexnet.losses import CoTexNetLoss
from cotexnet.model import pooled
from cotexnet.prompts import CONTEXT_LENGTH, compose_text_inputs

S = 64


def batch(n_classes=2, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, S, S, generator=g)
    labels = torch.randint(0, n_classes + 1, (b, S, S), generator=g)
    masks = torch.stack([(labels == c + 1).float() for c in range(n_classes)], dim=1)
    return images, masks, labels


def prompts(model, b=2):
    return model.encode_prompts(["one round small dark gm area, located in the center of the image."] * b)


# ------------------------------------------------------------------------------------ equations
def test_san_kd_parameters_start_at_paper_values(tiny_model):
    model = tiny_model()
    for name, value in (("alpha", 0.2), ("sigma", 1.0), ("mu", -0.002)):
        parameter = getattr(model, name)
        assert isinstance(parameter, torch.nn.Parameter) and parameter.requires_grad
        assert parameter.item() == pytest.approx(value)


def test_mixing_and_inverse_z_score_equations(tiny_model):
    """Eq. (9) T' = sigmoid((1-α)T_e + αT_c) and, without dropout, T̂ = T'·σ + μ."""
    model = tiny_model(dropout=0.0).train()
    with torch.no_grad():
        model.alpha.fill_(0.35), model.sigma.fill_(1.7), model.mu.fill_(-0.3)
    images, masks, _ = batch()
    out = model(images, masks, prompts(model))
    expected_concept = torch.sigmoid(model.concept_mapper(model.encode_image(images)[1]))
    torch.testing.assert_close(out.concept, expected_concept)
    torch.testing.assert_close(out.mixed, torch.sigmoid(0.65 * out.text_embeds + 0.35 * out.concept))
    torch.testing.assert_close(out.condition, out.mixed * 1.7 - 0.3)


def test_dropout_applies_in_training_only(tiny_model):
    """Eq. (11): Dropout_p(T'·σ + μ) in training — entries zeroed or scaled by 1/(1-p)."""
    model = tiny_model(dropout=0.5).train()
    images, masks, _ = batch()
    torch.manual_seed(3)
    out = model(images, masks, prompts(model))
    clean = out.mixed * model.sigma + model.mu
    dropped = out.condition == 0
    assert 0.3 < dropped.float().mean().item() < 0.7
    torch.testing.assert_close(out.condition[~dropped], clean[~dropped] / 0.5)
    model.eval()  # eval path: deterministic, no dropout (which would change logits by far more than 1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(images), model(images), rtol=0, atol=1e-6)


def test_eval_path_conditions_decoder_on_concept_times_sigma_plus_mu(tiny_model):
    """Test time: the FiLM input is exactly T̂_c = sigmoid(Map(C))·σ + μ."""
    model = tiny_model().eval()
    with torch.no_grad():
        model.sigma.fill_(1.3), model.mu.fill_(0.05)
    seen = []
    model.clipseg.decoder.film_mul.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    images, _, _ = batch()
    with torch.no_grad():
        model(images)
        expected = torch.sigmoid(model.concept_mapper(model.encode_image(images)[1])) * 1.3 + 0.05
    torch.testing.assert_close(seen[0], expected)


def test_gradients_reach_alpha_sigma_mu_mappers_and_decoder_but_not_encoders(tiny_model):
    model = tiny_model().train()
    images, masks, labels = batch()
    out = model(images, masks, prompts(model))
    CoTexNetLoss(model.config)(out, labels).total.backward()
    clip = model.clipseg.clip
    for name, module in (("vision", clip.vision_model), ("text", clip.text_model),
                         ("visual_projection", clip.visual_projection), ("text_projection", clip.text_projection)):
        assert all(p.grad is None for p in module.parameters()), name
    for name in ("alpha", "sigma", "mu"):
        assert getattr(model, name).grad is not None and getattr(model, name).grad.abs() > 0, name
    for name, module in (("pseudo_mapper", model.pseudo_mapper), ("concept_mapper", model.concept_mapper),
                         ("decoder", model.clipseg.decoder)):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, name


def test_eval_forward_never_runs_the_text_encoder(tiny_model):
    model = tiny_model()
    calls = []
    model.clipseg.clip.text_model.encoder.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
    images, masks, _ = batch()
    model.eval()
    with torch.no_grad():
        logits = model(images)
    assert logits.shape == (2, 3, S, S) and calls == []
    model.train()
    model(images, masks, prompts(model))
    assert calls == [1]


# ------------------------------------------------------------------------------- text layout
@pytest.mark.parametrize("n", [1, 3])
def test_pseudo_tokens_sit_right_after_the_template_with_position_embeddings(tiny_model, n):
    model = tiny_model(classes=[f"c{i}" for i in range(n)])
    template = model.template_ids.tolist()
    assert template == model.tokenizer("segmentation area of", add_special_tokens=False)["input_ids"]
    real = prompts(model, b=1)
    inputs = model.text_inputs(real, 1)
    ids = inputs.input_ids[0].tolist()
    assert ids[0] == model.prompts.sos_id and ids[1 : 1 + len(template)] == template
    assert inputs.pseudo_positions.tolist() == list(range(1 + len(template), 1 + len(template) + n))
    assert ids[1 + len(template) + n : -1] == real[0] and ids[-1] == model.prompts.eos_id
    assert inputs.eos_index.tolist() == [len(ids) - 1]

    pseudo = torch.randn(1, n, model.clipseg.config.text_config.hidden_size)
    seen = []
    embeddings = model.clipseg.clip.text_model.embeddings
    embeddings.register_forward_hook(lambda m, args, kwargs, out: seen.append((kwargs["inputs_embeds"], out)),
                                     with_kwargs=True)
    model.encode_text(inputs, pseudo)
    tokens, summed = seen[0]
    positions = inputs.pseudo_positions
    torch.testing.assert_close(tokens[0, positions], pseudo[0])
    torch.testing.assert_close(summed[0, positions], pseudo[0] + embeddings.position_embedding.weight[positions])


def test_truncation_cuts_real_text_never_the_pseudo_prompt():
    template, n = [100, 101, 102], 3
    long_real = [[7] * 200, [8] * 5]
    inputs = compose_text_inputs(template, n, long_real, sos_id=1, eos_id=2, pad_id=0)
    assert inputs.input_ids.shape == (2, CONTEXT_LENGTH)
    first = inputs.input_ids[0].tolist()
    assert first[:4] == [1, 100, 101, 102] and first[4:7] == [0, 0, 0]
    assert first[7:-1] == [7] * (CONTEXT_LENGTH - 8) and first[-1] == 2
    assert inputs.eos_index.tolist() == [CONTEXT_LENGTH - 1, 7 + 5]
    assert inputs.input_ids[1, 13:].eq(0).all()  # padding after the short row's EOS


def test_pooling_at_eos_equals_stock_text_features_when_nothing_is_injected(tiny_model):
    """Rows of different lengths, padded: our EOS pooling equals CLIPSeg's own input_ids path."""
    model = tiny_model(use_pseudo_text=False)
    real = model.encode_prompts(["a small round lesion", "two large irregular bright areas in the left"])
    inputs = model.text_inputs(real, 2)
    ours = model.encode_text(inputs, None)
    stock = torch.cat([pooled(model.clipseg.clip.get_text_features(inputs.input_ids[i : i + 1, : inputs.eos_index[i] + 1]))
                       for i in range(2)])
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)


def test_offline_tokenizer_reproduces_clip_token_ids(tiny_model):
    tokenizer = tiny_model().tokenizer
    assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tokenizer) == 49408


# ------------------------------------------------------------------------------------ ablations
def test_real_text_switch_changes_text_input_and_embedding(tiny_model):
    torch.manual_seed(0)
    with_text = tiny_model(dropout=0.0).train()
    without = tiny_model(dropout=0.0, use_real_text=False).train()
    without.load_state_dict(with_text.state_dict())
    images, masks, _ = batch()
    ids = prompts(with_text)
    assert without.text_inputs(ids, 2).input_ids.shape[1] == 1 + len(without.template_ids) + 2 + 1
    assert not torch.allclose(with_text(images, masks, ids).text_embeds, without(images, masks, ids).text_embeds)


def test_pseudo_text_switch_removes_template_and_roi_branch(tiny_model):
    model = tiny_model(use_pseudo_text=False).train()
    images, masks, labels = batch()
    ids = prompts(model)
    inputs = model.text_inputs(ids, 2)
    assert inputs.input_ids[0].tolist() == [model.prompts.sos_id, *ids[0], model.prompts.eos_id]
    CoTexNetLoss(model.config)(model(images, masks, ids), labels).total.backward()
    assert all(p.grad is None for p in model.pseudo_mapper.parameters())


def test_text_encoder_switch_projects_pseudo_tokens_directly(tiny_model):
    model = tiny_model(use_text_encoder=False, use_real_text=False).train()
    calls = []
    model.clipseg.clip.text_model.encoder.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
    images, masks, _ = batch()
    out = model(images, masks, None)
    rois = images.unsqueeze(1) * masks.unsqueeze(2)
    roi_embeds = model.encode_image(rois.flatten(0, 1), need_activations=False)[1]
    expected = model.clipseg.clip.text_projection(model.pseudo_mapper(roi_embeds).view(2, 2, -1).mean(1))
    assert calls == []
    torch.testing.assert_close(out.text_embeds, expected)


def test_text_module_switch_trains_image_only(tiny_model):
    model = tiny_model(use_text_module=False, dropout=0.0).train()
    images, masks, labels = batch()
    out = model(images, masks, prompts(model))
    assert out.text_embeds is None and out.mixed is None
    torch.testing.assert_close(out.condition, out.concept * model.sigma + model.mu)
    assert CoTexNetLoss(model.config)(out, labels).distillation.item() == 0.0


# --------------------------------------------------------------------------- CLIPSeg parity
def stock_and_ours(config_fields):
    from cotexnet.bundle import build_clipseg, clipseg_architecture
    from cotexnet.prompts import load_tokenizer, offline_clip_tokenizer_dir

    stock = build_clipseg(clipseg_architecture("tiny", S), seed=5)
    ours = CoTexNet(CoTexNetConfig(classes=["lesion"], backbone="tiny", image_size=S, **config_fields),
                    backbone=copy.deepcopy(stock), tokenizer=load_tokenizer(offline_clip_tokenizer_dir()))
    return stock, ours.eval()


def test_decoder_matches_transformers_clipseg_with_same_condition():
    stock, ours = stock_and_ours({})
    images = batch(1)[0]
    condition = torch.randn(2, stock.config.projection_dim)
    with torch.no_grad():
        expected = stock(pixel_values=ours.normalize(images), conditional_embeddings=condition).logits
        logits = ours.decode(ours.encode_image(images)[0], condition)
    assert logits.shape == (2, 2, S, S)
    torch.testing.assert_close(logits[:, 1], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[:, 0], -expected, rtol=1e-4, atol=1e-4)


def test_cls_only_last_layer_matches_full_encoder():
    stock, ours = stock_and_ours({})
    images = batch(1)[0]
    with torch.no_grad():
        expected = pooled(stock.clip.get_image_features(ours.normalize(images)))
        torch.testing.assert_close(ours.encode_image(images)[1], expected, rtol=1e-4, atol=1e-5)


def test_clipseg_variant_is_stock_clipseg_with_fixed_prompt():
    stock, ours = stock_and_ours({"variant": "clipseg"})
    images = batch(1)[0]
    ids = torch.tensor([ours.prompts.full_ids("a photo of something")] * 2)
    with torch.no_grad():
        expected = stock(input_ids=ids, pixel_values=ours.normalize(images)).logits
        torch.testing.assert_close(ours(images)[:, 1], expected, rtol=1e-4, atol=1e-4)


def test_eager_attention_equals_sdpa_in_every_encoder():
    """``attention: eager`` (explicit softmax(QK^T)V, causal mask in the text encoder) and SDPA are one function."""
    stock, sdpa = stock_and_ours({})
    _, eager = stock_and_ours({"attention": "eager"})
    eager.load_state_dict(sdpa.state_dict())  # the mappers are drawn at construction
    images = batch(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(eager(images), sdpa(images), rtol=1e-4, atol=1e-4)  # float32 summation order
        ids = prompts(sdpa)
        inputs = sdpa.text_inputs(ids, 2)
        pseudo = torch.randn(2, 1, stock.config.text_config.hidden_size)
        torch.testing.assert_close(eager.encode_text(inputs, pseudo), sdpa.encode_text(inputs, pseudo), rtol=1e-4, atol=1e-5)
