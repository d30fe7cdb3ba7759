"""LoRA adapters on the frozen LLM (model.llm.lora): injected after loading, only they and the Q-Former
side train, the base weights stay bit for bit, an untrained adapter changes nothing, adapter dropout
follows the trainer's mode, and merging them into the base weights gives the same logits; on OPT, LLaMA and
FlanT5, under the BLIP-2 and the InstructBLIP bridge."""
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


def _model(path, arch="stage2", **lora) -> Blip2LLM:
    cfg = tiny_model_config(arch=arch, llm=LLMConfig(path=str(path), dtype="fp32", lora=LoRAConfig(**lora)))
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


@pytest.mark.parametrize("kind, arch", [("opt", "stage2"), ("llama", "instruct"), ("t5", "stage2"), ("t5", "instruct")])
def test_untrained_adapter_is_the_identity_and_training_moves_only_adapters(tmp_path_factory, opt_dir, kind, arch):
    """On every LLM family (decoder-only and encoder-decoder) and both BLIP-2 and InstructBLIP bridges."""
    path = opt_dir if kind == "opt" else save_tiny_llm(kind, tmp_path_factory.mktemp("llm") / kind)
    plain, lora = _model(path, arch), _model(path, arch, r=4, alpha=8.0)
    assert lora.lora_modules
    lora_sd = {base_name(k): v for k, v in lora.state_dict().items() if not is_lora_key(k)}
    assert lora_sd.keys() == plain.state_dict().keys()
    lora.load_state_dict({**lora.state_dict(), **{k: v for k, v in plain.state_dict().items()
                                                  if not k.startswith("llm.")}})
    batch = make_batch(tiny_model_config(), decoder_only=kind != "t5", instruct=arch == "instruct")
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


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_merged_weights_give_the_same_logits(tmp_path_factory, opt_dir, kind):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    path = opt_dir if kind == "opt" else save_tiny_llm(kind, tmp_path_factory.mktemp("llm") / kind)
    cls = AutoModelForSeq2SeqLM if kind == "t5" else AutoModelForCausalLM
    model = _model(path, r=4, alpha=12.0)
    with torch.no_grad():  # a trained-looking adapter: B is zero at init
        for n, p in model.llm.named_parameters():
            if is_lora_key(n):
                p.normal_(0, 0.2)
    model.eval()
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, **({"decoder_input_ids": ids[:, :5]} if kind == "t5" else {})}
    ours = model.llm(**inputs).logits
    lora = {n: p.detach() for n, p in model.llm.named_parameters() if is_lora_key(n)}
    base = {base_name(n): t for n, t in model.llm.state_dict().items() if not is_lora_key(n)}
    merged = merge_lora_(base, lora, LoRAConfig(r=4, alpha=12.0))
    projections = ("q_proj.weight", "v_proj.weight") if kind == "opt" else (".q.weight", ".v.weight")
    assert len(merged) == len(lora) // 2 >= 4 and all(k.endswith(projections) for k in merged)
    hf = cls.from_pretrained(str(path), dtype=torch.float32)
    hf.load_state_dict(base)
    unmerged = cls.from_pretrained(str(path))(**inputs).logits
    assert not torch.allclose(hf(**inputs).logits, unmerged)  # the adapters matter
    torch.testing.assert_close(hf(**inputs).logits, ours, rtol=1e-5, atol=1e-5)
    # The same adapters in peft's own saved layout load into a plain model through transformers.
    state = peft_adapter_state(lora)
    assert all(k.startswith("base_model.model.model.decoder.layers." if kind == "opt" else "base_model.model.")
               for k in state)
