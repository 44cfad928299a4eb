"""One module per `groupemotion` subcommand, each also `python -m ray_jobs.commands.<name>` for `ray job submit`: arguments in, a job's stages wired together, an exit status out."""
