"""Model and tokenizer loading (rlkit/models.py): tiny models, char tokenizer, save/load round trip,
LoRA config and user-facing errors. (Real-model SmolLM2 tests live with the slow suite.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rlkit.data.synthetic import SyntheticConfig, generate
from rlkit.models import ModelError, build_char_tokenizer, build_tiny_model, builtin_path, load_model, peft_config
from rlkit.recipe import LoraSpec, ModelSpec, TinyModelSpec


def synthetic_texts() -> list[str]:
    rows = generate(SyntheticConfig(num_train=20, num_test=20, ops="+-*"), "test", seed=0)
    return [f"Question: {r['question']}\nAnswer: {r['solution']}" for r in rows]


def test_char_tokenizer_round_trip(char_tokenizer):
    texts = synthetic_texts() + ["Mixed CASE, punctuation!? {braces} \\boxed{42} <think>x</think>  two  spaces\n"]
    for s in texts:
        ids = char_tokenizer(s, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(s)  # one token per character
        assert char_tokenizer.unk_token_id not in ids
        assert char_tokenizer.decode(ids) == s
    batch = char_tokenizer(texts[:3], padding=True, return_tensors="pt")
    assert char_tokenizer.padding_side == "left"
    decoded = char_tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert decoded == texts[:3]


def test_char_tokenizer_specials(char_tokenizer):
    assert (char_tokenizer.pad_token, char_tokenizer.bos_token, char_tokenizer.eos_token) == ("<pad>", "<s>", "</s>")
    assert len({char_tokenizer.pad_token_id, char_tokenizer.bos_token_id, char_tokenizer.eos_token_id,
                char_tokenizer.unk_token_id}) == 4
    assert char_tokenizer("é", add_special_tokens=False)["input_ids"] == [char_tokenizer.unk_token_id]


def test_tiny_model_shape_and_seed(tiny_spec, char_tokenizer):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    m0 = build_tiny_model(tiny_spec, char_tokenizer, seed=0)
    assert torch.equal(torch.rand(1), before), "building a tiny model must not consume the global RNG"
    cfg = m0.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 2)
    assert cfg.vocab_size == len(char_tokenizer)
    assert m0.generation_config.pad_token_id == char_tokenizer.pad_token_id
    assert m0.generation_config.eos_token_id == char_tokenizer.eos_token_id
    m0b = build_tiny_model(tiny_spec, char_tokenizer, seed=0)
    m1 = build_tiny_model(tiny_spec, char_tokenizer, seed=1)
    w = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(m0.state_dict()[w], m0b.state_dict()[w])
    assert not torch.equal(m0.state_dict()[w], m1.state_dict()[w])


def test_tiny_model_bad_shape(char_tokenizer):
    with pytest.raises(ModelError, match="divisible by num_attention_heads"):
        build_tiny_model(TinyModelSpec(hidden_size=66, num_attention_heads=4), char_tokenizer)
    with pytest.raises(ModelError, match="divisible by num_key_value_heads"):
        build_tiny_model(TinyModelSpec(hidden_size=64, num_attention_heads=4, num_key_value_heads=3), char_tokenizer)


def test_load_model_tiny(tiny_spec):
    model, tok = load_model(ModelSpec(name="tiny", tiny=tiny_spec), seed=0)
    assert model.config.hidden_size == 64 and tok.eos_token == "</s>"
    assert next(model.parameters()).dtype == torch.float32
    bf16, _ = load_model(ModelSpec(name="tiny", tiny=tiny_spec, dtype="bfloat16"), seed=0)
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_save_and_load_back_identical_logits(tiny_model, tmp_path):
    model, tok = tiny_model
    model.eval()
    out = tmp_path / "ckpt"
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    assert list(out.glob("*.safetensors")), "checkpoints must be safetensors"
    assert not list(out.glob("*.bin"))

    loaded, tok2 = load_model(ModelSpec(name=str(out)))
    loaded.eval()
    text = synthetic_texts()[0]
    enc = tok(text, return_tensors="pt")
    enc2 = tok2(text, return_tensors="pt")
    assert torch.equal(enc["input_ids"], enc2["input_ids"])
    assert tok2.decode(enc2["input_ids"][0], skip_special_tokens=True) == text
    with torch.no_grad():
        a = model(**enc).logits
        b = loaded(**enc2).logits
    assert torch.equal(a, b)
    assert loaded.generation_config.pad_token_id == tok2.pad_token_id


def test_lora_config():
    assert peft_config(ModelSpec(name="tiny")) is None
    from peft import LoraConfig

    cfg = peft_config(ModelSpec(name="tiny", lora=LoraSpec(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])))
    assert isinstance(cfg, LoraConfig)
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (4, 8, 0.0)
    assert set(cfg.target_modules) == {"q_proj", "v_proj"}
    assert str(cfg.task_type).endswith("CAUSAL_LM")


def test_lora_config_applies_to_tiny_model(tiny_model):
    from peft import get_peft_model

    model, _ = tiny_model
    n_before = sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, peft_config(ModelSpec(name="tiny", lora=LoraSpec(r=2, alpha=4))))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # all-linear: every projection of every layer gets an adapter
    assert any("q_proj.lora_A" in n for n in trainable) and any("down_proj.lora_B" in n for n in trainable)
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) < n_before / 10


def test_unknown_builtin_name():
    with pytest.raises(ModelError, match="unknown built-in model 'smollm9'"):
        builtin_path("smollm9")


def test_missing_model_path_is_model_error(tmp_path):
    with pytest.raises(ModelError):
        load_model(ModelSpec(name=str(tmp_path / "no-such-model")))


def test_bad_dtype():
    from rlkit.models import resolve_dtype

    assert resolve_dtype("auto") == "auto" and resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ModelError, match="model.dtype"):
        resolve_dtype("fp8")


def test_model_spec_is_a_dataclass_copyable(tiny_spec):
    # pipelines swap the model name for the previous stage's output with dataclasses.replace
    spec = ModelSpec(name="tiny", tiny=tiny_spec, patches=[{"name": "x"}])
    moved = dataclasses.replace(spec, name="/some/path", patches=[])
    assert moved.name == "/some/path" and moved.patches == [] and moved.tiny is tiny_spec


def test_sft_stage_trains_a_lora_adapter_and_saves_it_merged(tmp_path):
    """``model.lora`` reaches the SFT trainer (Auto-CEI's recipe trains r128/alpha64 adapters): only adapter weights
    train, and the final model is saved merged (no adapter files), with weights that moved."""
    import torch
    from pathlib import Path

    from safetensors.torch import load_file

    from rlkit.methods import get_method
    from rlkit.methods.base import RunContext
    from rlkit.models import load_model
    from rlkit.recipe import recipe_from_dict, resolve_runs

    raw = {"method": "sft", "seed": 0, "plot": False, "output_dir": str(tmp_path / "sft"),
           "model": {"name": "tiny", "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                     "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}},
           "data": {"train": {"name": "synthetic", "split": "train", "template": "plain", "limit": 16,
                              "synthetic": {"num_train": 16, "num_test": 4}}},
           "trainer": {"max_steps": 2, "learning_rate": 1e-2, "per_device_train_batch_size": 8, "save_strategy": "no",
                       "dataloader_num_workers": 0, "report_to": "none", "max_length": 64}}
    (run,) = resolve_runs(recipe_from_dict(raw))
    model, tok = load_model(run.model, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = RunContext(model=model, tokenizer=tok, final_dir=tmp_path / "sft" / "final")
    method = get_method("sft")
    trainer = method.build_trainer(run, ctx, method.make_config(run))
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    output = method.run(run, RunContext(model=load_model(run.model, seed=0)[0], tokenizer=tok,
                                        final_dir=tmp_path / "sft" / "final"))
    final = Path(output.model)
    assert not (final / "adapter_config.json").exists()
    saved = load_file(str(final / "model.safetensors"))
    moved = [k for k in before if k in saved and not torch.equal(before[k], saved[k])]
    assert moved and all("lora" not in k for k in saved)
