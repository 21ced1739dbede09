"""The fine-tune runner's parts, each findable by name: ``results`` (what a run reports
and the options it takes), ``loop`` (the guarded training loop, DDP, mixed precision),
``cache`` (backbone features computed once for linear probing), ``outputs`` (the
verified files a run writes). :mod:`ckptool.finetune` puts them together."""
