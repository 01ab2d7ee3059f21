"""configs/accelerate/*.yaml are valid for `accelerate launch --config_file`: parsed by Accelerate's own
loader and launch-argument validation, and mapped to the environment its launchers give the processes."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import ComputeEnvironment, DistributedType
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

from rlhf_cli.config.compose import compose_train_config
from rlhf_cli.engine.components import check_launch
from rlhf_cli.errors import ConfigError
from tests.cli.test_compose import uncommented_keys

ACCELERATE_DIR = Path(__file__).resolve().parents[2] / "configs" / "accelerate"

# file -> (distributed type, launcher flag `accelerate launch` derives from it)
EXPECTED = {
    "cpu_ddp": (DistributedType.MULTI_GPU, "multi_gpu"),
    "ddp": (DistributedType.MULTI_GPU, "multi_gpu"),
    "multi_node": (DistributedType.MULTI_GPU, "multi_gpu"),
    "fsdp": (DistributedType.FSDP, "use_fsdp"),
    "deepspeed_zero2": (DistributedType.DEEPSPEED, "use_deepspeed"),
}


def test_the_expected_files_exist():
    assert sorted(p.stem for p in ACCELERATE_DIR.glob("*.yaml")) == sorted(EXPECTED)


def _launch_args(name: str):
    """What `accelerate launch --config_file NAME.yaml -m rlhf_cli train` turns into after validation."""
    args = launch_command_parser().parse_args(["--config_file", str(ACCELERATE_DIR / f"{name}.yaml"), "-m", "rlhf_cli", "train"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


def _process_env(name: str) -> dict[str, str]:
    """The environment Accelerate's launcher gives each process for NAME.yaml."""
    args, defaults = _launch_args(name)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_parses_and_validates_the_file(name):
    config = load_config_from_file(str(ACCELERATE_DIR / f"{name}.yaml"))
    distributed_type, launcher_flag = EXPECTED[name]
    assert isinstance(config, ClusterConfig)
    assert config.compute_environment == ComputeEnvironment.LOCAL_MACHINE
    assert config.distributed_type == distributed_type
    assert config.num_processes >= 2 and config.num_machines >= 1 and config.mixed_precision == "no"
    args, _ = _launch_args(name)
    assert getattr(args, launcher_flag) is True
    assert args.num_processes == config.num_processes


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_field_has_a_comment_above_it(name):
    assert uncommented_keys(ACCELERATE_DIR / f"{name}.yaml") == []


def test_cpu_ddp_keeps_processes_on_the_cpu_with_one_thread_each():
    config = load_config_from_file(str(ACCELERATE_DIR / "cpu_ddp.yaml"))
    assert config.use_cpu is True and config.num_machines == 1
    assert _process_env("cpu_ddp")["OMP_NUM_THREADS"] == "1"


def test_multi_node_example_names_two_machines_and_a_main_address():
    config = load_config_from_file(str(ACCELERATE_DIR / "multi_node.yaml"))
    assert config.num_machines == 2 and config.machine_rank == 0
    assert config.main_process_ip and config.main_process_port
    assert config.num_processes % config.num_machines == 0


def test_fsdp_file_asks_for_fsdp2_with_full_state_dict():
    env = _process_env("fsdp")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT" and env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false"


def test_deepspeed_zero2_file_sets_its_zero_stage():
    env = _process_env("deepspeed_zero2")
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"


def _launch_env(patch, env: dict[str, str]) -> None:
    for key, value in env.items():
        if key.startswith(("ACCELERATE_DEEPSPEED", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "FSDP_")):
            patch.setenv(key, value)


def test_the_fsdp_file_passes_the_pre_load_check_and_turns_fsdp2_on(monkeypatch):
    from rlhf_cli.engine.components import settings_and_launch

    state = types.SimpleNamespace(num_processes=2, device=torch.device("cpu"))
    _launch_env(monkeypatch, _process_env("fsdp"))
    cfg = compose_train_config(["+recipe=smoke"])
    check_launch(cfg, state)
    settings, _ = settings_and_launch(cfg, num_processes=2, tracker_dir="/dev/null")
    assert settings.sharding == "fsdp2"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, r"FSDP version 1, which rlhf_cli does not run.*fsdp_version: 2"),
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, r"ZeRO-3, which rlhf_cli does not run.*FSDP2"),
    ],
)
def test_fsdp1_and_zero3_launches_are_refused_pointing_to_fsdp2(monkeypatch, env, expected):
    """Refused by the pre-load check (one paragraph, before any model loads), naming FSDP2 as the way."""
    state = types.SimpleNamespace(num_processes=2, device=torch.device("cpu"))
    _launch_env(monkeypatch, env)
    with pytest.raises(ConfigError, match=expected) as refusal:
        check_launch(compose_train_config(["+recipe=smoke"]), state)
    assert "\n" not in str(refusal.value)
