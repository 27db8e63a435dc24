"""Scale tier of dualunlearn: the primal-dual algorithms of ``toy`` on diffusers models (Stable
Diffusion concept unlearning with LoRA, DDPM data unlearning), with accelerate for multi-GPU runs.
The ``dualunlearn`` command line lives above the tiers, in the ``dualunlearn`` package.
"""
