"""``train.compile``: ``torch.compile`` per backbone block (regional) or for the whole model.

``blocks`` compiles the ``forward`` of every block of the backbone's family table, the unit that FSDP2 shards and
ZeRO-3 gathers, *before* the model is sharded (torchtitan ``torchtitan/models/llama3/infra/parallelize.py``,
``apply_compile``: per-block compile after activation checkpointing and before ``fully_shard``). Identical blocks
share one compiled graph (parameters are graph inputs), so compile time does not grow with depth, and the
sharding hooks (FSDP2 all-gather/reduce-scatter, ZeRO-3 fetch/release, DDP bucket hooks, composable activation
checkpointing) stay outside the compiled code, in eager mode, where they are designed to run. Only ``forward`` is
replaced, so module names, ``state_dict`` keys and checkpoints are the same as in eager mode.

``model`` compiles the whole model in place (``nn.Module.compile``); the sharding hooks then split the graph at each
unit boundary, which ends up close to ``blocks`` under FSDP2/ZeRO-3 but keeps the stem and head in the graph.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from scaling.engine.sharding import ShardingError, blocks_of

def compile_blocks(model: nn.Module, block_classes: tuple[type, ...]) -> int:
    """Replace the ``forward`` of every instance of ``block_classes`` by its compiled version; returns the count."""
    blocks = blocks_of(model, block_classes)
    if not blocks:
        raise ShardingError(
            f"train.compile='blocks': none of the block classes {[c.__name__ for c in block_classes]} occurs in "
            f"{type(model).__name__}; use train.compile='model'"
        )
    for block in blocks:
        # An instance attribute shadows the class's forward; nn.Module.__call__ (and with it every hook) stays eager.
        block.forward = torch.compile(block.forward)
    return len(blocks)


def compile_model(model: nn.Module) -> None:
    """Compile the whole model in place (its ``__call__``; the parameters and their names are unchanged)."""
    model.compile()
