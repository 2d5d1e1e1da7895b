"""Studies over avatars and runs: the evaluation protocols (self-reenactment, cross-identity, novel views) and
ablation grids of whole runs. Nothing here imports the command line."""
