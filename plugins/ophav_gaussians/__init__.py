"""ophav plugin: gaussians (mesh-anchored 3D Gaussian head avatar)."""
