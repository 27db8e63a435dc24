"""Scale tier of dualunlearn: the primal-dual algorithms of ``toy`` on diffusers models (Stable
Diffusion concept unlearning with LoRA, DDPM data unlearning), with accelerate for multi-GPU runs.
Also home of the ``dualunlearn`` command line (``scale.cli``), the top of the import graph.
"""
