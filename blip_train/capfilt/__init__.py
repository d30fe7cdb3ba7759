"""CapFilt: caption web images with a stage-1 model's ITG pass or a BLIP decoder, filter captions with ITM/ITC heads.

`run_capfilt` is the distributed, resumable driver (tools/capfilt.py is its CLI); `process_chunk` the
per-chunk algorithm; `build_report` / `format_report` the report. See README.md in this folder.
"""
from blip_train.capfilt.capfilt import (EXTRA_COLUMNS, Candidate, Captioner, CapFiltSettings, decode_captions,
                                        eval_pixels_at_sizes, output_row, passes, process_chunk, score_captions,
                                        select_captions)
from blip_train.capfilt.report import CapFiltStats, Histogram, build_report, format_report
from blip_train.capfilt.runner import REPORT_FILE, chunk_seed, merge_parts, prepare_output, run_capfilt

__all__ = ["EXTRA_COLUMNS", "Candidate", "Captioner", "CapFiltSettings", "decode_captions", "eval_pixels_at_sizes",
           "output_row", "passes", "process_chunk", "score_captions", "select_captions", "CapFiltStats", "Histogram",
           "build_report", "format_report",
           "REPORT_FILE", "chunk_seed", "merge_parts", "prepare_output", "run_capfilt"]
