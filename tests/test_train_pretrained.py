"""seqpar-train as a fine-tuning tool: a pretrained tiny Llama and tokenizer saved with save_pretrained, a .jsonl
corpus, bf16, warmup + cosine, clipping, evaluation and the Hugging Face export, checked against one plain
process; resume mid-corpus; clipping under SP and FSDP2 against clip_grad_norm_ in float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from tests.harness import run_distributed

pytest.importorskip("transformers", reason="transformers not installed (the 'hf' extra)")

from seqpar.launch import train as train_mod  # noqa: E402
from tests.test_text_data import documents, expected_ids, save_tiny_tokenizer, write_jsonl  # noqa: E402

TOKENS_PER_STEP, MAX_LEN = 256, 64


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A directory with a tiny Llama (random weights, saved: "pretrained") and its tokenizer, and two corpora."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("pretrained")
    model_dir = root / "model"
    save_tiny_tokenizer(model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    train_docs, eval_docs = documents(40, seed=10), documents(8, seed=11)
    write_jsonl(root / "train.jsonl", train_docs)
    write_jsonl(root / "eval.jsonl", eval_docs)
    return {"root": root, "model": model_dir, "train": train_docs, "eval": eval_docs}


def run_records(argv) -> list[dict]:
    args = train_mod.build_parser().parse_args(argv)
    train_mod.validate_args(args)
    return train_mod.train(args)


def first_batch(tokenizer_dir, docs) -> list[list[int]]:
    """The first step's sequences without shuffling, built here from the tokenizer's ids: documents in order,
    each one sequence (all are shorter than MAX_LEN), until the next would pass TOKENS_PER_STEP."""
    batch, total = [], 0
    for ids in expected_ids(tokenizer_dir, docs):
        assert len(ids) <= MAX_LEN
        if batch and total + len(ids) > TOKENS_PER_STEP:
            return batch
        batch.append(ids)
        total += len(ids)
    return batch


def plain_loss(model, batch: list[list[int]]) -> float:
    """The token-mean next-token loss of a batch, one sequence at a time in one process (float64 sums)."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for ids in batch:
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits.double()[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum")
            count += len(ids) - 1
    return float(total / count)


def base_argv(p, tmp_path, dtype: str) -> list[str]:
    return ["--model", str(p["model"]), "--data", str(p["root"] / "train.jsonl"), "--data-cache",
            str(tmp_path / "cache"), "--tokens-per-step", str(TOKENS_PER_STEP), "--max-len", str(MAX_LEN),
            "--strategy", "ring", "--dtype", dtype, "--no-progress", "--eval-data", str(p["root"] / "eval.jsonl")]


@pytest.mark.parametrize("dtype, tol", [("fp32", 1e-5), ("bf16", 3e-2)])
def test_fine_tuning_starts_at_the_pretrained_loss_and_exports_the_trained_model(pretrained, tmp_path, dtype, tol):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p, out = pretrained, tmp_path / "out"
    steps, peak = 6, 3e-3
    argv = base_argv(p, tmp_path, dtype) + ["--warmup-steps", "2", "--lr-schedule", "cosine", "--grad-clip", "1.0",
                                            "--lr", str(peak), "--steps", str(steps), "--no-shuffle",
                                            "--export-hf", str(out), "--tensorboard", str(tmp_path / "tb")]
    records = run_distributed(run_records, 2, argv, timeout=600)[0]
    batch = first_batch(p["model"], p["train"])
    assert (records[0]["sequences"], records[0]["tokens"]) == (len(batch), sum(map(len, batch)))
    pretrained_model = AutoModelForCausalLM.from_pretrained(p["model"], dtype=torch.float32)
    compute = AutoModelForCausalLM.from_pretrained(p["model"], dtype=train_mod.DTYPES[dtype])
    reference = plain_loss(compute, batch)
    assert abs(records[0]["loss"] - reference) <= tol * reference, (records[0]["loss"], reference)
    # transformers' warmup + cosine, written out: step s runs at peak * s/2 in warmup, then half a cosine to 0
    want_lr = [peak * (s / 2 if s < 2 else 0.5 * (1 + math.cos(math.pi * (s - 2) / (steps - 2))))
               for s in range(steps)]
    assert [r["lr"] for r in records] == pytest.approx(want_lr, rel=1e-12, abs=1e-15)
    assert all(r["grad_norm"] > 0 for r in records)
    # the exported model is the trained one: its loss on the held-out batch, in one plain process, equals the
    # evaluation the run did through the SP path after the last step
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert exported.dtype == (torch.float32 if dtype == "fp32" else torch.bfloat16)
    held_out = first_batch(p["model"], p["eval"])
    exported_loss = plain_loss(exported, held_out)
    assert abs(exported_loss - records[-1]["eval_loss"]) <= tol * exported_loss, (exported_loss, records[-1])
    assert exported_loss < plain_loss(pretrained_model, held_out) - 0.05  # it learnt
    assert AutoTokenizer.from_pretrained(out)("the cat")["input_ids"] == expected_ids(p["model"], ["the cat"])[0][:-1]
    if dtype == "fp32":  # TensorBoard got the same numbers as the metrics
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tmp_path / "tb"))
        events.Reload()
        assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in records])
        assert [e.step for e in events.Scalars("eval/loss")] == [steps]


