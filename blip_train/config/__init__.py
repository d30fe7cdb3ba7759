"""Typed experiment config: schema (dataclasses), YAML loading, overrides, validation."""
from .loading import (ConfigError, check_output_dir, config_from_dict, config_to_dict, load_config, resolve_recipe,
                      save_resolved_config)
from .validate import (EVAL_TASK_ARCHS, blip_task_refusal, check_input_paths, config_warnings, eval_task,
                       validate_config)
from .schema import (DataConfig, DeepSpeedConfig, EvalConfig, ExperimentConfig, LLMConfig, LoRAConfig,
                     ModelConfig, OptimConfig, QFormerConfig, RunConfig, StreamConfig, TextConfig, TrainConfig,
                     VisionConfig)

__all__ = [
    "EVAL_TASK_ARCHS", "ConfigError", "blip_task_refusal", "check_input_paths", "check_output_dir", "config_from_dict",
    "config_to_dict", "config_warnings", "eval_task", "load_config",
    "resolve_recipe", "save_resolved_config",
    "validate_config", "DataConfig", "DeepSpeedConfig", "EvalConfig", "ExperimentConfig", "LLMConfig", "LoRAConfig",
    "ModelConfig", "OptimConfig", "QFormerConfig", "RunConfig", "StreamConfig", "TextConfig", "TrainConfig",
    "VisionConfig",
]
