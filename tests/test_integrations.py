"""The guard where people train: real Lightning and Hugging Face Trainer runs.

Each trainer builds its optimizer over every parameter (the usual way), the callback
freezes by ckptool's specs once training begins, and the run must leave every frozen
tensor bit-identical while the rest trains; a planted ``.data`` write to a frozen
weight must stop the run with the guard's report.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ckptool import FrozenParameterError

HAS_LIGHTNING = any(importlib.util.find_spec(m) for m in ("lightning", "pytorch_lightning"))
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None and (
    importlib.util.find_spec("accelerate") is not None
)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def changed(before: dict[str, torch.Tensor], model: nn.Module) -> set[str]:
    after = model.state_dict()
    return {n for n, t in before.items() if not torch.equal(t, after[n])}


# --- Lightning ---------------------------------------------------------------------


def lightning_module() -> Any:
    try:
        import lightning.pytorch as pl
    except ImportError:
        import pytorch_lightning as pl

    class Classifier(pl.LightningModule):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU())
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(x))

        def training_step(self, batch: Any, index: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self) -> Any:
            # Over every parameter, momentum and decay: the freeze must still hold.
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)

    return pl, Classifier


def lightning_fit(callbacks: list[Any], steps: int = 6) -> tuple[Any, nn.Module]:
    pl, Classifier = lightning_module()
    torch.manual_seed(0)
    model = Classifier()
    data = torch.utils.data.TensorDataset(torch.randn(32, 6), torch.randint(0, 3, (32,)))
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
    return trainer, model


@pytest.mark.skipif(not HAS_LIGHTNING, reason="lightning is not installed")
def test_lightning_run_keeps_the_frozen_backbone() -> None:
    from ckptool.integrations.lightning import FreezeGuardCallback

    callback = FreezeGuardCallback(train=["head"])
    _, Classifier = lightning_module()
    torch.manual_seed(0)
    initial = snapshot(Classifier())
    trainer, model = lightning_fit([callback])
    assert trainer.global_step == 6
    assert changed(initial, model) == {"head.weight", "head.bias"}  # BN kept in eval too
    report = callback.report
    assert report is not None and report.ok and report.steps_checked == 6
    assert report.parameters_watched == 4 and report.buffers_watched == 3


@pytest.mark.skipif(not HAS_LIGHTNING, reason="lightning is not installed")
@pytest.mark.parametrize("mode", ["raise", "stop"])
def test_lightning_run_stops_on_a_changed_frozen_weight(mode: str) -> None:
    from ckptool.integrations.lightning import FreezeGuardCallback

    pl, _ = lightning_module()

    class Vandal(pl.Callback):  # type: ignore[misc, name-defined]
        """Writes to a frozen weight behind the optimizer's back after each batch."""

        def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
            module.backbone[0].weight.data.add_(1.0)

    callback = FreezeGuardCallback(strategy="linear", on_violation=mode)
    if mode == "raise":
        with pytest.raises(FrozenParameterError, match=r"backbone\.0\.weight"):
            lightning_fit([callback, Vandal()])
        return
    trainer, _ = lightning_fit([callback, Vandal()])
    assert trainer.global_step == 2  # the write after step 1 is caught at step 2
    report = callback.report
    assert report is not None and report.violations[0].names == ("backbone.0.weight",)


# --- Hugging Face Trainer ---------------------------------------------------------


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
    )
    torch.manual_seed(0)
    return BertForSequenceClassification(config)


def hf_train(model: nn.Module, callbacks: list[Any], folder: Path, steps: int = 5) -> Any:
    from transformers import Trainer, TrainingArguments

    generator = torch.Generator().manual_seed(0)
    rows = [
        {
            "input_ids": torch.randint(0, 50, (8,), generator=generator),
            "attention_mask": torch.ones(8, dtype=torch.long),
            "labels": torch.tensor(i % 3),
        }
        for i in range(24)
    ]
    args = TrainingArguments(
        output_dir=str(folder),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        weight_decay=0.01,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=callbacks)
    trainer.train()
    return trainer


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers or accelerate is not installed")
def test_hf_trainer_run_keeps_the_frozen_encoder(tmp_path: Path) -> None:
    from ckptool.integrations.transformers import FreezeGuardCallback

    model = tiny_bert()
    initial = snapshot(model)
    callback = FreezeGuardCallback(train=["classifier"])
    trainer = hf_train(model, [callback], tmp_path)
    assert trainer.state.global_step == 5
    assert changed(initial, model) == {"classifier.weight", "classifier.bias"}
    report = callback.report
    assert report is not None and report.ok and report.steps_checked == 5
    assert callback.session.summary is not None
    held = callback.session.summary.held
    assert held is not None and "bert.embeddings.word_embeddings.weight" in (
        held.removed_from_optimizer
    )


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers or accelerate is not installed")
@pytest.mark.parametrize("mode", ["raise", "stop"])
def test_hf_trainer_stops_on_a_changed_frozen_weight(tmp_path: Path, mode: str) -> None:
    from transformers import TrainerCallback

    from ckptool.integrations.transformers import FreezeGuardCallback

    model = tiny_bert()

    class Vandal(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            with torch.no_grad():
                model.bert.pooler.dense.weight.add_(1.0)

    callback = FreezeGuardCallback(train=["classifier"], on_violation=mode)
    if mode == "raise":
        with pytest.raises(FrozenParameterError, match=r"bert\.pooler\.dense\.weight"):
            hf_train(model, [callback, Vandal()], tmp_path)
        return
    trainer = hf_train(model, [callback, Vandal()], tmp_path)
    assert trainer.state.global_step == 2
    report = callback.report
    assert report is not None and report.violations[0].names == ("bert.pooler.dense.weight",)


@pytest.mark.skipif(not HAS_LIGHTNING, reason="lightning is not installed")
def test_a_callback_with_an_unknown_violation_mode_is_refused() -> None:
    """Caught when the callback is made, not at the first violation mid-run."""
    from ckptool import UsageError
    from ckptool.integrations.lightning import FreezeGuardCallback

    with pytest.raises(UsageError, match="on_violation must be 'raise' or 'stop', got 'warn'"):
        FreezeGuardCallback(train=["head"], on_violation="warn")
