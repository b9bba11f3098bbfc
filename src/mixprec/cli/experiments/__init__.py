"""Numerical-fidelity experiments: does mixed precision hurt accuracy, and when does fp16
need loss scaling? Run them with `mixprec experiment parity` and `mixprec experiment underflow`."""
