"""What the tests share: independent float64 references, tiny models and data, the workers
that run on several processes (``spawn`` for gloo groups, ``python -m support.<worker>`` under
torchrun), and what a finished launch is.

- ``reference``: tiny models, variable-length data, big-batch gradients computed another way;
- ``matrix_cells``, ``terms_cells``: the composition matrix's loops and references;
- ``dist_workers``, ``deepspeed_workers``, ``fsdp2_*_worker``, ``hf_trainer_worker``,
  ``grpo_cells``, ``dpo_cells``: what each rank runs;
- ``coupled``, ``hf``, ``lightning_modules``: models of the coupled-loss, Transformers/TRL and
  Lightning tests;
- ``launch``: the environment of child processes and what counts as a finished launch.
"""
