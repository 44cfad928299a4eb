"""Where videos come from: local paths and s3:// objects behind one storage interface, and the listing of inputs into SourceRows."""
