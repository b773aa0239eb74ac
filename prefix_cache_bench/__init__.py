"""The shared code of phase1_experiment.py, phase2_experiment.py and plot_results.py: one module
per job, each importing only modules below it (docs/architecture.md has the layers)."""
