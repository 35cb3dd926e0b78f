"""An example mlipd plug-in: see ``density.DensityModel`` and docs/models.md of mlipd."""
