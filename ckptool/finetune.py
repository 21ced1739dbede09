"""The fine-tune runner: weights -> head -> freeze -> guarded training -> verified outputs.

Data and weights are checked before anything is written; outputs (model.safetensors,
report.json) are written atomically at the end, so a failed run leaves nothing behind.
With the ``linear`` strategy and no augmentation the frozen backbone is a fixed
function: its features are computed once and the head trains on the cached features.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ckptool._version import __version__
from ckptool.choices import Optimizer, Strategy
from ckptool.data import DataSplit, ImageDataset, load_split
from ckptool.distributed import (
    DistContext,
    any_rank,
    barrier,
    from_environment,
    shutdown,
    sum_across,
)
from ckptool.errors import FrozenParameterError, OutputError, UsageError
from ckptool.formats.write import atomic_output, committed_outputs, forget_committed
from ckptool.freezing import (
    FreezeSummary,
    chosen_strategy,
    freeze_for_training,
    hold_frozen,
)
from ckptool.guard import FreezeGuard, GuardReport, violation_error
from ckptool.keys import Transforms
from ckptool.surgery import SurgeryLog, adapt_into

if TYPE_CHECKING:
    import torch
    from torch import nn

OUTPUT_FILES = ("model.safetensors", "report.json")


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float | None
    val_acc: float | None
    seconds: float
    images_per_s: float


@dataclass(frozen=True)
class ModuleChange:
    """Whether a top-level module's tensors moved between the start and the end."""

    name: str
    changed: int
    unchanged: int
    frozen: bool


@dataclass(frozen=True)
class FinetuneResult:
    config: dict[str, Any]
    classes: tuple[str, ...]
    epochs: tuple[EpochMetrics, ...]
    best_epoch: int
    summary: FreezeSummary
    guard: GuardReport
    changes: tuple[ModuleChange, ...]
    weights: SurgeryLog | None
    cached_features: bool
    outputs: tuple[str, ...] = ()

    @property
    def frozen_unchanged(self) -> bool:
        return all(c.changed == 0 for c in self.changes if c.frozen)


class Progress(Protocol):
    """What the runner tells its caller; the report layer draws it."""

    def prepare(self, step: str) -> None: ...
    def data(self, split: DataSplit) -> None: ...
    def start_epoch(self, epoch: int, epochs: int, batches: int) -> None: ...
    def advance(self, loss: float, images: int) -> None: ...
    def end_epoch(self, metrics: EpochMetrics) -> None: ...


class _Silent:
    def prepare(self, step: str) -> None:
        pass

    def data(self, split: DataSplit) -> None:
        pass

    def start_epoch(self, epoch: int, epochs: int, batches: int) -> None:
        pass

    def advance(self, loss: float, images: int) -> None:
        pass

    def end_epoch(self, metrics: EpochMetrics) -> None:
        pass


@dataclass(frozen=True)
class TrainOptions:
    """Training hyperparameters (the CLI's flags)."""

    epochs: int = 5
    batch_size: int = 32
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    device: str = "auto"
    amp: bool = False
    image_size: int = 224
    augment: bool = True
    seed: int = 0
    workers: int = 0
    val_split: float = 0.4
    cache_features: bool = True  # linear + no augmentation: train the head on cached features


@dataclass(frozen=True)
class WeightOptions:
    """Where the starting weights come from and how they are adapted."""

    weights: str | None = None
    key: str | None = None
    transforms: Transforms = field(default_factory=Transforms)
    auto: bool = False
    on_mismatch: str = "error"


