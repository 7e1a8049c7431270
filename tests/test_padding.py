"""A padded (B, S) batch with an attention_mask (left, right or both-sided padding) is unpadded by ``prepare``
and packed: loss and every gradient equal the unpadded sequences run one by one (float64 reference)."""

import pytest
import torch
from tests.checks import rel_err
from tests.harness import run_distributed
from tests.test_parallelize import reference_loss_and_grads, tiny_llama

import seqpar
from seqpar.runtime.packing import IGNORE_INDEX, unpad

pytest.importorskip("transformers", reason="transformers not installed (the 'hf' extra)")

LENGTHS = (21, 13, 8)
WIDTH = 24
# where each row's tokens start in the padded batch: right padding, left padding, padding on both sides
STARTS = (0, WIDTH - 13, 5)


def padded_batch(with_labels: bool):
    gen = torch.Generator().manual_seed(1)
    sequences = [torch.randint(1, 96, (n,), generator=gen) for n in LENGTHS]
    ids = torch.randint(1, 96, (len(LENGTHS), WIDTH), generator=gen)  # padding: random tokens, must not matter
    mask = torch.zeros(len(LENGTHS), WIDTH, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for row, (seq, start) in enumerate(zip(sequences, STARTS)):
        ids[row, start: start + seq.numel()] = seq
        labels[row, start: start + seq.numel()] = seq
        mask[row, start: start + seq.numel()] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if with_labels:
        batch["labels"] = labels
    return sequences, batch


def padded_equals_unpadded(strategy, with_labels):
    model = tiny_llama().double()
    sequences, batch = padded_batch(with_labels)
    ref_loss, ref_grads = reference_loss_and_grads(model, sequences)
    sp_model = seqpar.parallelize(model, strategy=strategy)
    local = sp_model.prepare(batch)
    out = sp_model(**local)
    out.loss.backward()
    sp_model.sync_gradients()
    grad_err = max(rel_err(p.grad, ref_grads[n]) for n, p in model.named_parameters() if n in ref_grads)
    return abs(out.loss.item() - ref_loss) / abs(ref_loss), grad_err, out.num_tokens


@pytest.mark.parametrize("strategy,with_labels", [("ring", True), ("ulysses", False)])
def test_padded_batch_equals_unpadded_sequences_one_by_one(strategy, with_labels):
    for loss_err, grad_err, tokens in run_distributed(padded_equals_unpadded, 2, strategy, with_labels):
        assert tokens == sum(n - 1 for n in LENGTHS)  # every real token but each sequence's last is labelled
        assert loss_err < 1e-10 and grad_err < 1e-10, (loss_err, grad_err)


def test_unpad_keeps_each_rows_tokens_and_labels():
    sequences, batch = padded_batch(with_labels=True)
    got, labels = unpad(batch["input_ids"], batch["labels"], batch["attention_mask"])
    for seq, ids, lab in zip(sequences, got, labels):
        assert torch.equal(ids, seq) and torch.equal(lab, seq)


def test_masks_seqpar_cannot_unpad_raise_naming_attention_mask():
    ids = torch.ones(2, 6, dtype=torch.long)
    holes = torch.tensor([[1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    empty = torch.tensor([[0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    for mask, what in ((holes, "padding between tokens"), (empty, "masks every token")):
        with pytest.raises(ValueError, match=f"^attention_mask: row 0 .*{what}"):
            unpad(ids, ids, mask)
    with pytest.raises(ValueError, match="^attention_mask: shape"):
        unpad(ids, ids, holes[:, :5])
