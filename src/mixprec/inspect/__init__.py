"""Looking at a model before and while training it: `plan` (each module's dtype and risks),
`diagnose` (gradient ranges against fp16/bf16) and their plots.
Imports only from the layers below it."""
