"""The RLVR trainer: config, loop, optimizer wiring, checkpoints and metrics.

Submodules are imported where used (megatron-core is heavy): `megafork.train.config`,
`megafork.train.optim`, `megafork.train.checkpoint`, `megafork.train.metrics`.
"""