def finetune(
    model: str,
    data: str,
    out_dir: str,
    *,
    model_args: Sequence[str] = (),
    num_classes: int | None = None,
    head: str | None = None,
    weights: WeightOptions = WeightOptions(),
    strategy: str | None = None,
    train: Sequence[str] | None = None,
    freeze_names: Sequence[str] | None = None,
    freeze_until: str | None = None,
    options: TrainOptions = TrainOptions(),
    val_data: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` on ``data`` and write OUTDIR/model.safetensors and report.json.

    Raises:
        UsageError: bad data layout or options; DataError: unreadable images;
        FrozenParameterError: the guard saw a frozen tensor change (nothing written);
        OutputError: OUTDIR holds a previous run and ``force`` is false.
    """
    import torch

    _check_options(options, weights, strategy)
    _check_out_dir(out_dir, force)
    progress = progress or _Silent()
    progress.prepare("read the data")
    split = load_split(data, val_data=val_data, val_split=options.val_split, seed=options.seed)
    progress.data(split)
    _check_num_classes(num_classes, split, data)
    torch.manual_seed(options.seed)
    progress.prepare("build the model" + (" and adapt the weights" if weights.weights else ""))
    net, log = _build(model, model_args, num_classes or len(split.classes), head, weights)
    summary = freeze_for_training(
        net,
        train=train,
        freeze_names=freeze_names,
        strategy=strategy,
        freeze_until=freeze_until,
        head=head,
    )
    prepared = _Prepared(
        net=net,
        split=split,
        summary=summary,
        weights_log=log,
        initial={k: v.detach().clone() for k, v in net.state_dict().items()},
        config=_config(
            model,
            model_args,
            data,
            val_data,
            weights,
            strategy,
            train,
            freeze_names,
            freeze_until,
            options,
            num_classes or len(split.classes),
        ),
    )
    device = _device(options.device)
    prepared.config["device"] = device.type  # "auto" as it resolved
    context = from_environment(device.type)
    try:
        result, final = _train(prepared, options, device, head, progress, context)
        if context.is_main:  # one writer; the others wait so every rank ends together
            result = _write_outputs(out_dir, final, result, model, weights)
        barrier(context)
        return result
    finally:
        shutdown(context)


def _check_num_classes(num_classes: int | None, split: DataSplit, data: str) -> None:
    """A head with fewer outputs than the data has classes fails on the first label it
    cannot score; one with more trains outputs no image ever asks for."""
    if num_classes is not None and num_classes != len(split.classes):
        raise UsageError(
            f"--num-classes {num_classes}, but {data} has {len(split.classes)} classes "
            f"({', '.join(split.classes[:6])}{', ...' if len(split.classes) > 6 else ''}); "
            "leave --num-classes out to take it from the data"
        )


@dataclass(frozen=True)
class _Prepared:
    """Everything fixed before training: the model with its weights and freeze, the data."""

    net: nn.Module
    split: DataSplit
    summary: FreezeSummary
    weights_log: SurgeryLog | None
    initial: dict[str, torch.Tensor]
    config: dict[str, Any]


def _train(
    prepared: _Prepared,
    options: TrainOptions,
    device: torch.device,
    head: str | None,
    progress: Progress | None,
    context: DistContext,
) -> tuple[FinetuneResult, dict[str, torch.Tensor]]:
    """Train with the guard on; return the result and the best epoch's weights (CPU)."""
    import torch

    net = prepared.net
    if context.active and device.type == "cuda":
        device = torch.device("cuda", context.local_rank)
    net.to(device)
    run = _Run(net, prepared.split, options, device, head, progress or _Silent(), context)
    epochs, best_state, guard = run.train()
    net.load_state_dict(best_state)
    final = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    result = FinetuneResult(
        config=prepared.config,
        classes=prepared.split.classes,
        epochs=tuple(epochs),
        best_epoch=max(epochs, key=_score).epoch,
        summary=prepared.summary,
        guard=guard,
        changes=module_changes(prepared.initial, final, prepared.summary),
        weights=prepared.weights_log,
        cached_features=run.cached,
    )
    return result, final


def _check_options(options: TrainOptions, weights: WeightOptions, strategy: str | None) -> None:
    if options.epochs < 1 or options.batch_size < 1 or options.lr <= 0:
        raise UsageError("--epochs and --batch-size must be at least 1 and --lr positive")
    if options.optimizer not in ("sgd", "adamw"):
        raise UsageError(f"--optimizer {options.optimizer!r}: choose sgd or adamw")
    if strategy == "scratch" and weights.weights:
        raise UsageError("--strategy scratch re-initialises every weight; drop --weights")


def _check_out_dir(out_dir: str, force: bool) -> None:
    if os.path.isfile(out_dir):
        raise OutputError(f"{out_dir}: is a file; -o names an output directory")
    existing = [f for f in OUTPUT_FILES if os.path.exists(os.path.join(out_dir, f))]
    if existing and not force:
        raise OutputError(
            f"{out_dir}: holds {', '.join(existing)} from an earlier run; add --force to replace"
        )
    parent = os.path.dirname(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        raise OutputError(f"{out_dir}: directory {parent} does not exist")


def _build(
    spec: str, model_args: Sequence[str], classes: int, head: str | None, weights: WeightOptions
) -> tuple[nn.Module, SurgeryLog | None]:
    from ckptool.models import build_model

    net = build_model(spec, model_args=model_args, num_classes=classes, head=head)
    if not weights.weights:
        return net, None
    log = adapt_into(
        net,
        weights.weights,
        key=weights.key,
        transforms=weights.transforms,
        auto=weights.auto,
        on_mismatch=weights.on_mismatch,
    )
    return net, log


def _device(requested: str) -> torch.device:
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    if requested not in ("cpu", "cuda") and not requested.startswith("cuda:"):
        raise UsageError(f"--device {requested!r}: choose auto, cpu or cuda")
    return torch.device(requested)


def _score(metrics: EpochMetrics) -> tuple[float, float]:
    """Best epoch: highest validation accuracy, then lowest validation loss."""
    if metrics.val_acc is None or metrics.val_loss is None:
        return (-metrics.train_loss, metrics.epoch)
    return (metrics.val_acc, -metrics.val_loss)


class _Run:
    """One training run: loaders, optimizer, guard, epochs, best weights."""

    def __init__(
        self,
        net: nn.Module,
        split: DataSplit,
        options: TrainOptions,
        device: torch.device,
        head: str | None,
        progress: Progress,
        context: DistContext | None = None,
    ) -> None:
        from ckptool.models import find_head

        self.net, self.split, self.options, self.device = net, split, options, device
        self.head_name = head or find_head(net)
        self.context = context or DistContext()
        self.progress = progress if self.context.is_main else _Silent()
        self.forward_model = _wrap_ddp(net, device, self.context)
        # fp16 autocast needs loss scaling; bf16 (the CPU's autocast type) does not.
        self.scaler = _grad_scaler(options.amp and device.type == "cuda")
        trainable = [name for name, p in net.named_parameters() if p.requires_grad]
        # The backbone is a fixed function only if nothing outside the head trains and
        # no augmentation changes its input between epochs.
        self.cached = (
            options.cache_features
            and not options.augment
            # under DDP the head would train outside the gradient sync
            and not self.context.active
            and bool(trainable)
            and all(name.startswith(self.head_name + ".") for name in trainable)
        )

    def train(self) -> tuple[list[EpochMetrics], dict[str, torch.Tensor], GuardReport]:

        optimizer = self._optimizer()
        # Gradients left on frozen parameters (by whatever loaded or built the model)
        # would otherwise ride along: the freeze holds from the first step.
        hold_frozen(self.net, optimizer)
        train_batches, val_batches = self._batches()
        epochs: list[EpochMetrics] = []
        best: dict[str, torch.Tensor] = {}
        # Distributed: every rank records; after each step the ranks agree on a verdict.
        mode = "record" if self.context.active else "raise"
        with FreezeGuard(self.net, optimizer, on_violation=mode) as guard:
            self.guard = guard
            for epoch in range(1, self.options.epochs + 1):
                if hasattr(train_batches, "sampler") and hasattr(
                    train_batches.sampler, "set_epoch"
                ):
                    train_batches.sampler.set_epoch(epoch)
                metrics = self._epoch(epoch, optimizer, train_batches, val_batches)
                if not epochs or _score(metrics) > max(_score(m) for m in epochs):
                    best = {
                        k: v.detach().to("cpu", copy=True) for k, v in self.net.state_dict().items()
                    }
                epochs.append(metrics)
                self.progress.end_epoch(metrics)
        return epochs, best, guard.report()

    def _optimizer(self) -> torch.optim.Optimizer:
        import torch

        params = [p for p in self.net.parameters() if p.requires_grad]
        if not params:
            raise UsageError("nothing to train: every parameter is frozen")
        if Optimizer(self.options.optimizer) is Optimizer.ADAMW:
            return torch.optim.AdamW(
                params, lr=self.options.lr, weight_decay=self.options.weight_decay
            )
        return torch.optim.SGD(
            params,
            lr=self.options.lr,
            momentum=self.options.momentum,
            weight_decay=self.options.weight_decay,
        )

    def _batches(self) -> tuple[Any, Any]:
        """Loaders of images, or (when cached) of backbone features computed once."""
        train = self._loader(self.split.train, augment=self.options.augment, shuffle=True)
        val = self._loader(self.split.val, augment=False, shuffle=False) if self.split.val else None
        if not self.cached:
            return train, val
        return _FeatureBatches(self, train), (
            _FeatureBatches(self, val) if val is not None else None
        )

    def _loader(self, samples: Sequence[Any], *, augment: bool, shuffle: bool) -> Any:
        import torch
        from torch.utils.data import DataLoader

        dataset = ImageDataset(
            samples,
            image_size=self.options.image_size,
            channels=input_channels(self.net),
            augment=augment,
        )
        generator = torch.Generator().manual_seed(self.options.seed)
        sampler: Any = None
        if self.context.active and shuffle:  # each rank trains on its own shard
            from torch.utils.data.distributed import DistributedSampler

            sampler = DistributedSampler(
                dataset,  # type: ignore[arg-type]
                num_replicas=self.context.world_size,
                rank=self.context.rank,
                seed=self.options.seed,
            )
        return DataLoader(
            dataset,  # type: ignore[arg-type]  # a map-style dataset, duck-typed
            batch_size=self.options.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            generator=generator,
            num_workers=self.options.workers,
            pin_memory=self.device.type == "cuda",
        )

    def _epoch(self, epoch: int, optimizer: Any, train: Any, val: Any) -> EpochMetrics:
        start = time.perf_counter()
        self.progress.start_epoch(epoch, self.options.epochs, len(train))
        train_loss, train_acc, seen = self._pass(train, optimizer)
        val_loss, val_acc = (None, None)
        if val is not None:
            val_loss, val_acc, _ = self._pass(val, None)
        seconds = time.perf_counter() - start
        return EpochMetrics(
            epoch, train_loss, train_acc, val_loss, val_acc, seconds, seen / seconds
        )

    def _pass(self, batches: Any, optimizer: Any) -> tuple[float, float, int]:
        """One pass over ``batches``: training when an optimizer is given, else evaluation."""
        import torch
        from torch import nn

        training = optimizer is not None
        self.net.train(training)
        total_loss, correct, seen = 0.0, 0, 0
        forward = self._head_forward if self.cached else self.forward_model
        for inputs, labels in batches:
            inputs = inputs.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            with torch.set_grad_enabled(training), self._autocast():
                logits = forward(inputs)
                loss = nn.functional.cross_entropy(logits.float(), labels)
            value = float(loss.detach())
            if training:
                optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(optimizer)
                self.scaler.update()
                self._agree_on_guard()
                self.progress.advance(value, len(labels))
            total_loss += value * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
        if training:  # validation runs the whole set on every rank; training is sharded
            total_loss, correct_sum, seen_sum = sum_across(
                [total_loss, correct, seen], self.context
            )
            correct, seen = int(correct_sum), int(seen_sum)
        return total_loss / max(seen, 1), correct / max(seen, 1), seen

    def _agree_on_guard(self) -> None:
        if not self.context.active:
            return
        if any_rank(bool(self.guard.report().violations), self.context):
            report = self.guard.report()
            if report.violations:
                raise violation_error(report)
            raise FrozenParameterError(
                "a frozen tensor changed on another rank; see rank 0's report", (), report
            )

    def _head_forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net.get_submodule(self.head_name)(features)  # type: ignore[no-any-return]

    def _autocast(self) -> Any:
        import contextlib

        import torch

        if not self.options.amp:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.device.type == "cpu" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)


def _wrap_ddp(net: nn.Module, device: torch.device, context: DistContext) -> Any:
    if not context.active:
        return net
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(net, device_ids=device_ids)


def _grad_scaler(enabled: bool) -> Any:
    import torch

    return torch.amp.GradScaler("cuda", enabled=enabled)


class _FeatureBatches:
    """Backbone outputs (the head's inputs), computed once in eval mode, then re-batched."""

    def __init__(self, run: _Run, loader: Any) -> None:
        self.run, self.loader = run, loader
        self.features: Any = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        import torch

        if self.features is None:
            self.features = self._compute()
        features, labels = self.features
        order = torch.randperm(
            len(labels), generator=torch.Generator().manual_seed(self.run.options.seed)
        )
        size = self.run.options.batch_size
        for start in range(0, len(labels), size):
            index = order[start : start + size]
            yield features[index], labels[index]

    def _compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        head = self.run.net.get_submodule(self.run.head_name)
        captured: list[torch.Tensor] = []
        hook = head.register_forward_hook(lambda m, args, out: captured.append(args[0].detach()))
        labels = []
        was_training = self.run.net.training
        self.run.net.eval()
        try:
            with torch.no_grad():
                for inputs, batch_labels in self.loader:
                    self.run.net(inputs.to(self.run.device))
                    labels.append(batch_labels)
        finally:
            hook.remove()
            self.run.net.train(was_training)
        return torch.cat(captured), torch.cat(labels).to(self.run.device)


def input_channels(net: nn.Module) -> int:
    """Channels of the first Conv2d (1 for grayscale models), else 3."""
    from torch import nn

    first = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    return first.in_channels if first is not None else 3


def module_changes(
    initial: dict[str, torch.Tensor], final: dict[str, torch.Tensor], summary: FreezeSummary
) -> tuple[ModuleChange, ...]:
    """Per top-level module: how many tensors changed bitwise between start and end."""
    import torch

    frozen_modules = {m.name for m in summary.modules if m.status == "frozen"}
    rows: dict[str, list[int]] = {}
    for name, before in initial.items():
        after = final[name]
        same = before.dtype == after.dtype and torch.equal(_bits(before), _bits(after))
        rows.setdefault(name.split(".", 1)[0], [0, 0])[0 if not same else 1] += 1
    return tuple(ModuleChange(n, c, u, n in frozen_modules) for n, (c, u) in rows.items())


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    from ckptool.guard import fingerprint_elementwise

    return fingerprint_elementwise(tensor)


def _config(
    model: str,
    model_args: Sequence[str],
    data: str,
    val_data: str | None,
    weights: WeightOptions,
    strategy: str | None,
    train: Sequence[str] | None,
    freeze_names: Sequence[str] | None,
    freeze_until: str | None,
    options: TrainOptions,
    classes: int,
) -> dict[str, Any]:
    return {
        "model": model,
        "model_args": list(model_args),
        "num_classes": classes,
        "data": data,
        "val_data": val_data,
        "weights": weights.weights,
        "transforms": weights.transforms.flags(),
        "strategy": _value(chosen_strategy(strategy, train, freeze_names)),
        "train": list(train or []),
        "freeze": list(freeze_names or []),
        "freeze_until": freeze_until,
        # What was asked for; report.json's top-level cached_features says what ran.
        **_renamed(asdict(options), cache_features="feature_cache_allowed"),
    }


def _value(strategy: Strategy | None) -> str | None:
    return strategy.value if strategy is not None else None


def _renamed(fields: dict[str, Any], **names: str) -> dict[str, Any]:
    return {names.get(key, key): value for key, value in fields.items()}


def _write_outputs(
    out_dir: str,
    state: dict[str, torch.Tensor],
    result: FinetuneResult,
    model: str,
    weights: WeightOptions,
) -> FinetuneResult:
    """model.safetensors (with provenance) then report.json, each atomic."""
    import dataclasses

    from ckptool.formats.save import save_state_dict

    with _removed_on_failure(out_dir):
        model_path = os.path.join(out_dir, "model.safetensors")
        metadata = {
            "format": "pt",
            "ckptool.version": __version__,
            "ckptool.command": "finetune",
            "ckptool.model": model,
            "ckptool.weights": os.path.basename(weights.weights or ""),
            "ckptool.classes": json.dumps(list(result.classes)),
            # Enough to build the model these weights fit: the head size and arguments.
            "ckptool.num_classes": str(result.config["num_classes"]),
            "ckptool.model_args": json.dumps(result.config["model_args"]),
        }
        save_state_dict(state, model_path, force=True, metadata=metadata)
        curves = _write_curves(out_dir, result.epochs)
        report_path = os.path.join(out_dir, "report.json")
        result = dataclasses.replace(result, outputs=(model_path, report_path, *curves))
        with atomic_output(report_path) as temp:
            temp.file.write(json.dumps(result_json(result), indent=2).encode())
    return result


@contextlib.contextmanager
def _removed_on_failure(out_dir: str) -> Iterator[None]:
    """Create ``out_dir``; all or nothing: if this run created it, a failed or
    interrupted write does not leave it behind, half-filled or empty."""
    created = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    try:
        yield
    except BaseException:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
            for path in committed_outputs():
                if os.path.dirname(path) == out_dir:
                    forget_committed(path)
        raise


def _write_curves(out_dir: str, epochs: Sequence[EpochMetrics]) -> tuple[str, ...]:
    """OUTDIR/curves.png when matplotlib is installed (the CLI also draws them in text)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        return ()
    figure, (loss_axis, acc_axis) = pyplot.subplots(1, 2, figsize=(9, 3.5))
    numbers = [m.epoch for m in epochs]
    loss_axis.plot(numbers, [m.train_loss for m in epochs], label="train")
    acc_axis.plot(numbers, [m.train_acc for m in epochs], label="train")
    if all(m.val_loss is not None for m in epochs):
        loss_axis.plot(numbers, [m.val_loss for m in epochs], label="val")
        acc_axis.plot(numbers, [m.val_acc for m in epochs], label="val")
    loss_axis.set(title="loss", xlabel="epoch")
    acc_axis.set(title="accuracy", xlabel="epoch")
    loss_axis.legend()
    path = os.path.join(out_dir, "curves.png")
    figure.savefig(path, dpi=100, bbox_inches="tight")
    pyplot.close(figure)
    return (path,)


def result_json(result: FinetuneResult) -> dict[str, Any]:
    """The report.json document."""
    return {
        "config": result.config,
        "classes": list(result.classes),
        "epochs": [asdict(m) for m in result.epochs],
        "best_epoch": result.best_epoch,
        "cached_features": result.cached_features,
        "parameters": {
            "total": result.summary.total,
            "trainable": result.summary.trainable,
            "frozen": result.summary.frozen,
            "frozen_buffers": result.summary.frozen_buffers,
        },
        "guard": {
            "verdict": "ok" if result.guard.ok else "violated",
            "steps_checked": result.guard.steps_checked,
            "parameters_watched": result.guard.parameters_watched,
            "buffers_watched": result.guard.buffers_watched,
        },
        "changes": [asdict(c) for c in result.changes],
        "frozen_unchanged": result.frozen_unchanged,
        "weights": None
        if result.weights is None
        else {
            "renamed": len(result.weights.renamed),
            "kept": len(result.weights.kept),
            "filled": list(result.weights.filled),
            "dropped": list(result.weights.dropped),
            "left_out": list(result.weights.left_out),
        },
        "outputs": list(result.outputs),
    }
