"""Ray orchestration: the one executor, the stage registry, running a job, and recipes."""
