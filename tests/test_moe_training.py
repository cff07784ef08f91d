"""MoE/AoE patches in rlkit's trainers: the auxiliary loss reaches the optimizer (pretraining lab, SFT and
GRPO through ``AuxLossMixin``), it is logged, gradient accumulation scales it like the main loss, a trained
MoE checkpoint loads back with its expert weights, and a pipeline stage can upcycle the dense model of the
stage before it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import yaml

from rlkit.methods.aux_loss import AuxLossMixin
from rlkit.models import build_tiny_model, load_model
from rlkit.patches import apply_patches, auxiliary_loss
from rlkit.recipe import ModelSpec, TinyModelSpec

from conftest import TINY_SHAPE

TEXT = "Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether. #### 72 "


def _pretrain_recipe(tmp_path, write_jsonl, patches, **trainer):
    rows = [{"question": f"{TEXT[i:]} {i}", "answer": TEXT[: 30 + i]} for i in range(40)]
    data = write_jsonl(rows, "text.jsonl")
    recipe = {
        "method": "pretrain", "seed": 0,
        "model": {"name": "tiny", "tiny": TINY_SHAPE, "patches": patches},
        "data": {"train": {"name": f"jsonl:{data}"}},
        "trainer": {"text_fields": ["question", "answer"], "seq_length": 32, "validation_split": 0.1,
                    "eval_context_lengths": [32], "eval_max_tokens": 256, "max_steps": 3, "save_strategy": "no",
                    "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8, "learning_rate": 1e-3,
                    "logging_steps": 1, "dataloader_num_workers": 0, **trainer},
    }
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


class _Base:
    """A stand-in for ``transformers.Trainer``: ``compute_loss`` returns a fixed main loss."""

    def __init__(self, scaled, ga=4):
        self.loss_is_scaled_for_ga = scaled
        self.current_gradient_accumulation_steps = ga
        self.accelerator = SimpleNamespace(unwrap_model=lambda m: m)
        self.logged = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        model(**inputs)
        loss = torch.tensor(1.0)
        return (loss, "outputs") if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        self.logged.append(logs)


class _Trainer(AuxLossMixin, _Base):
    pass


@pytest.mark.parametrize("name", ["aoe", "moe"])
def test_aux_loss_mixin_adds_coef_times_aux_and_scales_for_accumulation(char_tokenizer, name):
    model = build_tiny_model(TinyModelSpec(**TINY_SHAPE), char_tokenizer)
    apply_patches(model, [{"name": name, "num_experts": 4, "top_k": 2, "aux_loss_coef": 0.5}])
    model.train()
    inputs = {"input_ids": torch.randint(4, 90, (2, 16))}
    for scaled, divisor in ((False, 1), (True, 4)):
        trainer = _Trainer(scaled)
        loss = trainer.compute_loss(model, inputs)
        layers = [m for m in model.modules() if hasattr(m, "aux_loss_coef")]
        assert len(layers) == 2
        expected = sum(0.5 * m.aux_loss for m in layers) / divisor
        assert torch.allclose(loss, 1.0 + expected)
        assert loss.requires_grad  # the aux term carries the gradient to the experts' scores
        loss2, outputs = trainer.compute_loss(model, inputs, return_outputs=True)
        assert outputs == "outputs" and torch.allclose(loss2, loss)
        trainer.log({"loss": 1.0})
        assert trainer.logged[-1]["aux_loss"] == pytest.approx(float(sum(m.aux_loss.detach() for m in layers)) / 2, rel=1e-5)
    # evaluation: nothing added
    model.eval()
    assert float(_Trainer(False).compute_loss(model, inputs)) == 1.0


def test_aux_loss_mixin_is_a_no_op_without_moe_layers(char_tokenizer):
    model = build_tiny_model(TinyModelSpec(**TINY_SHAPE), char_tokenizer)
    model.train()
    trainer = _Trainer(False)
    assert float(trainer.compute_loss(model, {"input_ids": torch.randint(4, 90, (2, 8))})) == 1.0
    trainer.log({"loss": 1.0})
    assert "aux_loss" not in trainer.logged[-1]
    assert auxiliary_loss(model) == (None, None)


def test_trainers_use_the_mixin():
    from rlkit.methods.grpo import RLKitGRPOTrainer
    from rlkit.methods.pretrain import PretrainTrainer
    from rlkit.methods.sft import RLKitSFTTrainer

    for cls in (RLKitGRPOTrainer, PretrainTrainer, RLKitSFTTrainer):
        assert issubclass(cls, AuxLossMixin)
        assert cls.compute_loss is AuxLossMixin.compute_loss


def test_pretrain_aoe_with_aux_loss_trains_logs_and_reloads(tmp_path, write_jsonl, monkeypatch):
    """End to end through ``rlkit train``: the aux loss is logged every step, the experts' gate factors get
    trained, and the final checkpoint loads back (patches re-applied, expert weights from the file)."""
    from safetensors.torch import load_file

    from rlkit.cli import main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    patch = {"name": "aoe", "num_experts": 4, "top_k": 2, "d_low": 8, "aux_loss_coef": 0.05}
    recipe = _pretrain_recipe(tmp_path, write_jsonl, [patch])
    out = tmp_path / "aoe"
    assert main(["train", str(recipe), f"output_dir={out}"]) == 0
    history = json.loads((out / "log_history.json").read_text())
    aux = [h["aux_loss"] for h in history if "aux_loss" in h]
    assert len(aux) == 3 and all(1.0 <= a < 4.0 for a in aux)  # L_aux >= 1 (balanced) and <= n
    assert json.loads((out / "final" / "config.json").read_text())["rlkit_patches"] == [patch]
    saved = load_file(str(out / "final" / "model.safetensors"))
    assert "model.layers.0.mlp.w_down" in saved and "model.layers.0.mlp.gate_proj.weight" not in saved

    fresh = build_tiny_model(TinyModelSpec(**TINY_SHAPE), load_model(ModelSpec(name=str(out / "final")))[1])
    apply_patches(fresh, [patch])
    assert not torch.equal(fresh.model.layers[0].mlp.w_down, saved["model.layers.0.mlp.w_down"])  # trained

    model, tok = load_model(ModelSpec(name=str(out / "final")))
    for k, v in saved.items():
        assert torch.equal(model.state_dict()[k], v), k
    x = tok(["Natalia sold 48 clips"], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        a = model(**x).logits
        b = load_model(ModelSpec(name=str(out / "final")))[0].eval()(**x).logits
    assert torch.equal(a, b)


def test_pipeline_stage_upcycles_the_previous_dense_stage(tmp_path, write_jsonl, monkeypatch):
    """Stage 1 pretrains a dense model; stage 2 sets ``model.patches: [aoe upcycle]`` and starts from it:
    with no upcycling noise the upcycled model reproduces the dense model it starts from."""
    from rlkit.cli import main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = _pretrain_recipe(tmp_path, write_jsonl, [])
    recipe = yaml.safe_load(path.read_text())
    trainer = recipe.pop("trainer")
    up = {"name": "aoe", "num_experts": 2, "top_k": 2, "upcycle": True, "upcycle_noise": 0.0}
    recipe.pop("method")
    recipe["trainer"] = trainer
    recipe["stages"] = [{"name": "dense", "method": "pretrain"},
                        {"name": "upcycled", "method": "pretrain", "model": {"patches": [up]},
                         "trainer": {"max_steps": 1}}]
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "pipe"
    assert main(["train", str(path), f"output_dir={out}"]) == 0
    dense = json.loads((out / "dense" / "perplexity.json").read_text())
    assert json.loads((out / "upcycled" / "final" / "config.json").read_text())["rlkit_patches"] == [up]
    # the upcycled model starts equal to the dense one (checked on the dense checkpoint, patched as stage 2 does)
    d_model, tok = load_model(ModelSpec(name=str(out / "dense" / "final")))
    u_model, _ = load_model(ModelSpec(name=str(out / "dense" / "final"), patches=[up]))
    x = tok([TEXT], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(d_model.eval()(**x).logits, u_model.eval()(**x).logits, atol=1e-4)
    assert dense["eval_loss"] > 0
    u_trained, _ = load_model(ModelSpec(name=str(out / "upcycled" / "final")))
    assert isinstance(u_trained.model.layers[0].mlp, type(u_model.model.layers[0].mlp))


def test_sharded_moe_checkpoint_reloads_and_mismatched_options_fail(char_tokenizer, tmp_path):
    from rlkit.patches import load_patch_weights

    patch = {"name": "moe", "num_experts": 4, "top_k": 2}
    model = build_tiny_model(TinyModelSpec(**TINY_SHAPE), char_tokenizer, seed=3)
    apply_patches(model, [patch])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="100KB")
    char_tokenizer.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    loaded, _ = load_model(ModelSpec(name=str(tmp_path / "ckpt")))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # a model patched with other options cannot take these weights
    other = build_tiny_model(TinyModelSpec(**TINY_SHAPE), char_tokenizer)
    apply_patches(other, [{"name": "moe", "num_experts": 2, "top_k": 1}])
    names = [k for k in other.state_dict() if ".mlp." in k]
    with pytest.raises(ValueError, match="has shape"):
        load_patch_weights(other, str(tmp_path / "ckpt"), names)
