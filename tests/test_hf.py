"""Hugging Face parity with the real transformers classes, offline."""
import json
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file
from transformers import ModernBertConfig, ModernBertDecoderConfig, ModernBertDecoderForCausalLM, ModernBertForMaskedLM

from ettin import hf
from ettin.config import load_config
from ettin.parallel import full_state_dict, init_process_groups

# several shapes: (overrides) on top of the tiny experiment
SHAPES = {
    "tiny": [],
    "wide": ["model.hidden_size=96", "model.num_heads=3", "model.intermediate_size=160", "model.num_layers=5"],
    "window32_global2": ["model.num_layers=5", "model.global_every=2", "model.window_left=16", "model.window_right=16"],
}


@pytest.fixture(scope="module", autouse=True)
def process_group():
    init_process_groups(1)


def perturbed_state(cfg, seed=0):
    """A random model whose norms and biases are off their init too, so a wrong mapping shows."""
    torch.manual_seed(seed)
    state = full_state_dict(cfg.model.build())
    g = torch.Generator().manual_seed(seed + 1)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()}


def config_for(shape, objective):
    overrides = list(SHAPES[shape])
    if objective == "clm":
        overrides = [o.replace("model.window_left=16", "model.window_left=15").replace("model.window_right=16", "model.window_right=0")
                     for o in overrides]
    # transformers 4.57's decoder ignores local_rope_theta (see the last tests): equal thetas for decoders
    return load_config("tiny", [f"objective={objective}", "model.local_rope_theta=5000" if objective == "mlm" else
                                "model.global_rope_theta=20000", "model.local_rope_theta=20000", *overrides])


def runs_in_subprocess(*args):
    return subprocess.run([sys.executable, "-m", "ettin.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_exported_weights_give_our_logits_in_transformers(tmp_path, shape, objective):
    cfg = config_for(shape, objective)
    hf.export(cfg.model, perturbed_state(cfg), tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["architectures"] == [hf.DECODER if objective == "clm" else hf.ENCODER]
    assert written["layer_types"] == hf.layer_types(cfg.model)
    result = hf.compare_with_transformers(tmp_path, lengths=(1, 7, 64, 129, 300))
    assert result["finite"]
    assert result["max_abs_logit"] > 0.5  # the comparison is not between near-zero numbers
    assert result["max_abs_diff"] < 1e-4, result


def test_transformers_loads_the_export_with_its_own_classes(tmp_path):
    cfg = config_for("tiny", "mlm")
    hf.export(cfg.model, perturbed_state(cfg), tmp_path)
    model = ModernBertForMaskedLM.from_pretrained(tmp_path)  # no custom code, no hub
    assert model.config.local_attention == 128 and model.config.global_attn_every_n_layers == 3
    assert model.decoder.weight.data_ptr() == model.model.embeddings.tok_embeddings.weight.data_ptr()  # tied


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_import_export_round_trip_is_exact(tmp_path, objective):
    cfg = config_for("wide", objective)
    state = perturbed_state(cfg)
    hf.export(cfg.model, state, tmp_path / "a")
    cfg2, state2 = hf.load_hf(tmp_path / "a")
    assert cfg2 == cfg.model.__class__(**{**cfg.model.__dict__, "attn_out_dropout": cfg2.attn_out_dropout,
                                          "mask_token_id": cfg2.mask_token_id})
    assert state2.keys() == state.keys() and all(torch.equal(state2[k], state[k]) for k in state)
    hf.export(cfg2, state2, tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_a_transformers_initialized_model_imports_with_the_same_logits(tmp_path, objective):
    torch.manual_seed(3)
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=80, num_hidden_layers=4, num_attention_heads=2,
                  max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                  sep_token_id=2, local_attention=32, global_rope_theta=30000.0, initializer_range=0.1)
    if objective == "mlm":
        model = ModernBertForMaskedLM(ModernBertConfig(**common, local_rope_theta=7000.0))
    else:
        model = ModernBertDecoderForCausalLM(ModernBertDecoderConfig(**common, local_rope_theta=30000.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    result = hf.compare_with_transformers(tmp_path, lengths=(3, 40, 200))
    assert result["finite"] and result["max_abs_diff"] < 1e-4, result


def test_cli_export_import_check(tmp_path):
    exported, imported, again = tmp_path / "hf", tmp_path / "ours", tmp_path / "hf2"
    proc = runs_in_subprocess("hf", "export", "--config", "tiny", "--init-seed", "5", "--out", str(exported), "objective=clm")
    assert proc.returncode == 0, proc.stderr
    assert "ModernBertDecoderForCausalLM" in proc.stdout
    assert runs_in_subprocess("hf", "import", str(exported), "--out", str(imported)).returncode == 0
    assert runs_in_subprocess("hf", "export", "--checkpoint", str(imported), "--out", str(again)).returncode == 0
    a, b = load_file(exported / "model.safetensors"), load_file(again / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    check = runs_in_subprocess("hf", "check", str(again))
    assert check.returncode == 0 and "-> OK" in check.stdout, check.stdout + check.stderr


def test_check_fails_on_non_finite_logits(tmp_path):
    cfg = config_for("tiny", "mlm")
    state = perturbed_state(cfg)
    state["layers.2.wo.weight"][0, 0] = float("nan")
    hf.export(cfg.model, state, tmp_path)
    proc = runs_in_subprocess("hf", "check", str(tmp_path))
    assert proc.returncode == 1 and "NON-FINITE" in proc.stdout and "MISMATCH" in proc.stdout


def test_check_measures_the_decoder_local_theta_gap_of_this_transformers(tmp_path):
    """Ettin's small decoders decay with local theta 10k and global 160k. transformers 4.57 gives
    the decoder's local layers the global theta; the export warns and `hf check` shows the gap."""
    cfg = load_config("tiny", ["objective=clm", "model.global_rope_theta=160000", "model.local_rope_theta=10000"])
    honoured = hf._decoder_honours_local_theta()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf.export(cfg.model, perturbed_state(cfg), tmp_path)
    assert any("local_rope_theta" in str(w.message) for w in caught) != honoured
    proc = runs_in_subprocess("hf", "check", str(tmp_path))
    assert (proc.returncode == 0) == honoured, proc.stdout


def test_bad_inputs_are_one_line_errors(tmp_path):
    proc = runs_in_subprocess("hf", "check", str(tmp_path / "missing"))
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    proc = runs_in_subprocess("hf", "export", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "exactly one of --checkpoint PATH or --config EXPERIMENT" in proc.stderr
    proc = runs_in_subprocess("hf", "export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "is not an ettin model folder" in proc.stderr
    proc = runs_in_subprocess("hf", "export", "--config", "tiny", "--tokenizer", str(tmp_path / "nope.json"),
                              "--out", str(tmp_path / "y"))
    assert proc.returncode == 2 and "tokenizer file" in proc.stderr
