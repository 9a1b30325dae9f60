"""What a run is on disk: checkpoints, the workdir, exports, versions."""
