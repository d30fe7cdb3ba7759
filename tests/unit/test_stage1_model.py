"""Blip2Stage1 on a tiny random config: losses, freezing, gradients, learning, inference helpers."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from blip_train.config.schema import ModelConfig
from blip_train.models.stage1 import Blip2Stage1
from blip_train.models.stage1_losses import itc_loss, itg_loss, itm_loss, sample_hard_negatives
from blip_train.models.world import WorldInfo
from tests.helpers.tiny import tiny_model_config as tiny_base_config
from tests.helpers.tiny import tiny_qformer_config, tiny_vision_config

B, T = 4, 7
CLS, SEP, PAD = 1, 2, 0


def tiny_model_config() -> ModelConfig:
    # fp16 frozen tower: exercises the bf16 fallback on CPU; Q-Former dropout 0 (deterministic).
    return tiny_base_config(max_txt_len=T, vision=tiny_vision_config(precision="fp16"),
                            qformer=tiny_qformer_config(dropout=0.0))


def make_batch(cfg: ModelConfig, seed: int = 0, text_len: int = T) -> dict[str, torch.Tensor]:
    """A collated stage-1 batch: [CLS] text [SEP], right-padded; [DEC] replaces [CLS] for ITG."""
    g = torch.Generator().manual_seed(seed)
    vocab = cfg.qformer.vocab_size
    dec = vocab - 1
    size = cfg.vision.image_size
    text_ids = torch.randint(3, vocab - 1, (B, text_len), generator=g)
    text_ids[:, 0] = CLS
    lengths = [text_len, text_len - 2, 3, text_len - 1]
    text_mask = torch.zeros(B, text_len, dtype=torch.long)
    for i, n in enumerate(lengths):
        text_ids[i, n - 1] = SEP
        text_ids[i, n:] = PAD
        text_mask[i, :n] = 1
    itg_input_ids = text_ids.clone()
    itg_input_ids[:, 0] = dec
    return {"pixel_values": torch.randn(B, 3, size, size, generator=g), "text_ids": text_ids,
            "text_mask": text_mask, "itg_input_ids": itg_input_ids,
            "itg_labels": itg_input_ids.masked_fill(text_mask == 0, -100),
            "image_ids": torch.tensor([5, 9, 5, 2])}


@pytest.fixture
def cfg() -> ModelConfig:
    return tiny_model_config()


@pytest.fixture
def model(cfg: ModelConfig) -> Blip2Stage1:
    torch.manual_seed(0)
    return Blip2Stage1(cfg)


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def test_forward_returns_finite_named_losses(model: Blip2Stage1, cfg: ModelConfig) -> None:
    out = model(make_batch(cfg))
    assert set(out) == {"loss", "loss_itc", "loss_itm", "loss_itg"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.values())
    torch.testing.assert_close(out["loss"], out["loss_itc"] + out["loss_itm"] + out["loss_itg"])


def test_shorter_text_than_max_len_and_multi_rank_world(model: Blip2Stage1, cfg: ModelConfig) -> None:
    # A 2-rank world faked by duplicating the local batch: global indices reach into rank 1's slice.
    model.world = WorldInfo(rank=1, size=2, gather=lambda x: torch.cat([x, x]).detach(),
                            gather_with_grad=lambda x: torch.cat([x, x]))
    out = model(make_batch(cfg, text_len=T - 2))
    assert all(torch.isfinite(v) for v in out.values())


def test_frozen_vit_gets_no_grad_and_stays_unchanged(model: Blip2Stage1, cfg: ModelConfig) -> None:
    vit = model.visual_encoder
    assert all(not p.requires_grad for p in vit.parameters())
    assert next(vit.parameters()).dtype == torch.bfloat16  # fp16 falls back to bf16 on CPU
    before = copy.deepcopy(vit.state_dict())
    model.train()
    assert not vit.training and model.qformer.training
    opt = torch.optim.AdamW(trainable(model), lr=1e-2)
    model(make_batch(cfg))["loss"].backward()
    opt.step()
    assert all(p.grad is None for p in vit.parameters())
    for name, tensor in vit.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_trainable_parameters_get_gradients(model: Blip2Stage1, cfg: ModelConfig) -> None:
    model.train()
    model(make_batch(cfg))["loss"].backward()
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not bool(p.grad.abs().sum() > 0))]
    assert missing == []
    assert model.temp.grad is not None and model.query_tokens.grad is not None


def test_adamw_steps_reduce_the_loss(cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    model = Blip2Stage1(cfg).train()
    batch = make_batch(cfg, seed=1)
    opt = torch.optim.AdamW(trainable(model), lr=2e-3)
    losses = []
    for _ in range(12):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_sub_losses_equal_the_pure_functions(model: Blip2Stage1, cfg: ModelConfig) -> None:
    """Recompute each loss from the model's own modules, step by step, and compare."""
    model.eval()  # no dropout, so the recomputation sees the same features
    batch = make_batch(cfg, seed=2)
    torch.manual_seed(7)
    out = model(batch)

    ids, mask, image_ids = batch["text_ids"], batch["text_mask"], batch["image_ids"]
    world = model.world
    with torch.no_grad():
        image_embeds = model.ln_vision(model.visual_encoder(batch["pixel_values"])).float()
        queries = model.query_tokens.expand(B, -1, -1)
        q_out = model.qformer(query_embeds=queries, image_embeds=image_embeds, use_cache=True)
        image_feats = F.normalize(model.vision_proj(q_out.last_hidden_state), dim=-1)
        text_hidden = model.qformer(input_ids=ids, attention_mask=mask).last_hidden_state
        text_feat = F.normalize(model.text_proj(text_hidden[:, 0]), dim=-1)
        itc = itc_loss(image_feats, text_feat, model.temp, world, image_ids=image_ids)
        torch.testing.assert_close(out["loss_itc"], itc.loss)

        torch.manual_seed(7)  # the model's first random draw is the negative sampling
        neg_img, neg_txt = sample_hard_negatives(itc.sim_i2t, itc.sim_t2i, world, image_ids=image_ids)
        rows = []
        for images, text_ids, text_mask in ((image_embeds, ids, mask),
                                            (image_embeds[neg_img], ids, mask),
                                            (image_embeds, ids[neg_txt], mask[neg_txt])):
            h = model.qformer(query_embeds=queries, input_ids=text_ids, attention_mask=text_mask,
                              image_embeds=images, mask="bidirectional").last_hidden_state
            rows.append(model.itm_head(h[:, :queries.shape[1]]).mean(1))
        torch.testing.assert_close(out["loss_itm"], itm_loss(torch.cat(rows)))

        h = model.qformer(input_ids=batch["itg_input_ids"], attention_mask=mask,
                          past_key_values=q_out.past_key_values, mask="causal").last_hidden_state
        logits = model.qformer.lm_logits(h[:, -T:])
        torch.testing.assert_close(out["loss_itg"], itg_loss(logits, batch["itg_labels"]))


