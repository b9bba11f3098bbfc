"""Mixed precision inside other training frameworks, driven by the mixprec engine.

Each framework module imports its framework, so none is imported by `import mixprec`; import
the one you use: `from mixprec.integrations.lightning import MixedPrecisionPlugin`
(`pip install -e '.[lightning]'` in the checkout), `from mixprec.integrations.hf import
MixedPrecisionCallback, MixedPrecisionTrainer` (HF transformers' Trainer) and
`from mixprec.integrations.accelerate import MixedPrecisionAccelerator` (`pip install -e
'.[hf]'`). Imports only from the layers below (core, parallel, engine) and each other.
"""
