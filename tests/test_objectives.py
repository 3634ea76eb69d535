"""The objectives' labels (MLM, MNTP, CLM), the cross phase's default, the embedding row without
lookup gradient, and a tiny decoder that learns to end its documents through transformers."""

import numpy as np
import pytest
import torch

from ettin import hf
from ettin.config import ConfigError, load_config
from ettin.data.collate import Collator
from ettin.model import EMBEDDING_PADDING_IDX, IGNORE
from ettin.parallel import full_state_dict, init_process_groups

PAD, CLS, SEP, MASK = 0, 1, 2, 3
X = IGNORE  # short, so that label lists read as tables


@pytest.fixture(scope="module", autouse=True)
def process_group():
    init_process_groups(1)


def collator(objective, seed=21, vocab=512, **kw):
    return Collator(objective, seed, vocab, cls_id=CLS, sep_id=SEP, pad_id=PAD, mask_id=MASK, **kw)


# ----------------------------------------------------------------------------- MNTP labels


def test_mntp_label_shift_by_hand():
    """Every ordinary token masked (rate ~1, always [MASK]): MLM labels each masked token where it
    stands, MNTP one position earlier; a masked first token (no [CLS]) loses its label rather
    than lend it to the document before."""
    docs = [np.array([CLS, 10, 11, 12, SEP]), np.array([CLS, 20, 21, SEP]), np.array([30, 31, SEP])]
    everything = dict(mask_rate=1 - 1e-9, mask_token_prob=1.0, random_token_prob=0.0)
    mlm, mntp = collator("mlm", **everything)(docs, [4, 5, 6]), collator("mntp", **everything)(docs, [4, 5, 6])
    masked = [CLS, MASK, MASK, MASK, SEP, CLS, MASK, MASK, SEP, MASK, MASK, SEP]
    assert mlm.input_ids.tolist() == mntp.input_ids.tolist() == masked
    assert mlm.labels.tolist() == [X, 10, 11, 12, X, X, 20, 21, X, 30, 31, X]
    assert mntp.labels.tolist() == [10, 11, 12, X, X, 20, 21, X, X, 31, X, X]
    assert mntp.cu_seqlens.tolist() == mlm.cu_seqlens.tolist() == [0, 5, 9, 12]


def test_mntp_masks_are_mlms_with_labels_one_step_earlier():
    rng = np.random.default_rng(0)
    docs = [np.array([CLS, *rng.integers(5, 512, n), SEP], dtype=np.uint32) for n in (0, 3, 200, 900)]
    positions = [0, 17, 2**33 + 5, 99]
    mlm = collator("mlm", seed=210, mask_rate=0.15)(docs, positions)
    mntp = collator("mntp", seed=210, mask_rate=0.15)(docs, positions)
    assert torch.equal(mlm.input_ids, mntp.input_ids)  # same kernel, same keys
    expected = np.full(mlm.num_tokens, IGNORE)
    for a, b in zip(mlm.bounds, mlm.bounds[1:]):
        expected[a : b - 1] = mlm.labels[a + 1 : b].numpy()
    assert mntp.labels.tolist() == expected.tolist()
    assert mntp.num_labels == mlm.num_labels > 0  # [CLS] is never masked: no label is lost
    assert mlm.digests[:2] == mntp.digests[:2] and mlm.digests[2:] != mntp.digests[2:]  # no mask in the short ones


def test_mlm_random_replacements_draw_from_the_whole_vocabulary():
    """As transformers' DataCollatorForLanguageModeling (Ettin's, with sequence_packing false):
    specials, [PAD] included, can be drawn; the embedding handles them (next test)."""
    ids = np.array([CLS, *np.random.default_rng(1).integers(4, 8, 20000), SEP], dtype=np.uint32)
    x, y = collator("mlm", vocab=8, mask_rate=0.3).sample(ids, 3)
    chosen = y != IGNORE
    drawn = set(x[chosen & (x != MASK) & (x != ids)].tolist())
    assert {PAD, CLS, SEP} <= drawn


def test_mntp_config_and_validation():
    cfg = load_config("tiny", ["objective=mntp"])
    assert cfg.objective.name == "mntp" and not cfg.model.causal
    assert (cfg.model.window_left, cfg.model.window_right) == (64, 64)
    with pytest.raises(ConfigError, match="objective mntp needs model.causal=false"):
        load_config("tiny", ["objective=mntp", "model.causal=true", "model.window_right=0"])
    with pytest.raises(ConfigError, match="objective.name must be one of mlm, clm, mntp"):
        load_config("tiny", ["objective.name=mtnp"])


