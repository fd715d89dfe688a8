"""The comparison that reproduces the paper's table: its plan, the runs, their records, the teacher check, the
table and the claim (``python -m compress_lit.reproduce``)."""
