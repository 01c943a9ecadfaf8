"""BentoML component services. Each module builds one service class from a track's configuration."""
