"""LoRA adapters on the frozen LLM (model.llm.lora): injected after loading, only they and the Q-Former
side train, the base weights stay bit for bit, an untrained adapter changes nothing, adapter dropout
follows the trainer's mode, and merging them into the base weights gives the same logits."""
from __future__ import annotations


import pytest
import torch

from blip_train.config.schema import LLMConfig, LoRAConfig
from blip_train.models.llm_bridge import Blip2LLM, load_llm
from blip_train.models.lora import base_name, is_lora_key, merge_lora_, peft_adapter_state
from tests.helpers.tiny import tiny_model_config
from tests.unit.test_llm_bridge import make_batch, save_tiny_llm


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory):
    return save_tiny_llm("opt", tmp_path_factory.mktemp("llm") / "opt")


def _model(path, **lora) -> Blip2LLM:
    cfg = tiny_model_config(arch="stage2", llm=LLMConfig(path=str(path), dtype="fp32", lora=LoRAConfig(**lora)))
    torch.manual_seed(0)
    return Blip2LLM(cfg, load_llm(cfg.llm, "cpu"), device_type="cpu")


@pytest.mark.parametrize("targets, adapted", [([], {"q_proj", "v_proj"}), (["k_proj", "fc1"], {"k_proj", "fc1"})])
def test_adapters_go_where_asked_and_only_they_train_in_the_llm(opt_dir, targets, adapted):
    model = _model(opt_dir, r=4, alpha=8.0, target_modules=targets)
    assert {n.rsplit(".", 1)[-1] for n in model.lora_modules} == adapted
    assert len(model.lora_modules) == 2 * 2  # 2 layers x 2 targets
    llm_trainable = [n for n, p in model.llm.named_parameters() if p.requires_grad]
    assert llm_trainable and all(is_lora_key(n) for n in llm_trainable)
    assert all(not p.requires_grad for n, p in model.llm.named_parameters() if not is_lora_key(n))


def test_untrained_adapter_is_the_identity_and_training_moves_only_adapters(opt_dir):
    plain, lora = _model(opt_dir), _model(opt_dir, r=4, alpha=8.0)
    lora_sd = {base_name(k): v for k, v in lora.state_dict().items() if not is_lora_key(k)}
    assert lora_sd.keys() == plain.state_dict().keys()
    lora.load_state_dict({**lora.state_dict(), **{k: v for k, v in plain.state_dict().items()
                                                  if not k.startswith("llm.")}})
    batch = make_batch(tiny_model_config(), decoder_only=True, instruct=False)
    plain.train(), lora.train()
    torch.testing.assert_close(lora(batch)["loss"], plain(batch)["loss"], rtol=0, atol=0)  # B = 0 at init

    base0 = {n: p.detach().clone() for n, p in lora.llm.named_parameters() if not p.requires_grad}
    adapters0 = {n: p.detach().clone() for n, p in lora.llm.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        lora(batch)["loss"].backward()
        opt.step()
    for n, p in lora.llm.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, adapters0[n]), n
        else:
            assert p.grad is None and torch.equal(p, base0[n]), n


def test_adapter_dropout_follows_the_mode_while_the_base_stays_eval(opt_dir):
    model = _model(opt_dir, r=4, alpha=8.0, dropout=0.1)
    drops = [d for m in model.llm.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)
             for d in m.lora_dropout.values()]
    assert drops and all(isinstance(d, torch.nn.Dropout) for d in drops)
    model.train()
    assert all(d.training for d in drops)
    assert not model.llm.training and not model.llm.model.decoder.layers[0].self_attn.training
    model.eval()
    assert not any(d.training for d in drops)


def test_merged_weights_give_the_same_logits(opt_dir):
    from transformers import AutoModelForCausalLM

    model = _model(opt_dir, r=4, alpha=12.0)
    with torch.no_grad():  # a trained-looking adapter: B is zero at init
        for n, p in model.llm.named_parameters():
            if is_lora_key(n):
                p.normal_(0, 0.2)
    model.eval()
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(1))
    ours = model.llm(input_ids=ids).logits
    lora = {n: p.detach() for n, p in model.llm.named_parameters() if is_lora_key(n)}
    base = {base_name(n): t for n, t in model.llm.state_dict().items() if not is_lora_key(n)}
    merged = merge_lora_(base, lora, LoRAConfig(r=4, alpha=12.0))
    assert len(merged) == 4 and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in merged)
    hf = AutoModelForCausalLM.from_pretrained(str(opt_dir), dtype=torch.float32)
    hf.load_state_dict(base)
    unmerged = AutoModelForCausalLM.from_pretrained(str(opt_dir))(input_ids=ids).logits
    assert not torch.allclose(hf(input_ids=ids).logits, unmerged)  # the adapters matter
    torch.testing.assert_close(hf(input_ids=ids).logits, ours, rtol=1e-5, atol=1e-5)
    # The same adapters in peft's own saved layout load into a plain model through transformers.
    state = peft_adapter_state(lora)
    assert all(k.startswith("base_model.model.model.decoder.layers.") for k in state)
