"""The experiment config: one typed tree, defaults live only here.

Every field carries a docstring-style comment (meaning, unit). YAML recipes set values; `--set a.b=c`
overrides are parsed to the field's type (see `loading.py`); `validate_config` (validate.py) refuses impossible
combinations before any process group exists. Adding a field is a reviewed change: the key snapshot
test (`tests/unit/test_config.py`) lists every key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Union


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    """Directory for checkpoints, logs, TensorBoard events and the resolved config."""
    seed: int = 42
    """Base seed: model initialisation (the same on every rank); each rank then derives its own stream from
    (seed, rank) for dropout and ITM negative sampling. Data order and augmentation use data.shuffle_seed."""
    device: str = "auto"
    """auto | cpu | cuda. auto picks cuda when available. fp16 and flash-attn need cuda."""
    tensorboard: bool = True
    """Write TensorBoard events under output_dir/tb on rank 0."""
    wandb: bool = False
    """Also log every scalar to Weights & Biases from rank 0 (needs `pip install -e '.[wandb]'`; the W&B run
    id is kept in output_dir/wandb_id so a resumed run continues the same W&B run; WANDB_MODE=offline logs
    without network)."""
    wandb_project: str = "blip-train"
    """W&B project of the run (its name is the output directory's name)."""
    memory_trace: bool = False
    """Record each rank's resident host memory at every phase (start, model built, engine built, each
    micro-batch's data/forward/backward/step, checkpoint saved) in output_dir/memory/rank<r>.jsonl
    (bench/scale.py reads it)."""


@dataclass
class VisionConfig:
    """EVA/CLIP ViT, frozen unless `frozen: false` (fine-tuning). Defaults are EVA ViT-g/14 as BLIP-2 uses it
    (39 of 40 blocks, no final norm)."""
    image_size: int = 224
    """Input resolution in pixels (position embeddings are interpolated if weights were trained at another)."""
    patch_size: int = 14
    width: int = 1408
    """Token width of the ViT (1408 ViT-g, 1024 ViT-L)."""
    layers: int = 40
    """Blocks in the pretrained tower."""
    drop_last_block: bool = True
    """BLIP-2 uses the second-to-last block's output: build layers-1 blocks."""
    final_norm: bool = False
    """The timm/BLIP ViT's final LayerNorm over all tokens (BLIP, ALBEF); BLIP-2 has none."""
    heads: int = 16
    mlp_dim: int = 6144
    layer_norm_eps: float = 1e-6
    weights: str = ""
    """Pretrained weights (safetensors / .pth, our names or EVA names). Empty: random init (tests only)."""
    frozen: bool = True
    """Freeze the tower (requires_grad False, permanently in eval mode). false: the tower trains with the
    Q-Former (BLIP-2 fine-tuning): partitioned by ZeRO like any trainable module, computed in
    deepspeed.precision with fp32 masters in the optimizer (model.vision.precision does not apply)."""
    precision: str = "fp16"
    """Dtype of the frozen tower: fp16 | bf16 | fp32. fp16 falls back to bf16 where fp16 is unavailable (CPU).
    Kept under the engine, whatever deepspeed.precision says."""
    grad_checkpointing: bool = False
    """Recompute block activations in backward (only matters when the tower trains)."""
    drop_path_rate: float = 0.0
    """Stochastic depth of a training tower, in [0, 1): block i of the n built drops its residual branches
    with probability drop_path_rate * i / (n - 1) per sample (EVA/BEiT); none in eval mode."""


@dataclass
class QFormerConfig:
    """BERT-base style Q-Former with cross-attention to image features every `cross_attention_freq` layers."""
    hidden_size: int = 768
    layers: int = 12
    heads: int = 12
    intermediate_size: int = 3072
    vocab_size: int = 30523
    """bert-base-uncased's 30522 plus the [DEC] token."""
    max_position_embeddings: int = 512
    cross_attention_freq: int = 2
    """Cross-attention in layers 0, f, 2f, ..."""
    num_query_tokens: int = 32
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    """Hidden and attention-probability dropout."""
    bert_init: str = ""
    """Local bert-base-uncased HF folder to initialise from (query FFN copied from text FFN). Empty: random."""
    tokenizer: str = ""
    """Local BERT tokenizer folder (the Q-Former tokenizer, with [DEC] added)."""
    grad_checkpointing: bool = False


@dataclass
class TextConfig:
    """The BERT-base text transformer of BLIP (MED: text encoder, image-grounded encoder and decoder) and ALBEF
    (6 text + 6 fusion layers). Defaults are BLIP's `med_config.json`."""
    hidden_size: int = 768
    layers: int = 12
    heads: int = 12
    intermediate_size: int = 3072
    vocab_size: int = 30524
    """bert-base-uncased's 30522 plus [DEC] and [ENC] (BLIP; ALBEF needs only 30522)."""
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    """Hidden and attention-probability dropout (BLIP's med_config.json and ALBEF's config_bert.json: 0.1;
    transformers' BlipTextConfig defaults to 0.0)."""
    fusion_layer: int = 0
    """Cross-attention to the image in layers >= fusion_layer. BLIP: 0 (every layer); ALBEF: 6 (layers below
    it form the text encoder, the rest the fusion encoder)."""
    decoder: bool = True
    """Build the decoder's own causal self-attention in every layer (BLIP's MED); ALBEF has no decoder."""
    tokenizer: str = ""
    """Local BERT tokenizer folder (bert-base-uncased, with [DEC] and [ENC] added for BLIP)."""
    bert_init: str = ""
    """Local HF BERT folder to initialise from (the decoder self-attention copied from the encoder's; cross-
    attention random). Empty: random."""
    grad_checkpointing: bool = False
    """Recompute each layer's activations in backward."""
    prompt: str = ""
    """BLIP captioning (model.objective=caption): text the decoder reads before every caption, in training
    (not a target) and in generation (not part of the output). BLIP's COCO captioner: "a picture of "."""


@dataclass
class LoRAConfig:
    """LoRA adapters (peft) injected into the frozen LLM after its weights are loaded."""
    r: int = 0
    """Rank of each adapter; 0 turns LoRA off."""
    alpha: float = 16.0
    """Scaling numerator: the adapter's update is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter's input (training only)."""
    target_modules: List[str] = field(default_factory=list)
    """Names (last component) of the Linear layers that get adapters, e.g. [q_proj, v_proj]. Empty: the
    attention query and value projections, peft's choice for OPT (q_proj, v_proj), LLaMA (q_proj, v_proj)
    and T5 (q, v)."""


@dataclass
class LLMConfig:
    """The frozen language model of stage 2 / InstructBLIP."""
    path: str = ""
    """Local HF folder (AutoModelForCausalLM or AutoModelForSeq2SeqLM) with its tokenizer."""
    dtype: str = "bf16"
    """Frozen LLM dtype: bf16 | fp16 | fp32 (fp16 overflows in T5; GPU only). Kept under the engine,
    whatever deepspeed.precision says."""
    prompt: str = ""
    """Text prompt for stage 2 (e.g. 'a photo of'); loss is never taken on it. With model.qformer_text_input
    the question template instead, '{}' standing for the question (e.g. 'Question: {} Short answer:')."""
    max_txt_len: int = 32
    """Maximum target text tokens (stage 2) / answer tokens (InstructBLIP output, paper 256)."""
    max_prompt_len: int = 128
    """Maximum instruction tokens (InstructBLIP)."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """Low-rank adapters on the otherwise frozen LLM (peft), trained with the Q-Former; off while lora.r is 0."""


@dataclass
class AudioConfig:
    """The frozen audio encoder of model.modality=audio (X-InstructBLIP's audio branch). It runs in model.llm.dtype:
    under ZeRO-3 transformers partitions both as they load, in one dtype."""
    encoder: str = ""
    """Local HF folder of a transformers audio spectrogram transformer (ASTModel: config.json, its weights, and
    optionally preprocessor_config.json for the filterbank's normalisation). Its config's num_mel_bins and
    max_length are the filterbank's bins and the frames of one segment."""
    segments: int = 2
    """Segments a clip is cut into, each encoded on its own and read by the Q-Former like a video frame, their
    queries concatenated in time order (X-InstructBLIP: 2 segments of 512 frames, 5.12 s each)."""


@dataclass
class PointsConfig:
    """The frozen point-cloud encoder of model.modality=3d (X-InstructBLIP's 3D branch: ULIP-2's Point-BERT). It runs
    in model.llm.dtype."""
    encoder: str = ""
    """Local folder of a Point-BERT tower (config.json + model.safetensors: tools/import_ulip2_pointbert.py writes
    one from a ULIP-2 checkpoint). Its in_channels (3: xyz, 6: xyz + rgb) must match the split's clouds."""
    num_points: int = 8192
    """Points of each stored cloud the encoder reads (ULIP-2 / X-InstructBLIP: 8,192). Clouds are stored in
    farthest-point order (tools/convert_point_clouds.py), so their first N points are themselves a farthest point
    sample: a run may read fewer than were stored."""


@dataclass
class MomentumConfig:
    """ALBEF / BLIP momentum distillation: an exponential moving average of the image and text encoders and
    their ITC projections, and a queue of its features as extra ITC negatives (model.arch blip | albef)."""
    decay: float = 0.995
    """EMA factor per optimizer step: momentum = decay * momentum + (1 - decay) * online (both papers)."""
    queue_size: int = 57600
    """ITC feature queue entries (BLIP 57,600; ALBEF 65,536); a multiple of the global batch."""
    alpha: float = 0.4
    """Weight of the momentum model's soft targets in ITC (and ALBEF's MLM): targets = alpha * soft + (1 - alpha)
    * hard (both papers 0.4)."""
    alpha_ramp_steps: int = 0
    """Steps over which alpha rises linearly from 0 (the papers ramp over the first epoch: set the steps of one
    epoch); 0 uses alpha from the first step."""


OBJECTIVES = {"blip": ("pretrain", "retrieval", "caption", "vqa"), "albef": ("pretrain", "retrieval")}
"""model.objective by model.arch (the BLIP-2 archs have their objectives in the arch itself)."""


@dataclass
class ModelConfig:
    arch: str = "stage1"
    """stage1 | stage2 | instruct (BLIP-2 / InstructBLIP) | blip | albef (ViT and BERT trained end to end, with
    momentum encoders: model.text, model.momentum)."""
    qformer_text_input: bool = False
    """stage2: the sample's question also enters the Q-Former, after the queries and attending with them,
    through InstructBLIP's instruction path (BLIP-2's VQA fine-tuning). Training rows are then questions with
    answers (VQA splits); model.llm.prompt is the question template ("Question: {} Answer:") given to both
    the Q-Former and the LLM, and the loss is on the answer. model.arch=instruct always does this."""
    video_frames: int = 0
    """stage2 | instruct on video (0: images): frames per sample, read from a video split's stored frames
    (tools/convert_video_qa.py; every row must hold this many). Each frame goes through the ViT and the Q-Former
    on its own; a learned embedding of the frame's position is added to its query outputs, and the frames'
    queries, concatenated in time order, are the LLM's soft prompt (InstructBLIP's video QA: 4 frames)."""
    modality: str = "image"
    """image (images, or video with model.video_frames) | audio (model.audio: a frozen audio encoder in the ViT's
    place; stage2 | instruct) | 3d (model.points: a frozen point-cloud encoder in its place; stage2 | instruct).
    X-InstructBLIP trains one Q-Former and projection per modality against the same frozen LLM: a run trains one
    modality."""
    modality_prefix: str = ""
    """Text put before the soft prompt in the LLM's input, so the LLM knows what the query tokens stand for
    (X-InstructBLIP's cue: "audio: ", "video: ", "3d: ", "image: "); "" (BLIP-2, InstructBLIP): none. Never a target."""
    attention: str = "auto"
    """auto | flash | sdpa | math. auto: flash-attn when importable on CUDA in fp16/bf16, else SDPA."""
    embed_dim: int = 256
    """ITC projection width (stage 1)."""
    max_txt_len: int = 32
    """Maximum Q-Former text tokens (stage 1 captions; InstructBLIP instructions; questions with
    model.qformer_text_input)."""
    init_from: str = ""
    """Checkpoint to initialise trainable parts from (our ZeRO checkpoint dir or consolidated safetensors)."""
    objective: str = "pretrain"
    """model.arch blip | albef: pretrain (ITC + ITM + LM / MLM) | retrieval (ITC + ITM with every caption of the
    same image a positive, in the batch and the queue: BLIP's COCO / Flickr30K fine-tuning) | caption (BLIP: the
    decoder's LM loss after model.text.prompt, no momentum model: BLIP's COCO captioner) | vqa (BLIP: the
    image-grounded encoder reads the question, a second, untied MED decodes each human answer from its states, the
    answers' LM losses weighted by their share of the annotators; no momentum model: BLIP's VQAv2 model). Parts an
    objective does not use stay in the model, frozen, so every run keeps one layout for init_from, export and
    evaluation."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    text: TextConfig = field(default_factory=TextConfig)
    """The MED / ALBEF text transformer (model.arch blip | albef)."""
    llm: LLMConfig = field(default_factory=LLMConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    points: PointsConfig = field(default_factory=PointsConfig)
    momentum: MomentumConfig = field(default_factory=MomentumConfig)


@dataclass
class StreamConfig:
    """One MDS stream of a data mixture."""
    local: str = ""
    """Local directory of the MDS split (or the cache directory when `remote` is set)."""
    remote: str = ""
    """Remote location (s3://, gs://, ...) to stream from; empty when the data is local."""
    proportion: float = 0.0
    """Share of the mixture; 0 means: derived from `data.balance`."""
    name: str = ""
    """Name for logs; defaults to the directory name."""


@dataclass
class DataConfig:
    train: List[StreamConfig] = field(default_factory=list)
    """Training streams (a mixture when more than one)."""
    val: str = ""
    """Held-out MDS split used by evaluation."""
    balance: str = "size"
    """How streams without a proportion are weighted: size | sqrt (InstructBLIP) | uniform."""
    image_size: int = 224
    crop_scale_min: float = 0.5
    """RandomResizedCrop lower scale bound (upper bound 1.0)."""
    hflip: bool = True
    """Random horizontal flip in training (turn off when captions mention left/right)."""
    num_workers: Union[int, str] = "auto"
    """DataLoader workers per rank, or auto: the CPUs this rank has (affinity, SLURM_CPUS_PER_TASK, shared by
    the node's ranks unless srun gave each its own) less one, at most 16."""
    decode: str = "cpu"
    """Where training JPEGs are decoded: cpu (DataLoader workers, libjpeg-turbo, DCT-scaled to the crop) | gpu
    (nvJPEG on the training device, whole batches, crops resized there; needs CUDA and a torchvision with
    nvJPEG). Crop boxes and flips are drawn in the workers either way, from the same per-sample seeds."""
    shuffle_seed: int = 9176
    num_canonical_nodes: int = 1
    """Nodes that streaming partitions and shuffles each epoch for, whatever number of nodes runs the job: the
    global sample order is then the same on any layout (1 node x 8 ranks reads what 2 nodes x 4 ranks read), and a
    resume on another node count continues the same order. Streaming's own default, the number of physical nodes,
    ties the order to the layout of the first run. Every node count the run is started on must divide it or be a
    multiple of it (checked at start; 1 fits any). A larger value, a multiple of the largest node count (e.g. 64),
    lets each node fetch a narrower range of remote shards, but gives another order. Saved with the data position:
    a resumed run keeps the value it started with."""
    cache_dir: str = ""
    """Per-job local cache root for remote streams (never share between jobs). Empty: the system temp dir.
    The job's cache is `<cache_dir>/job-<SLURM_JOB_ID or run id>/<stream name>`."""
    cache_limit: str = ""
    """Most bytes the job's remote-stream cache may hold on a node, e.g. "200gb" or 2000000000 (kb/mb/gb/tb
    count 1024s, as streaming reads them). Least recently used shards are evicted and downloaded again
    when read. Empty: no limit. Leave room for what the node's readers have in flight: each rank's workers
    read 8 x micro_batch_size samples ahead, possibly each from another shard; below that streaming evicts
    shards before they are read and can stall. Streaming counts a shard only once it is downloaded, so
    downloads running together can overshoot the limit by one shard each beyond the first (up to 2 per
    data-loader worker of each local rank): set it that many shards below the disk's free space. Only
    with every data.train stream remote: streaming would
    evict (delete) the shards of a local one."""
    keep_cache: bool = False
    """Keep the job's remote-stream cache when training ends. By default it is removed when the run
    finishes or stops for preemption (a requeued job may land on another node; it downloads again)."""


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """Peak learning rate."""
    min_lr: float = 0.0
    """Floor of the cosine schedule."""
    warmup_steps: int = 2000
    warmup_start_lr: float = 0.0
    weight_decay: float = 0.05
    """Applied to weights; never to biases, norms, query tokens or the temperature."""
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    grad_clip: float = 0.0
    """Global gradient-norm clip; 0 disables it (LAVIS clips nothing)."""
    fused: str = "auto"
    """auto | on | off: torch's fused AdamW (one kernel over all tensors, no full-size temporaries). auto: on
    CUDA only; on: also on a CPU (bench/scale.py uses it to see the GPU's step memory)."""
    schedule: str = "cosine"
    """After warmup: cosine (from lr to min_lr at train.max_steps) | step (lr x decay_rate^(k) in the k-th block
    of decay_steps steps after warmup, floored at min_lr: BLIP's per-epoch decay, with decay_steps = one epoch)."""
    decay_rate: float = 0.85
    """schedule=step: the factor per block of decay_steps (BLIP pretraining 0.85)."""
    decay_steps: int = 0
    """schedule=step: steps per decay (an epoch's steps in BLIP); required > 0 for schedule=step."""
    layer_decay: float = 1.0
    """Layer-wise lr decay of a training ViT, in (0, 1]: of L built blocks, block i (0-based) gets
    lr x layer_decay^(L - i), the patch/position embeddings and CLS token lr x layer_decay^(L + 1);
    everything else (Q-Former, ln_vision, heads, query tokens, adapters) the plain lr. 1: off."""


@dataclass
class TrainConfig:
    max_steps: int = 1000
    """Optimizer steps to train for."""
    micro_batch_size: int = 8
    """Samples per rank per forward."""
    grad_accum_steps: int = 1
    global_batch_size: int = 0
    """If set, asserted equal to micro_batch_size x grad_accum_steps x world size."""
    log_interval: int = 10
    """Steps between console/TensorBoard logs (metrics reduced across ranks only then)."""
    save_interval: int = 1000
    """Steps between checkpoints."""
    keep_last: int = 3
    """Checkpoints to keep (older ones are deleted unless kept by keep_every)."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this (0: none)."""
    max_bad_steps: int = 5
    """Abort after this many consecutive non-finite losses (each one is skipped)."""


@dataclass
class EvalConfig:
    interval: int = 0
    """Steps between in-training evaluations (0: none)."""
    task: str = "auto"
    """In-training task: auto (stage1 retrieval, stage2 caption, instruct vqa) | retrieval | caption | vqa.
    InstructBLIP validated on a captions-only split (COCO) needs caption."""
    k_test: int = 128
    """Retrieval: candidates re-ranked with ITM. BLIP VQA with eval.answer_list: candidate answers (the most likely
    first tokens) scored in full."""
    answer_list: str = ""
    """BLIP VQA (model.objective=vqa): a JSON list of candidate answers (VQAv2: the 3,128 most frequent training
    answers; tools/answer_list.py writes one from a split). Set: each question takes the candidate its decoder
    scores most likely (BLIP's ranking inference); empty: the answer is generated (eval.num_beams,
    eval.vqa_max_new_tokens)."""
    batch_size: int = 32
    max_samples: int = 0
    """Cap on evaluated samples (0: all)."""
    num_beams: int = 5
    """Beam width of caption and VQA generation (BLIP-2 and InstructBLIP: 5)."""
    max_new_tokens: int = 30
    """Captioning: most generated tokens (BLIP-2 COCO: 30; InstructBLIP: 256)."""
    min_new_tokens: int = 1
    """Captioning: fewest generated tokens (BLIP-2 COCO: 8)."""
    length_penalty: float = 1.0
    """Captioning: beam-score length exponent (score = sum log p / length**length_penalty; HF's default 1)."""
    vqa_prompt: str = ""
    """VQA question template, '{}' standing for the question. Empty: the run's own (model.llm.prompt of a
    model.qformer_text_input run; InstructBLIP's eval template), else BLIP-2's: 'Question: {} Answer:' for
    decoder-only LLMs (the paper's Table 8), 'Question: {} Short answer:' for FlanT5 (LAVIS's FlanT5 VQA)."""
    vqa_max_new_tokens: int = 10
    """VQA: most generated answer tokens (BLIP-2 / InstructBLIP: 10)."""
    vqa_length_penalty: float = -1.0
    """VQA: beam-score length exponent; 0 or below favours short answers (LAVIS answers with -1 for BLIP-2
    FlanT5 and InstructBLIP, 0 for BLIP-2 OPT)."""


@dataclass
class DeepSpeedConfig:
    config: str = "zero3_bf16"
    """Template in ds_configs/ (name without .json) or a path to a DeepSpeed JSON."""
    zero_stage: int = 3
    """0 | 1 | 2 | 3, overrides the template."""
    precision: str = "bf16"
    """bf16 | fp16 | fp32: dtype of the trainable part (fp32 masters in the optimizer; fp16: GPU only).
    Frozen towers keep model.vision.precision / model.llm.dtype."""
    offload_frozen: bool = False
    """ZeRO-3 parameter offload to deepspeed.offload_device. DeepSpeed offloads every partition (trainable
    ones too), which mostly matters for the large frozen towers; GPU memory then holds only gathered
    working copies. An offload template (zero3_offload, zero3_offload_nvme) turns it on by itself."""
    offload_device: str = "cpu"
    """cpu | nvme: where offloaded parameter partitions live, for offload_frozen and for a template's own
    offload_param (which must agree). nvme: DeepSpeed swaps them to files under deepspeed.nvme_path through
    its async-I/O op, which needs libaio (checked before any work); ZeRO-3 only. Without offload, nvme is
    refused (it would do nothing). With nvme the frozen towers share one pool of at least 16 swap buffers and
    parameters are fetched on use (stage3_prefetch_bucket_size 0: DeepSpeed's NVMe prefetch fails on a
    parameter read twice per forward)."""
    nvme_path: str = ""
    """Directory on a node-local NVMe drive for offload_device=nvme (DeepSpeed's swap files go there)."""
    param_persistence_threshold: int = -1
    """stage3_param_persistence_threshold; -1 keeps DeepSpeed's default, 0 partitions everything."""
    max_live_parameters: int = -1
    """ZeRO-3 stage3_max_live_parameters: most gathered (whole) parameters a rank keeps at once before it
    releases some; -1 keeps the template's value. Bounds the working copies on top of the partitions."""
    max_reuse_distance: int = -1
    """ZeRO-3 stage3_max_reuse_distance: a gathered parameter needed again within this many parameters is
    kept instead of released and fetched again; -1 keeps the template's value. Large values keep whole
    towers gathered between steps (1e9: all of ViT-g), small ones re-fetch (more communication)."""
    prefetch_bucket_size: int = -1
    """ZeRO-3 stage3_prefetch_bucket_size: parameters fetched ahead of use; -1 keeps the template's value."""
    zero_init: bool = True
    """ZeRO-3: build the frozen towers straight into partitions in their own dtype — the HF LLM through
    HfDeepSpeedConfig (zero.Init as transformers loads it), the ViT under zero.Init with its weights copied in
    block by block — so neither a 13B LLM nor a fp32 ViT-g ever exists whole on a rank. The trainable
    Q-Former is built whole on each rank (188M) and partitioned when the engine is built."""
    timeout_minutes: int = 30
    """Collective timeout."""


@dataclass
class ExperimentConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
