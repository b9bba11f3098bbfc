"""The optimizer wrappers that run a mixed-precision step: `MixedPrecisionOptimizer`,
`AutocastOptimizer`, fused Adam, overflow forensics, telemetry, the multi-optimizer stepper.
Imports only from `mixprec.core` and `mixprec.parallel`."""
