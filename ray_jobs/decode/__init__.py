"""Video bytes -> decoded clips: the Ray decode stage and the supervised child process that runs PyAV for it."""
