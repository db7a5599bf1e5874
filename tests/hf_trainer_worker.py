"""Run under torchrun: tiny GPT-2 trained by gradaccum's Trainer, 2 ranks x 2 rows x k=3.

Rank 0 saves the final weights to the path given as the first argument.
"""

from __future__ import annotations

import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_transformers import gpt2_lm, pad_collator, train, variable_length_rows  # noqa: E402

from gradaccum.transformers import Trainer  # noqa: E402

if __name__ == "__main__":
    out = pathlib.Path(sys.argv[1])
    data, collate = variable_length_rows(36, causal=True), pad_collator(causal=True)
    model = train(Trainer, gpt2_lm(), data, collate, out.parent, batch=2, k=3)
    if torch.distributed.get_rank() == 0:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out)
    torch.distributed.barrier()  # tear down together (see dist_workers._entry)
    torch.distributed.destroy_process_group()