def test_temperature_is_clamped_in_use(model: Blip2Stage1, cfg: ModelConfig) -> None:
    batch = make_batch(cfg)
    with torch.no_grad():
        model.temp.fill_(0.5)
    torch.manual_seed(0)
    at_bound = model(batch)["loss_itc"]
    with torch.no_grad():
        model.temp.fill_(3.0)
    torch.manual_seed(0)
    assert torch.equal(model(batch)["loss_itc"], at_bound)  # used as 0.5
    assert model.temp.item() == 3.0  # not edited in place: the trainer keeps it in range (see PARAMETER_BOUNDS)


def test_inference_helpers_shapes(model: Blip2Stage1, cfg: ModelConfig) -> None:
    model.eval()
    batch = make_batch(cfg)
    image_embeds, image_feats = model.encode_image(batch["pixel_values"])
    nq = cfg.qformer.num_query_tokens
    assert image_feats.shape == (B, nq, cfg.embed_dim)
    assert image_embeds.shape[:2] == (B, 1 + (cfg.vision.image_size // cfg.vision.patch_size) ** 2)
    text_feat = model.encode_text(batch["text_ids"], batch["text_mask"])
    assert text_feat.shape == (B, cfg.embed_dim)
    torch.testing.assert_close(text_feat.norm(dim=-1), torch.ones(B))
    scores = model.itm_scores(image_embeds, batch["text_ids"], batch["text_mask"])
    assert scores.shape == (B,) and torch.isfinite(scores).all()


@pytest.mark.parametrize("top_p,num_captions", [(None, 1), (0.9, 3)])
def test_generate_captions(model: Blip2Stage1, cfg: ModelConfig, top_p, num_captions: int) -> None:
    model.eval()
    dec = cfg.qformer.vocab_size - 1
    torch.manual_seed(0)
    ids = model.generate_captions(make_batch(cfg)["pixel_values"], bos_id=dec, sep_id=SEP, pad_id=PAD,
                                  max_len=6, top_p=top_p, num_captions=num_captions)
    assert ids.shape == (B * num_captions, 6) and ids.dtype == torch.long
    assert (ids[:, 0] == dec).all()
    for row in ids.tolist():  # after [SEP] only padding
        if SEP in row[1:]:
            end = row.index(SEP, 1)
            assert all(t == PAD for t in row[end + 1:])
    with pytest.raises(ValueError, match="num_beams"):
        model.generate_captions(make_batch(cfg)["pixel_values"], dec, SEP, PAD, max_len=4, num_beams=3)
