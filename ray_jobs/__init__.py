"""ray_jobs: everything that runs on Ray."""
