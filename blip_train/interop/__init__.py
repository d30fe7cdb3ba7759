"""Checkpoint interoperability: ZeRO -> safetensors, ours <-> transformers, LAVIS / EVA -> ours.

    consolidate.consolidate_checkpoint(run_or_tag, tag, include_frozen)   ZeRO-2/3 shards -> one state dict
    weights_io.write_weights / read_weights                               our weights on disk (single / sharded)
    hf_export.export_hf(source, out)                                      -> Blip2ForImageTextRetrieval /
                                                                             Blip2ForConditionalGeneration /
                                                                             InstructBlipForConditionalGeneration /
                                                                             Blip{ForImageTextRetrieval,
                                                                             ForConditionalGeneration,
                                                                             ForQuestionAnswering} (model.arch blip)
    hf_import.import_hf(hf_dir, out[, decoder])                           transformers folder -> weights folder
    lavis.import_lavis(pth, out) / lavis.import_eva_vit(pth, out)         LAVIS / BLIP authors' / EVA -> weights
                                                                          folder / ViT file
The name mapping itself lives in `blip_train.models.hf_names`; a weights folder is what
`model.init_from` loads (`blip_train.training.weights.read_init_weights`). Bad inputs raise
`InteropError` (a ValueError) with a one-line reason. Nothing here needs a GPU or a process group.
"""
from blip_train.interop.weights_io import InteropError, read_weights, write_weights

__all__ = ["InteropError", "read_weights", "write_weights"]