def test_bf16_without_fsdp_runs_under_autocast(pretrained, tmp_path):
    # under autocast Llama's RoPE leaves q, k in float32 and v in bf16: the SP op gets them in one dtype
    from transformers import AutoModelForCausalLM

    argv = base_argv(pretrained, tmp_path, "bf16")[:-2] + ["--no-fsdp", "--no-shuffle", "--steps", "1"]
    loss = run_distributed(run_records, 2, argv)[0][0]["loss"]
    batch = first_batch(pretrained["model"], pretrained["train"])
    fp32 = plain_loss(AutoModelForCausalLM.from_pretrained(pretrained["model"], dtype=torch.float32), batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = plain_loss(AutoModelForCausalLM.from_pretrained(pretrained["model"], dtype=torch.float32), batch)
    # (a random tiny model's loss is near log(vocab) and barely moves with rounding: autocast and fp32 agree to
    # ~1e-5 here, so this checks that the autocast path runs and is right, not which precision it used)
    assert abs(loss - autocast) <= 1e-3 * autocast, (loss, autocast, fp32)


def test_resume_mid_corpus_continues_at_the_same_document(pretrained, tmp_path):
    # packed rows of 24 tokens split the documents (shuffled), so the checkpoint falls inside one
    argv = base_argv(pretrained, tmp_path, "fp32")[:-2] + ["--max-len", "24", "--tokens-per-step", "96",
                                                           "--packing", "--lr", "1e-2"]
    straight = run_distributed(run_records, 2, argv + ["--steps", "4"])[0]
    ckpt = argv + ["--checkpoint-dir", str(tmp_path / "ckpt")]
    first = run_distributed(run_records, 2, ckpt + ["--steps", "2"])[0]
    second = run_distributed(run_records, 2, ckpt + ["--steps", "4", "--resume"])[0]
    assert first[-1]["data"]["offset"] > 0, first[-1]["data"]  # mid-document
    resumed = first + second
    assert [r["data"] for r in resumed] == [r["data"] for r in straight]
    assert [r["tokens"] for r in resumed] == [r["tokens"] for r in straight]
    for a, b in zip(straight, resumed):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * a["loss"], (straight, resumed)


# ---------------------------------------------------------------------------------------------------
# clipping: the global norm under SP and FSDP2 equals one process's clip_grad_norm_ (float64)
# ---------------------------------------------------------------------------------------------------

MAX_NORM = 1e-3  # far below the gradient norm: the clipping acts


def tiny_llama64(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).double()


def clip_batch() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, 64, (n,), generator=gen) for n in (40, 17, 64)]


def clipped_sp_gradients(fsdp: bool) -> dict:
    import seqpar

    model = tiny_llama64(seed=1)
    if fsdp:
        train_mod.shard_model(model, torch.device("cpu"))
    sp = seqpar.parallelize(model, strategy="ring")
    out = sp(**sp.prepare(clip_batch()))
    out.loss.backward()
    if not fsdp:
        sp.sync_gradients()
    norm = float(train_mod._grad_norm(model))
    factor = train_mod.clip_gradients(model, MAX_NORM, norm)
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for n, p in model.named_parameters()}
    return {"norm": norm, "factor": factor, "grads": grads, "rank": dist.get_rank()}


