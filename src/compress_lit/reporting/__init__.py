"""What a run leaves to read: learning curves and pictures at the end of a run, and the report over run folders
(``python -m compress_lit.report``)."""
