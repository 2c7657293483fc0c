"""The warmserve worker: compile through a backend, warm-start from the engine cache, refit new weights."""
