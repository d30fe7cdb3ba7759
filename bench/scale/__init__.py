"""`make scale`: every paper recipe at its true dimensions on this machine, 2 ranks, each at its own ZeRO stage
(ZeRO-3 for BLIP-2 / InstructBLIP and BLIP ViT-L, ZeRO-2 for BLIP ViT-B and ALBEF) — memory per rank against
the analytic minimum, load and step time, checkpoint bytes, and the tools at real size.

    python bench/scale.py                              # every recipe (hours on a 2-core CPU machine)
    python bench/scale.py --recipes blip2_stage1_vitg,blip2_stage2_opt2.7b
    python bench/scale.py --list                       # the recipes, their sizes and what fits here

Random towers are built from the real configurations (EVA ViT-g/L, timm ViT-B/16 and ViT-L/16, BERT-base, OPT,
FlanT5, Vicuna/LLaMA, with their real vocabularies) and saved in the formats real weights come in: the EVA state
dict as LAVIS ships it (fp16 .pth; ViT-L as safetensors), the ImageNet ViT/DeiT BLIP and ALBEF start from as timm
saves it (fp32 .pth, {"model": sd}, full qkv bias, classifier head), HF folders with safetensors shards and
tokenizer files. Each recipe then runs
unchanged except for what a CPU needs (run.device=cpu, micro-batch 2, its data replaced by a small synthetic
split, 2 steps): train and save, `tools/zero_to_safetensors.py`, resume for one more step, `tools/export_hf.py`
(not for model.arch blip | albef: it has no mapping for them yet, and the results say so).

Memory: each rank records its resident memory at every phase (run.memory_trace). The analytic minimum per
rank is what the recipe's ZeRO stage cannot avoid holding: under ZeRO-3, divided over the ranks, the frozen
towers in their dtype, and per trainable parameter its 16-bit weight and gradient, the fp32 master and
gradient, and Adam's two fp32 moments (20 bytes); under ZeRO-2 the 16-bit weights and the frozen parameters
are whole on every rank and the other 18 bytes divided. BLIP / ALBEF's momentum copies are frozen fp32
parameters (4 bytes each); buffers (their feature queue, 2 x embed_dim x queue_size fp32) are whole on every
rank. The target is a peak of at most 1.3 x (minimum + the process's baseline, its RSS once
torch, DeepSpeed and the process group are up, before any model is built).

A recipe whose full size cannot fit in this machine's memory at that target runs at its real width with as
many LLM layers as fit, and the table says so with the arithmetic. Prints a table and one JSON line; the raw
results go to OUT/results.json.
"""

__all__: list[str] = []
