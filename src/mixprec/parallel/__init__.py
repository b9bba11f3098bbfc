"""torch.distributed helpers: torchrun's environment, DDP, no_sync, rank-0 saves, FSDP2.
Imports only from `mixprec.core`."""