@pytest.mark.parametrize("fsdp", [False, True], ids=["sp", "sp+fsdp2"])
def test_clipping_equals_one_process_clip_grad_norm(fsdp):
    model = tiny_llama64(seed=1)
    batch = clip_batch()
    total = torch.zeros((), dtype=torch.float64)
    for ids in batch:  # the global token mean of the batch, one sequence at a time
        logits = model(input_ids=ids[None]).logits[0, :-1]
        total = total + torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum")
    (total / sum(len(t) - 1 for t in batch)).backward()
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM))
    for got in run_distributed(clipped_sp_gradients, 4, fsdp):
        assert got["factor"] < 0.5 and abs(got["norm"] - norm) <= 1e-10 * norm, (got["norm"], norm)
        for name, p in model.named_parameters():
            assert torch.allclose(got["grads"][name], p.grad, rtol=1e-9, atol=1e-14), name


# ---------------------------------------------------------------------------------------------------
# model loading, long-context overrides, options and help
# ---------------------------------------------------------------------------------------------------


def test_a_model_directory_loads_its_weights_with_the_long_context_overrides(pretrained):
    from safetensors.torch import load_file

    saved = load_file(str(pretrained["model"] / "model.safetensors"))
    model = train_mod.build_model(str(pretrained["model"]), seed=5, max_position_embeddings=4096, rope_theta=5e5,
                                  rope_scaling={"rope_type": "linear", "factor": 4.0})
    for name, tensor in model.state_dict().items():  # the pretrained weights, not seed 5's
        assert torch.equal(tensor, saved[name]), name
    assert model.config.max_position_embeddings == 4096
    head_dim = 64 // 4
    want = 1.0 / (5e5 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)) / 4.0  # linear: / factor
    assert torch.allclose(model.model.rotary_emb.inv_freq.double(), want, rtol=1e-6)
    # a config directory without weights builds random weights from --seed
    config_only = pretrained["root"] / "config_only"
    config_only.mkdir(exist_ok=True)
    (config_only / "config.json").write_text((pretrained["model"] / "config.json").read_text())
    a, b = (train_mod.build_model(str(config_only), seed=s).model.embed_tokens.weight for s in (1, 1))
    assert torch.equal(a, b) and not torch.equal(a, saved["model.embed_tokens.weight"])


@pytest.mark.parametrize("extra, starts", [
    (["--grad-clip", "-1"], "--grad-clip:"),
    (["--warmup-steps", "-1"], "--warmup-steps:"),
    (["--eval-every", "2"], "--eval-every: needs --eval-data"),
    (["--eval-batches", "0"], "--eval-batches:"),
    (["--rope-theta", "0"], "--rope-theta:"),
    (["--rope-scaling", "[1, 2]"], "--rope-scaling:"),
    (["--max-position-embeddings", "8"], "--max-position-embeddings: 8 is below --max-len"),
    (["--packing"], "--packing/--no-shuffle: only for raw-text --data"),
    (["--data", "nowhere.jsonl"], "--data:"),
    (["--eval-data", "uniform"], "--eval-data:"),
])
def test_bad_fine_tuning_options_are_named(extra, starts):
    args = train_mod.build_parser().parse_args(["--data", "uniform", "--max-len", "64"] + extra)
    with pytest.raises(ValueError) as err:
        train_mod.validate_args(args, world_size=2)
    assert str(err.value).startswith(starts), str(err.value)


def test_text_needs_a_tokenizer_and_an_export_directory_must_be_new(pretrained, tmp_path):
    corpus = str(pretrained["root"] / "train.jsonl")
    args = train_mod.build_parser().parse_args(["--data", corpus])  # the built-in model has no tokenizer
    with pytest.raises(ValueError, match="--data: raw text needs a tokenizer"):
        train_mod.validate_args(args, world_size=1)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    args = train_mod.build_parser().parse_args(["--model", str(pretrained["model"]), "--data", corpus,
                                                "--export-hf", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="--export-hf: .* exists and is not empty"):
        train_mod.validate_args(args, world_size=1)


def test_every_option_has_help_with_its_default_shown():
    parser = train_mod.build_parser()
    for action in parser._actions:
        assert action.help and action.help.strip(), action.option_strings
    text = " ".join(parser.format_help().split())
    for shown in ("--steps STEPS optimizer steps", "(default: 20)", "--seed SEED", "(default: 0)",
                  "--lr-schedule {constant,linear,cosine}", "(default: constant)", "--dtype {fp32,bf16}"):
        assert shown in text, shown


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_help_is_printed_by_rank_0_only(monkeypatch, capsys, rank, printed):
    monkeypatch.setenv("RANK", rank)
    with pytest.raises(SystemExit) as done:
        train_mod.main(["--help"])
    assert done.value.code == 0
    assert ("usage: seqpar-train" in capsys.readouterr().out) == printed
