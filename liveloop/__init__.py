"""liveloop's shared core: settings, database, base-model preparation, sampling math, adapter artifacts."""
