"""A small fastai-v1-style training loop: callbacks, `Learner`, `DataBunch`, the recorder,
Learner checkpoints, the `MixedPrecision` callback and the torchrun ranks.
Imports only from the layers below it (core, parallel, engine)."""
