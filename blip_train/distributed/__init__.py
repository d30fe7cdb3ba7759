"""Launcher environment → ranks, process group, ZeRO helpers, preemption flag.

Importing this package does not import deepspeed; the functions that need it import it when called.
"""
from blip_train.distributed.env import DistEnv, DistEnvError, discover_environment, export_environment
from blip_train.distributed.preemption import PreemptionHandler
from blip_train.distributed.process_group import (all_reduce_max_bool, all_reduce_mean, barrier, destroy_distributed,
                                           get_rank, get_world_size, init_distributed, is_main_process, print0)
from blip_train.distributed.world import build_world_info
from blip_train.distributed.zero import full_numel, gathered, is_zero3_param, maybe_zero_init

__all__ = ["DistEnv", "DistEnvError", "discover_environment", "export_environment", "PreemptionHandler",
           "all_reduce_max_bool", "all_reduce_mean", "barrier", "destroy_distributed", "get_rank", "get_world_size",
           "init_distributed", "is_main_process", "print0", "build_world_info", "full_numel", "gathered",
           "is_zero3_param", "maybe_zero_init"]
