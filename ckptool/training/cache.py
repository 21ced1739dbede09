"""Linear probing's shortcut: with the backbone frozen and no augmentation it is a fixed
function, so its outputs (the head's inputs) are computed once and re-batched."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ckptool.training.loop import Run


class FeatureBatches:
    """Backbone outputs (the head's inputs), computed once in eval mode, then re-batched."""

    def __init__(self, run: Run, loader: Any) -> None:
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