def test_the_decoder_to_encoder_cross_phase_defaults_to_mntp():
    """configs/phase/cross.yaml: objective=mlm (the decoder continued as an encoder) trains MNTP;
    plain MLM is one override away; the encoder -> decoder cross phase stays CLM."""
    assert load_config("ettin", ["objective=mlm", "phase=cross"]).objective.name == "mntp"
    plain = load_config("ettin", ["objective=mlm", "phase=cross", "objective.name=mlm"])
    assert plain.objective.name == "mlm" and not plain.model.causal
    assert load_config("ettin", ["objective=clm", "phase=cross"]).objective.name == "clm"
    assert load_config("ettin", ["objective=mlm", "phase=decay"]).objective.name == "mlm"


def test_an_mntp_batch_trains_a_bidirectional_model():
    cfg = load_config("tiny", ["objective=mntp", "model.num_layers=2"])
    torch.manual_seed(0)
    model = cfg.model.build()
    rng = np.random.default_rng(2)
    docs = [np.array([CLS, *rng.integers(5, 512, n), SEP], dtype=np.uint32) for n in (30, 70)]
    batch = Collator.from_config(cfg)(docs, [0, 1])
    loss = model(batch.input_ids.long(), batch.cu_seqlens, labels=batch.labels.long())
    loss.backward()
    assert torch.isfinite(loss) and model.embed.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- the embedding row


def test_lookups_of_row_0_pass_it_no_gradient_but_the_tied_head_still_trains_it():
    """Ettin's embedding had padding_idx 0 (bert24's config from bert-base-uncased), not [PAD]:
    looking up row 0 trains nothing, looking up [PAD] (here moved to id 4) trains its row."""
    cfg = load_config("tiny", ["model.pad_token_id=4", "model.num_layers=2"])
    torch.manual_seed(0)
    model = cfg.model.build()
    assert EMBEDDING_PADDING_IDX == 0
    ids = torch.tensor([0, 4, 9, 0, 4])
    model.lookup(ids).square().sum().backward()
    grad = model.embed.weight.grad
    assert torch.all(grad[0] == 0) and grad[4].abs().sum() > 0 and grad[9].abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(model.lookup(ids)[0], model.embed.weight[0])  # the forward is the row itself
    model.zero_grad()
    model(ids, torch.tensor([0, 5], dtype=torch.int32), labels=torch.tensor([9, X, X, 4, X])).backward()
    assert grad is not model.embed.weight.grad and model.embed.weight.grad[0].abs().sum() > 0  # via the softmax


# ----------------------------------------------------------------------------- decoders learn EOS


@pytest.mark.slow
def test_an_overfit_decoder_generates_a_document_and_stops_at_sep(tmp_path):
    """Trained on three short documents (the stored [SEP] their last target), exported, and run
    through transformers' generate: from [CLS] + a document's first token it writes that document
    and stops at [SEP], well before max_new_tokens."""
    cfg = load_config("tiny", ["objective=clm", "model.num_layers=2", "model.attn_out_dropout=0"])
    docs = [[CLS, 10, 11, 12, 13, 14, SEP], [CLS, 20, 21, 22, 23, SEP], [CLS, 30, 31, 32, 33, 34, 35, SEP]]
    batch = Collator.from_config(cfg)([np.array(d) for d in docs], [0, 1, 2])
    torch.manual_seed(0)
    model = cfg.model.build(attn_backend="sdpa")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    ids, labels = batch.input_ids.long(), batch.labels.long()
    for _ in range(300):
        loss = model(ids, batch.cu_seqlens, labels=labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    floor = 3 * np.log(3) / int((labels != IGNORE).sum())  # after [CLS], any of the 3 first tokens
    assert loss.item() < floor + 0.01
    hf.export(cfg.model, full_state_dict(model), tmp_path, objective="clm")
    theirs = hf.load_hf_model(tmp_path)
    assert theirs.generation_config.eos_token_id == SEP
    for doc in docs:
        prompt = torch.tensor([doc[:2]])
        out = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False)
        assert out[0].tolist() == doc
