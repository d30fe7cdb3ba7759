"""blip-train: DeepSpeed ZeRO-3 training of BLIP-2 (stage 1, stage 2) and InstructBLIP."""
__version__ = "0.1.0"
