"""The mixed-precision primitives, free of any training loop: loss scaling, fp32 master copies
and flat buffers, model conversion and precision policy, chunked kernels, modes, input checks
and checkpoint files. Imports nothing from the other layers."""
