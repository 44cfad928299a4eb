"""The page a person looks at after a labelling run (`groupemotion report`).

`scan` reads a labels output (`ray_jobs.sinks.labels`) in one streaming pass per Parquet
dataset and keeps only fixed-size results; `frames` decodes the few videos the page shows again;
`figures` draws the pictures and `page` writes the HTML that holds them.
"""
