"""Where videos come from: local paths and s3:// objects behind one storage interface, tables of
videos, the streamed listing a job saves before its first unit, and the reading of all of them
into SourceRows."""
